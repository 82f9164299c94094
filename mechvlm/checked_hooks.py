"""`HookedVLM`'s hook registry on top of TransformerLens' `HookedRootModule`: hook names
are checked (an unknown name raises, naming the closest ones), hook lists must have TL's
form, a temporary hook added inside a context belongs to it, and ``run_with_cache``
returns a `VLMActivationCache`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from torch import Tensor

from mechvlm.cache import IMAGE_EMBEDS, VLMActivationCache
from mechvlm.hook_points import UnknownHookError, check_hook_list, unknown_hook_error


class CheckedHooksMixin:
    """Goes before `HookedRootModule` in `HookedVLM`'s bases (its ``super()`` calls are TL's)."""

    def _check_hook_name(self, name: str | Callable) -> None:
        if isinstance(name, str):
            if name not in self.hook_dict:
                raise unknown_hook_error(name, self.hook_dict)
        elif callable(name):
            if not any(name(n) for n in self.hook_dict):
                raise UnknownHookError(f"the hook-name filter {name!r} matches no hook point")
        else:
            raise TypeError(f"a hook name must be a str or a callable filter, got {type(name).__name__}")

    def _enable_hook(self, name, hook, dir):
        self._check_hook_name(name)
        super()._enable_hook(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        """As TransformerLens, except that a temporary hook added inside a ``hooks()`` /
        ``run_with_hooks`` / ``run_with_cache`` context (e.g. by another hook) belongs to
        that context and is removed when it exits."""
        self._check_hook_name(name)
        if level is None and not is_permanent and self.context_level > 0:
            level = self.context_level
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """TransformerLens' ``hooks()`` context; ``fwd_hooks`` / ``bwd_hooks`` must be lists of
        ``(hook_name_or_filter, fn)`` pairs (a `TypeError` says so otherwise)."""
        fwd_hooks = check_hook_list(fwd_hooks, "fwd_hooks")
        bwd_hooks = check_hook_list(bwd_hooks, "bwd_hooks")
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            yield model

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        if isinstance(names_filter, str):
            self._check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for n in names_filter:
                self._check_hook_name(n)
            names_filter = list(names_filter)
        elif names_filter is not None:
            self._check_hook_name(names_filter)
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    def run_with_cache(self, *model_args, return_cache_object: bool = True, **kwargs):
        """As TransformerLens: returns ``(output, cache)``; the cache is a `VLMActivationCache`
        (TL's ``ActivationCache``: ``cache["pattern", l]``, ``stack_activation``,
        ``accumulated_resid``, ..., plus the image-token rows of ``hook_image_embeds``).
        ``incl_bwd=True`` needs a scalar output (``return_type="loss"``)."""
        rows: list[Tensor] = []
        n_rows: list[int] = []

        def image_rows(ids, hook):
            n_rows.append(ids.shape[0])
            if self.cfg.image_token_id is not None:
                rows.append((ids == self.cfg.image_token_id).nonzero()[:, 0].cpu())

        if kwargs.get("remove_batch_dim") and model_args and isinstance(model_args[0], Mapping):
            n = model_args[0]["input_ids"].shape[0]
            assert n == 1, f"Cannot remove batch dimension from cache with batch size {n}"
        with self.hooks(fwd_hooks=[("hook_tokens", image_rows)]):
            out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        embeds = cache_dict.get(IMAGE_EMBEDS)
        if embeds is not None and embeds.ndim == 1:  # remove_batch_dim took a lone image token for a batch
            cache_dict[IMAGE_EMBEDS] = embeds[None]
        if return_cache_object:
            return out, VLMActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False),
                                           image_token_rows=rows[0] if rows and embeds is not None else None,
                                           batch_size=n_rows[0] if n_rows and not kwargs.get("remove_batch_dim") else None)
        return out, cache_dict
