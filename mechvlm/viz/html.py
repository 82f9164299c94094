"""HTML plumbing: circuitsvis widgets that share one JS bundle per page.

circuitsvis' own ``RenderedHTML.local_src`` inlines its 1.3 MB bundle in every widget,
emits a self-closing ``<div .../>`` (a second widget then nests inside the first and
vanishes) and runs the bundle as a ``type="module"`` script. Here the bundle is
written once per page as a classic ``<script>`` (its ``var CircuitsVis`` becomes a
global), every widget is an explicitly closed ``<div>`` followed by a small script that
calls ``CircuitsVis.render`` (waiting for the global when a notebook inserts the
scripts out of order). Nothing is fetched from a CDN: pages work offline.

- `Widget`: one circuitsvis component with its props; ``_repr_html_`` is standalone
  (bundle + widget), `Widget.fragment` is the widget alone.
- `Page`: collects widgets, matplotlib figures (as PNG ``<img>``), images, headings and
  text; ``save(path)`` writes one self-contained HTML file with the bundle once;
  ``_repr_html_`` shows the same in Jupyter.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Widget", "Page", "HTMLFragment", "circuitsvis_bundle", "figure_to_png", "figure_to_img_html",
           "image_to_img_html", "props_json"]


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The installed circuitsvis browser bundle (``dist/cdn/iife.js``), safe to inline.

    ``</script`` is written ``<\\/script`` (the same string for JavaScript, but it no
    longer ends the inline script element); circuitsvis itself deletes it instead.
    """
    try:
        import circuitsvis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("mechvlm.viz widgets need circuitsvis: pip install 'mechvlm[viz]'") from e
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = js.replace("</script", "<\\/script").replace("<!--", "<\\!--")
    # the source map is not shipped inline; drop the comment pointing at it
    return js.replace("//# sourceMappingURL=iife.js.map", "")


def bundle_script() -> str:
    return f'<script data-mechvlm="circuitsvis-bundle">{circuitsvis_bundle()}</script>'


def _js_safe(value: Any) -> Any:
    """Lists / floats for JSON: tensors and arrays become lists, NaN / inf become None."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _js_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_js_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _js_safe(value.item())
    return value


def props_json(props: dict) -> str:
    """JSON for an inline script: None props dropped, and ``< > &`` U+2028/9 escaped so
    that no string (a token such as ``</script>``) can end the script element."""
    clean = {k: _js_safe(v) for k, v in props.items() if v is not None}
    s = json.dumps(clean, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class Widget:
    """One circuitsvis component (``"AttentionHeads"``, ``"AttentionPattern"``,
    ``"ColoredTokens"``, ...) with its props, rendered from the local bundle.

    ``title`` (plain text) is shown above the widget. ``_repr_html_`` includes the bundle
    (a widget shown on its own); put several widgets in a `Page` to include it once.
    """

    def __init__(self, component: str, props: dict, *, title: str | None = None):
        self.component = component
        self.props = props
        self.title = title
        self.id = "mechvlm-cv-" + uuid.uuid4().hex[:12]

    def fragment(self) -> str:
        """The widget's ``<div>`` (explicitly closed) and its render call, no bundle."""
        head = f'<h4 class="mechvlm-title">{html.escape(self.title)}</h4>' if self.title else ""
        call = (f'(function(){{var p={props_json(self.props)};'
                f'function go(){{if(!window.CircuitsVis){{setTimeout(go,20);return;}}'
                f'window.CircuitsVis.render("{self.id}",window.CircuitsVis.{self.component},p);}}go();}})();')
        return (f'<div class="mechvlm-widget" data-component="{self.component}">{head}'
                f'<div id="{self.id}" style="margin: 15px 0;"></div><script>{call}</script></div>')

    def _repr_html_(self) -> str:
        return bundle_script() + self.fragment()

    def save(self, path: str | Path, title: str | None = None) -> Path:
        return Page(title or self.title or "mechvlm").add(self).save(path)

    def __repr__(self) -> str:
        return f"Widget({self.component!r}, props={sorted(k for k, v in self.props.items() if v is not None)})"


