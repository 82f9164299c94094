"""Does any text of a matplotlib figure overlap other text, or does a legend cover the data?

Measured on the figure's own renderer (Agg, the one that rasterises the PNG a `Page`
embeds), so the boxes are exactly those of the pixels shown: a browser cannot read text
inside a PNG, and an SVG with live ``<text>`` would be laid out again with whatever font
the browser finds, so the figure checks live here and the page's HTML text is checked in
the browser (``tests/test_viz_browser.py``).

- `text_boxes`: every visible, non-empty text artist of the figure (titles, axis labels,
  tick labels, legend entries, annotations, colour-bar labels) with its display box.
- `text_overlaps`: pairs of those whose boxes intersect (by more than ``tolerance`` px).
- `legend_overlaps`: legends whose box intersects a bar, patch or line vertex of the
  axes they belong to (a legend covering the bars).
- `layout_problems`: both, as readable strings (``[]`` when the figure is clean);
  `measure_layout` gives the boxes and the problems from one draw.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TextBox", "text_boxes", "text_overlaps", "legend_overlaps", "layout_problems", "measure_layout"]


@dataclass(frozen=True)
class TextBox:
    """A text artist's display box in pixels (origin bottom left), and its text."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: "TextBox") -> float:
        """The smaller side of the intersection rectangle (0 when disjoint)."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, min(w, h))


def _drawn_texts(fig) -> list:
    """Draw ``fig`` once (laying it out as savefig does) and return the text artists the
    renderer actually drew (ticks outside the view limits, empty and invisible texts are
    not drawn), in drawing order."""
    renderer = fig.canvas.get_renderer()
    drawn: list = []
    draw_text = renderer.draw_text

    def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if mtext is not None and all(m is not mtext for m in drawn):
            drawn.append(mtext)
        return draw_text(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = record
    try:
        fig.canvas.draw()
    finally:
        del renderer.draw_text
    return drawn


def _boxes(fig, texts) -> list[TextBox]:
    renderer = fig.canvas.get_renderer()
    out = []
    for t in texts:
        if not t.get_text().strip():
            continue
        bb = t.get_window_extent(renderer)
        if bb.width > 0 and bb.height > 0:
            out.append(TextBox(t.get_text(), bb.x0, bb.y0, bb.x1, bb.y1))
    return out


def text_boxes(fig) -> list[TextBox]:
    """The text artists ``fig`` draws, with their boxes (display pixels)."""
    return _boxes(fig, _drawn_texts(fig))


def _pairs(boxes: list[TextBox], tolerance: float) -> list[tuple[TextBox, TextBox]]:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlap(b) > tolerance]


def text_overlaps(fig, tolerance: float = 0.5) -> list[tuple[TextBox, TextBox]]:
    """Pairs of text boxes of ``fig`` that intersect by more than ``tolerance`` pixels."""
    return _pairs(text_boxes(fig), tolerance)


def _legend_hits(fig, tolerance: float) -> list[tuple[str, str]]:
    from matplotlib.patches import Rectangle

    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or not leg.get_visible():
            continue
        lb = leg.get_window_extent(renderer)
        for p in ax.patches:
            if not isinstance(p, Rectangle) or p.get_height() == 0 or not p.get_visible():
                continue
            pb = p.get_window_extent(renderer)
            w = min(lb.x1, pb.x1) - max(lb.x0, pb.x0)
            h = min(lb.y1, pb.y1) - max(lb.y0, pb.y0)
            if min(w, h) > tolerance:
                out.append((ax.get_title() or "legend", f"bar at x={p.get_x():.2f}"))
        for line in ax.get_lines():
            xy = ax.transData.transform(line.get_xydata())
            inside = ((xy[:, 0] > lb.x0 + tolerance) & (xy[:, 0] < lb.x1 - tolerance)
                      & (xy[:, 1] > lb.y0 + tolerance) & (xy[:, 1] < lb.y1 - tolerance))
            if inside.any():
                out.append((ax.get_title() or "legend", f"line {line.get_label()!r}"))
    return out


def legend_overlaps(fig, tolerance: float = 0.5) -> list[tuple[str, str]]:
    """``(axes title, what)`` for each legend that covers a bar or a plotted point of its
    own axes."""
    fig.canvas.draw()
    return _legend_hits(fig, tolerance)


def measure_layout(fig, tolerance: float = 0.5) -> tuple[list[TextBox], list[str]]:
    """One draw: ``(text boxes, problems)``, problems as in `layout_problems`."""
    boxes = text_boxes(fig)
    msgs = [f"text {a.text!r} overlaps {b.text!r}" for a, b in _pairs(boxes, tolerance)]
    msgs += [f"legend of {ax!r} covers a {what}" for ax, what in _legend_hits(fig, tolerance)]
    return boxes, msgs


def layout_problems(fig, tolerance: float = 0.5) -> list[str]:
    """Readable descriptions of every text overlap and covering legend of ``fig``."""
    return measure_layout(fig, tolerance)[1]
