"""Readable token labels from token roles: ``<img 3,5>``, ``<EOI>``, ``<BOI>``, text.

circuitsvis shows a token string twice: as HTML (the token buttons, via innerHTML) and
as canvas text (the axis labels of a pattern). HTML entities would appear literally on
the canvas and raw ``<``/``>`` would become elements in the buttons (``<|image_pad|>``
or ``<img 3,5>`` vanish). So labels meant for widgets are made *HTML-safe* with
look-alike characters: ``<`` -> ``‹``, ``>`` -> ``›``, ``&`` -> ``＆``. Whitespace is
made visible (``\\n`` -> ``↵``, tab -> ``⇥``, space -> ``·`` for a token that is only
spaces) because circuitsvis strips whitespace from axis labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mechvlm.roles import TokenRoles

__all__ = ["html_safe", "token_labels", "image_label", "row_spans"]

_SAFE = str.maketrans({"<": "\u2039", ">": "\u203a", "&": "\uff06", "\n": "\u21b5", "\r": "\u240d",
                       "\t": "\u21e5"})


def html_safe(label: str) -> str:
    """A label that reads the same as HTML and as canvas text (see the module doc)."""
    out = label.translate(_SAFE)
    if out.strip() == "":
        out = "\u00b7" * max(1, len(out))
    return out


def row_spans(roles: TokenRoles, batch_index: int = 0):
    """The image spans of one batch row, in sequence order."""
    return sorted((s for s in roles.spans if s.row == batch_index), key=lambda s: s.start)


def image_label(span, *, several: bool) -> str:
    t, h, w = span.grid
    kind = getattr(span, "modality", "image")
    name = f"{kind} {span.image}" if several else kind
    if getattr(span, "views", ()):
        return f"<{name} {span.n_tokens} tokens>"
    return f"<{name} {h}\u00d7{w}>" if t == 1 else f"<{name} {t}\u00d7{h}\u00d7{w}>"


def _decode(tokenizer, tok: int) -> str:
    if hasattr(tokenizer, "decode"):
        return tokenizer.decode([tok])
    if callable(tokenizer):
        return str(tokenizer(tok))
    return str(tokenizer[tok])  # a list / dict id -> string


def token_labels(roles: TokenRoles, input_ids: Tensor | Sequence[int] | None = None, *,
                 tokenizer=None, batch_index: int = 0, safe: bool = True) -> list[str]:
    """One label per position of row ``batch_index`` (padding included, as ``<pad>``).

    Image tokens: ``<img r,c>`` (merged-grid row, column); ``<img2 r,c>`` when the row
    holds several images (the image's index in feature order); ``<img t,r,c>`` for a
    grid with several frames; video tokens ``<vid t,r,c>``; anyres tokens
    ``<img b r,c>`` (overview) / ``<img t3 r,c>`` (tile 3, row and column within it) and
    ``<img nl>`` (a newline token), ``<img cls>`` (a kept CLS token). ``<EOI>``,
    ``<BOI>``, ``<BOS>``. Other tokens: decoded by
    ``tokenizer`` (anything with ``decode``, a callable id -> str, or a list/dict), else
    the token id, else ``#pos`` when no ``input_ids`` are given. ``safe`` applies
    `html_safe` (needed for circuitsvis widgets; matplotlib wants ``safe=False``).
    """
    n = roles.shape[1]
    ids = None
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        ids = (ids[batch_index] if ids.ndim == 2 else ids).tolist()
        if len(ids) != n:
            raise ValueError(f"input_ids have {len(ids)} positions, roles {n}")
    several = len(row_spans(roles, batch_index)) > 1
    cols = {k: getattr(roles, k)[batch_index].tolist() for k in
            ("image", "video", "newline", "eoi", "image_start", "bos", "pad", "image_index", "grid_t", "grid_tile",
             "grid_row", "grid_col")}
    span_at = {p: s for s in row_spans(roles, batch_index) for p in range(s.start, s.stop)}
    out = []
    for p in range(n):
        if cols["image"][p]:
            s = span_at.get(p)
            i = cols["image_index"][p]
            tag = ("vid" if cols["video"][p] else "img") + (f"{i}" if several else "")
            rc = f"{cols['grid_row'][p]},{cols['grid_col'][p]}"
            if cols["newline"][p]:
                lab = f"<{tag} nl>"
            elif cols["grid_row"][p] < 0:
                lab = f"<{tag} cls>"
            elif s is not None and s.views:
                tile = cols["grid_tile"][p]
                lab = f"<{tag} {'b' if tile == 0 else f't{tile}'} {rc}>"
            elif s is not None and s.grid[0] > 1:
                lab = f"<{tag} {cols['grid_t'][p]},{rc}>"
            else:
                lab = f"<{tag} {rc}>"
        elif cols["eoi"][p]:
            lab = "<EOI>"
        elif cols["image_start"][p]:
            lab = "<BOI>"
        elif cols["bos"][p]:
            lab = "<BOS>"
        elif cols["pad"][p]:
            lab = "<pad>"
        elif ids is not None:
            lab = _decode(tokenizer, ids[p]) if tokenizer is not None else str(ids[p])
        else:
            lab = f"#{p}"
        out.append(html_safe(lab) if safe else lab)
    return out