class HTMLFragment:
    """Trusted HTML (an ``<img>``, a table) for a `Page` or a notebook cell."""

    def __init__(self, html_text: str):
        self.html = html_text

    def fragment(self) -> str:
        return self.html

    def _repr_html_(self) -> str:
        return self.html


def figure_to_png(fig, dpi: int | None = None) -> bytes:
    """PNG bytes of a matplotlib figure (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _img_tag(png: bytes, alt: str, extra: str = "") -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}"{extra} style="max-width: 100%;">'


def figure_to_img_html(fig, *, alt: str = "figure", dpi: int | None = None, close: bool = False) -> str:
    """An embeddable ``<img>`` (base64 PNG) of a matplotlib figure."""
    out = _img_tag(figure_to_png(fig, dpi), alt, ' class="mechvlm-figure"')
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


def image_to_img_html(image, *, alt: str = "image") -> str:
    """An ``<img>`` of a PIL image or an ``[H, W(, 3|4)]`` uint8 / float-in-[0,1] array."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _img_tag(buf.getvalue(), alt, ' class="mechvlm-image"')


_STYLE = ("<style>.mechvlm-page{font-family:system-ui,sans-serif;max-width:1100px;margin:0 auto;padding:8px}"
          ".mechvlm-page h2,.mechvlm-page h3{margin:18px 0 6px}.mechvlm-title{margin:10px 0 2px}"
          ".mechvlm-table{border-collapse:collapse}.mechvlm-table td,.mechvlm-table th"
          "{border:1px solid #ccc;padding:3px 8px;text-align:right}</style>")


class Page:
    """A page of widgets, figures, images and text, with the circuitsvis bundle once.

    >>> page = Page("layer 3").add(attention_heads(cache, roles, layer=3))
    >>> page.add(fig_attention_share(result)).save("report.html")

    `add` takes a `Widget`, a matplotlib ``Figure`` (embedded as a PNG ``<img>`` at add
    time), an object with ``fragment()`` or ``_repr_html_()``, or a string (shown as
    escaped text; use `add_html` for trusted markup).
    """

    def __init__(self, title: str = "mechvlm"):
        self.title = title
        self.items: list[str] = []
        self.n_widgets = 0

    def add(self, item, *, title: str | None = None, alt: str | None = None) -> "Page":
        if title:
            self.add_heading(title, level=3)
        if isinstance(item, Widget):
            self.n_widgets += 1
            self.items.append(item.fragment())
        elif hasattr(item, "savefig"):  # matplotlib Figure
            self.items.append(figure_to_img_html(item, alt=alt or title or "figure"))
        elif hasattr(item, "fragment"):
            self.items.append(item.fragment())
        elif hasattr(item, "_repr_html_"):
            self.items.append(item._repr_html_())
        elif isinstance(item, str):
            self.add_text(item)
        else:
            raise TypeError(f"a Page cannot show a {type(item).__name__}")
        return self

    def add_heading(self, text: str, level: int = 2) -> "Page":
        self.items.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def add_text(self, text: str) -> "Page":
        self.items.append(f"<p>{html.escape(text)}</p>")
        return self

    def add_html(self, markup: str) -> "Page":
        """Trusted markup, inserted as is."""
        self.items.append(markup)
        return self

    def add_image(self, image, *, alt: str = "image") -> "Page":
        self.items.append(image_to_img_html(image, alt=alt))
        return self

    def body(self) -> str:
        return f'<div class="mechvlm-page">{"".join(self.items)}</div>'

    def _repr_html_(self) -> str:
        bundle = bundle_script() if self.n_widgets else ""
        return _STYLE + bundle + self.body()

    def html(self) -> str:
        """A complete, self-contained HTML document (no network needed)."""
        bundle = bundle_script() if self.n_widgets else ""
        return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"{_STYLE}{bundle}</head><body><h2>{html.escape(self.title)}</h2>{self.body()}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write the page (atomically: a temporary file renamed into place)."""
        from mechvlm.fileio import write_text

        return write_text(path, self.html())
