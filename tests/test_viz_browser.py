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


def chromium_probe(page_html: str, tmp_path: Path, name: str, window: str = "1200,2400") -> dict:
    path = tmp_path / f"{name}.html"
    path.write_text(page_html.replace("<head>", "<head>" + RECORD_TEXT, 1), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync",
           f"--user-data-dir={tmp_path / ('profile-' + name)}",
           # no network: every host name fails to resolve and every proxied request fails
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
           "--proxy-bypass-list=<-loopback>",
           f"--window-size={window}", "--virtual-time-budget=8000", "--dump-dom", path.as_uri()]
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


# ------------------------------------------------------------------- the report page --
# Measured in the live layout: every visible text fragment (a text node's line boxes, from
# Range.getClientRects), every <img>, the rows of every data-table, and the figures' own
# text layout (measured on the figure's renderer when it was drawn: a PNG's text is not in
# the DOM). Overlaps: two fragments of different text nodes, or a fragment and an image,
# whose boxes intersect by more than 1 px in both directions.
PAGE_PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var frags = [], walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT), node, id = 0;
  while ((node = walker.nextNode())) {
    var p = node.parentElement;
    if (!node.textContent.trim() || p.closest('script,style,title')) continue;
    if (!p.checkVisibility({contentVisibilityAuto: true, visibilityProperty: true})) continue;  // closed <details>
    var r = document.createRange(); r.selectNodeContents(node); id++;
    Array.from(r.getClientRects()).forEach(function (b) {
      if (b.width > 0.5 && b.height > 0.5)
        frags.push({id: id, t: node.textContent.trim().slice(0, 40), x0: b.left, y0: b.top + scrollY,
                    x1: b.right, y1: b.bottom + scrollY});
    });
  }
  var imgs = Array.from(document.images).map(function (im) {
    var b = im.getBoundingClientRect();
    return {ok: im.complete && im.naturalWidth > 0, alt: im.alt.slice(0, 60), x0: b.left, y0: b.top + scrollY,
            x1: b.right, y1: b.bottom + scrollY, w: b.width, nw: im.naturalWidth};
  });
  function hit(a, b) {
    return Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0) > 1 && Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0) > 1;
  }
  var overlaps = [];
  for (var i = 0; i < frags.length; i++) {
    for (var j = i + 1; j < frags.length; j++)
      if (frags[i].id !== frags[j].id && hit(frags[i], frags[j])) overlaps.push([frags[i].t, frags[j].t]);
    imgs.forEach(function (im) { if (hit(frags[i], im)) overlaps.push([frags[i].t, 'img ' + im.alt]); });
  }
  for (var a = 0; a < imgs.length; a++)
    for (var b = a + 1; b < imgs.length; b++) if (hit(imgs[a], imgs[b])) overlaps.push([imgs[a].alt, imgs[b].alt]);
  var tables = {};
  document.querySelectorAll('table[data-table]').forEach(function (t) {
    tables[t.dataset.table] = t.querySelectorAll('tbody > tr').length;
  });
  var figures = Array.from(document.querySelectorAll('figure[data-figure]')).map(function (f) {
    return {name: f.dataset.figure, boxes: +f.dataset.textBoxes, problems: +f.dataset.layoutProblems};
  });
  var out = {n_fragments: frags.length, overlaps: overlaps.slice(0, 20), n_overlaps: overlaps.length,
             images: imgs, tables: tables, figures: figures, page_width: document.documentElement.scrollWidth,
             window_width: window.innerWidth,
             resources: performance.getEntriesByType('resource').map(function (e) { return e.name; })};
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 300); });
</script>"""


def report_probe(page_html: str, tmp_path: Path, name: str, width: int = 1200) -> dict:
    doc = page_html.replace("</body>", PAGE_PROBE + "</body>", 1)
    return chromium_probe(doc, tmp_path, name, window=f"{width},2400")


def _check_report_page(out: dict, labels: list[str], n_conditions: int, n_examples: int) -> None:
    assert out["n_fragments"] > 200
    assert out["n_overlaps"] == 0, out["overlaps"]
    assert out["images"] and all(im["ok"] for im in out["images"]), [im for im in out["images"] if not im["ok"]]
    assert all(im["x1"] <= out["window_width"] + 1 for im in out["images"])  # scaled into the page
    assert out["page_width"] <= out["window_width"]  # no horizontal scrolling
    assert [r for r in out["resources"] if not r.startswith("data:")] == []
    t, m = out["tables"], len(labels)
    assert t["table1"] == 2 * m  # model x knockout mode
    assert t["outputs"] == t["per_category"] == t["circular"] == m * n_conditions
    assert t["seed000_table1"] == 4 and t["run_info"] >= 6
    for label in labels:
        assert t[f"share:{label}"] == t[f"received:{label}"] == 4  # the toys' layers
    ex = [k for k in t if k.startswith("example_outputs:")]
    assert len(ex) == m * n_examples and all(t[k] == n_conditions for k in ex)
    figs = out["figures"]
    assert len(figs) == 1 + 2 * m + m * n_examples
    assert all(f["boxes"] > 5 and f["problems"] == 0 for f in figs), figs


@pytest.fixture(scope="module")
def toy_report():
    from report_helpers import toy_runs

    return toy_runs()


def test_report_page_renders_cleanly(toy_report, tmp_path):
    """The page `mechvlm report` writes for the two shipped toys, as Chromium lays it out."""
    from mechvlm.mmbench.conditions import CONDITIONS
    from mechvlm.report.render import write_outputs

    cfg, items, runs, info = toy_report
    write_outputs(runs, cfg, items, tmp_path / "report", info)
    out = report_probe((tmp_path / "report" / "report.html").read_text(encoding="utf-8"), tmp_path, "report2")
    _check_report_page(out, [r.label for r in runs], len(CONDITIONS), len(runs[0].examples))


@pytest.mark.parametrize("width", [1200, 800])
def test_report_page_with_four_models_renders_cleanly(toy_report, tmp_path, width):
    from report_helpers import relabelled

    from mechvlm.mmbench.conditions import CONDITIONS
    from mechvlm.report.page import build_page

    cfg, items, runs, info = toy_report
    labels = ["Qwen2.5-VL-7B-Instruct", "gemma-3-12b-it-long-checkpoint-name", "Qwen2.5-VL-3B-Instruct",
              "gemma-3-4b-it"]
    page = build_page(relabelled(runs, labels), n_items=len(items), tsv="MMBench_DEV_EN.tsv", info=info)
    out = report_probe(page.html(), tmp_path, f"report4-{width}", width=width)
    _check_report_page(out, labels, len(CONDITIONS), len(runs[0].examples))


def test_page_probe_sees_overlapping_text_and_broken_images(tmp_path):
    """Control: the probe reports text drawn over text, text over an image, and an image that
    does not decode."""
    doc = ('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
           '<p style="position:absolute;top:10px;left:10px">first text</p>'
           '<p style="position:absolute;top:14px;left:20px">second text</p>'
           '<img alt="broken" src="data:image/png;base64,AAAA" style="width:50px;height:50px">'
           '<table data-table="t"><tbody><tr><td>a</td></tr><tr><td>b</td></tr></tbody></table></body></html>')
    out = report_probe(doc, tmp_path, "control")
    assert ["first text", "second text"] in out["overlaps"]
    assert [im["ok"] for im in out["images"]] == [False]
    assert out["tables"] == {"t": 2}
