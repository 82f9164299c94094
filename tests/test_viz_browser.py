"""A saved viz page rendered by headless Chromium with the network disabled.

The page holds two circuitsvis attention widgets and one attention-on-image heatmap.
A probe script (added by the test only) waits, then reads back from the live DOM: per
widget, its canvases and how many of their pixels carry the pattern's colour (read with
``getImageData``), the token labels in the DOM, whether a widget sits inside another
one; the decoded ``<img>`` sizes; the resources the page fetched. Chromium's
``--dump-dom`` after a virtual-time budget returns it as JSON.

A control page (the same widgets without the bundle) must come out blank, so the probe
can tell drawn from not drawn.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")
pytest.importorskip("circuitsvis", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from conftest import qwen_batch  # noqa: E402
from PIL import Image  # noqa: E402
from viz_helpers import force_text_to_cell, image_with_square  # noqa: E402

from mechvlm import viz  # noqa: E402

CHROMIUM = os.environ.get("MECHVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")

# Installed before the bundle: records every string drawn on a canvas (chart.js draws the
# axis labels with fillText), keyed by the canvas element.
RECORD_TEXT = """<script>
window.__drawn = new Map();
(function () {
  var orig = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text) {
    var l = window.__drawn.get(this.canvas) || [];
    l.push(String(text)); window.__drawn.set(this.canvas, l);
    return orig.apply(this, arguments);
  };
})();
</script>"""

PROBE = """<script>
setTimeout(function () {
  function stats(c) {
    var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, ink = 0, col = 0;
    for (var i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      if (d[i] < 245 || d[i + 1] < 245 || d[i + 2] < 245) ink++;
      if (d[i + 2] > d[i] + 30 && d[i + 2] > d[i + 1] + 30) col++;   // the pattern's blue
    }
    return {w: c.width, h: c.height, ink: ink, colored: col};
  }
  var out = {widgets: [], images: [], bundles: 0, resources: []};
  out.bundles = document.querySelectorAll('script[data-mechvlm="circuitsvis-bundle"]').length;
  document.querySelectorAll('.mechvlm-widget').forEach(function (w) {
    var cs = [], drawn = [];
    w.querySelectorAll('canvas').forEach(function (c) {
      cs.push(stats(c)); drawn = drawn.concat(window.__drawn ? (window.__drawn.get(c) || []) : []);
    });
    out.widgets.push({component: w.dataset.component, canvases: cs, text: w.innerText, drawn: drawn,
                      nested: !!w.parentElement.closest('.mechvlm-widget')});
  });
  document.querySelectorAll('img').forEach(function (im) {
    var c = document.createElement('canvas'); c.width = im.naturalWidth; c.height = im.naturalHeight;
    var s = null;
    if (im.complete && im.naturalWidth) { c.getContext('2d').drawImage(im, 0, 0); s = stats(c); }
    out.images.push({complete: im.complete, w: im.naturalWidth, h: im.naturalHeight, stats: s});
  });
  out.resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 1500);
</script>"""


def chromium_probe(page_html: str, tmp_path: Path, name: str) -> dict:
    path = tmp_path / f"{name}.html"
    path.write_text(page_html.replace("<head>", "<head>" + RECORD_TEXT, 1), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync",
           f"--user-data-dir={tmp_path / ('profile-' + name)}",
           # no network: every host name fails to resolve and every proxied request fails
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--proxy-bypass-list=<-loopback>",
           "--window-size=1200,2400", "--virtual-time-budget=8000", "--dump-dom", path.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"no probe output (rc {res.returncode}); stderr tail: {res.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def page_parts(qwen_model):
    batch = qwen_batch([[4, (1, 8, 12), 6]], seed=1)  # one image, merged grid 4 x 6
    roles, cache, _ = force_text_to_cell(qwen_model, batch, layer=1, image=0, cell=(2, 4))
    image, square = image_with_square(250, 170, (4, 6), (2, 4))
    widgets = [viz.attention_heads(cache, roles, layer=1, input_ids=batch["input_ids"]),
               viz.attention_heads(cache, roles, layer=2, heads=[0, 1], collapse_images=False)]
    fig = viz.attention_on_image(cache, roles, [image], layer=1, cfg=qwen_model.cfg, cmap="viridis")
    png = viz.figure_to_png(fig)
    return widgets, fig, png, qwen_model.cfg.n_heads


def test_two_widgets_and_heatmap_draw_offline(page_parts, tmp_path):
    widgets, fig, png, n_heads = page_parts
    page = viz.Page("browser test")
    for w in widgets:
        page.add(w)
    page.add(fig, title="attention on the image")
    page.add_html(PROBE)
    out = chromium_probe(page.html(), tmp_path, "page")

    assert out["bundles"] == 1
    assert [r for r in out["resources"] if not r.startswith("data:")] == []  # nothing fetched
    assert [w["component"] for w in out["widgets"]] == ["AttentionHeads", "AttentionHeads"]
    for w, heads in zip(out["widgets"], (n_heads, 2)):
        assert not w["nested"]
        # one thumbnail per head plus the zoomed pattern, every one drawn with the pattern colour
        assert len(w["canvases"]) == heads + 1, w["canvases"]
        assert all(c["w"] > 0 and c["colored"] > 0 for c in w["canvases"]), w["canvases"]
        assert w["canvases"][-1]["colored"] > 1000  # the zoomed pattern
    # the head names are DOM text; the token labels are drawn on the zoomed canvas (axis ticks,
    # whitespace stripped and the position appended by circuitsvis)
    collapsed, expanded = out["widgets"]
    assert "L1H3" in collapsed["text"] and "L2H1" in expanded["text"]
    assert "\u2039image4\u00d76\u203a (5)" in collapsed["drawn"] and "\u2039EOI\u203a (6)" in collapsed["drawn"]
    assert not any("\u2039img" in t for t in collapsed["drawn"])
    assert "\u2039img3,5\u203a (28)" in expanded["drawn"] and "\u2039BOI\u203a (4)" in expanded["drawn"]
    assert "Source Token" in expanded["drawn"]

    (img,) = out["images"]
    pw, ph = Image.open(io.BytesIO(png)).size
    assert img["complete"] and (img["w"], img["h"]) == (pw, ph)
    assert img["stats"]["ink"] > 0.2 * pw * ph  # decoded and drawn, not an empty frame


def test_heatmap_png_peak_on_square(page_parts):
    """The embedded PNG itself: inside the image panel, the hot colour over the white square
    sits where the square is (cell (2, 4) of the 4 x 6 grid, centre at 75% / 62.5%)."""
    widgets, fig, png, _ = page_parts
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float) / 255
    # the panel's pixels in the PNG: savefig(bbox_inches="tight") crops the figure to its
    # tight bbox plus pad_inches (0.1 in)
    dpi = fig.dpi
    tight = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    ox, top = (tight.x0 - 0.1) * dpi, (tight.y1 + 0.1) * dpi
    bb = fig.axes[0].get_window_extent()  # display pixels, origin bottom left
    x0, x1 = int(np.ceil(bb.x0 - ox)), int(np.floor(bb.x1 - ox))
    y0, y1 = int(np.ceil(top - bb.y1)), int(np.floor(top - bb.y0))
    panel = arr[y0:y1, x0:x1]
    hot = 0.45 + 0.55 * np.asarray(matplotlib.colormaps["viridis"](1.0)[:3])
    ys, xs = np.nonzero(np.abs(panel - hot).max(-1) < 0.05)
    assert len(xs) > 50
    h, w = panel.shape[:2]
    assert (xs / w).min() > 4.25 / 6 - 0.02 and (xs / w).max() < 4.75 / 6 + 0.02  # the square's columns
    assert (ys / h).min() > 2.25 / 4 - 0.02 and (ys / h).max() < 2.75 / 4 + 0.02  # and rows
    assert xs.mean() / w == pytest.approx(0.75, abs=0.02) and ys.mean() / h == pytest.approx(0.625, abs=0.02)


def test_probe_detects_a_blank_page(page_parts, tmp_path):
    """Control: the same widgets without the bundle render nothing, and the probe says so."""
    widgets, *_ = page_parts
    body = "".join(w.fragment() for w in widgets)
    doc = f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{body}{PROBE}</body></html>'
    out = chromium_probe(doc, tmp_path, "blank")
    assert out["bundles"] == 0
    assert [len(w["canvases"]) for w in out["widgets"]] == [0, 0]
    assert all("\u2039" not in w["text"] for w in out["widgets"])


def test_notebook_style_insertion_renders(page_parts, tmp_path):
    """``_repr_html_`` as JupyterLab shows it: assigned to ``innerHTML`` of an output area,
    then every script re-created so that it runs (JupyterLab's evalInnerHTMLScriptTags).
    Two outputs: a Page with two widgets (bundle once) and a lone widget (own bundle)."""
    widgets, *_ = page_parts
    page = viz.Page("cell 1")
    for w in widgets:
        page.add(w)
    lone = viz.attention_pattern(widgets[0].props["attention"][0], labels=[
        t.replace("\u2039", "<").replace("\u203a", ">") for t in widgets[0].props["tokens"]])
    outputs = [page._repr_html_(), lone._repr_html_()]
    assert outputs[0].count('data-mechvlm="circuitsvis-bundle"') == 1

    def js_string(s: str) -> str:
        return json.dumps(s).replace("</", "<\\/").replace("<!--", "<\\!--")

    inserter = "<script>\n" + "".join(
        f"(function(){{var host=document.getElementById('out{i}');host.innerHTML={js_string(h)};"
        "Array.from(host.getElementsByTagName('script')).forEach(function(s){"
        "var c=document.createElement('script');c.textContent=s.textContent;"
        "s.parentNode.replaceChild(c,s);});})();\n" for i, h in enumerate(outputs)) + "</script>"
    doc = ('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
           f'<div id="out0"></div><div id="out1"></div>{inserter}{PROBE}</body></html>')
    out = chromium_probe(doc, tmp_path, "notebook")
    assert [w["component"] for w in out["widgets"]] == ["AttentionHeads", "AttentionHeads", "AttentionPattern"]
    assert not any(w["nested"] for w in out["widgets"])
    for w in out["widgets"]:
        assert w["canvases"] and w["canvases"][-1]["colored"] > 1000, w["canvases"]
    assert "\u2039image4\u00d76\u203a (5)" in out["widgets"][2]["drawn"]
