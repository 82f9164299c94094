#!/usr/bin/env python
"""Regenerate the figures of docs/img/ from tiny random models (deterministic, CPU, ~1 min).

    PYTHONPATH=. python scripts/make_figures.py [--out docs/img] [--no-browser]

Tiny Qwen2.5-VL and Gemma3 models with random weights (drawn from fixed seeds) read
synthetic images through the real HF image processors; the figures show what
mechvlm.viz draws, not findings about real checkpoints. The knockout figure uses the
numbers published in seed 000 (Table 1) as an example input: mechvlm has no MMBench
evaluation yet. With Chromium installed, a screenshot of a widget page is added.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mechvlm import HookedVLM, viz  # noqa: E402
from mechvlm.synthetic import gemma3_config, gemma3_prompt, qwen2_5_vl_config, qwen_prompt  # noqa: E402

TABLE1 = {  # seed 000, Table 1: MMBench accuracy (std over items)
    "Gemma3 4B": {"none": (.356, .479), "text\u2192img": (.169, .375), "text\u2192EOI": (.224, .418)},
    "Gemma3 12B": {"none": (.388, .487), "text\u2192img": (.277, .447), "text\u2192EOI": (.270, .444)},
    "Qwen2.5-VL 3B": {"none": (.392, .488), "text\u2192img": (.176, .381), "text\u2192EOI": (.207, .405)},
    "Qwen2.5-VL 7B": {"none": (.410, .492), "text\u2192img": (.086, .281), "text\u2192EOI": (.001, .026)},
}


def randomize_(model, seed: int, gemma: bool):
    """Weights with a larger spread than HF's init, so that attention is not uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and p.ndim == 1:
                p.copy_(0.3 * noise if gemma else 1 + 0.2 * noise)
            elif gemma and "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def scene(seed: int, size=(336, 224)) -> Image.Image:
    """A synthetic photo: a sky-to-grass gradient, a red disc and a blue square."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    arr = (1 - y) * np.array([150, 190, 235]) + y * np.array([70, 140, 60])
    arr = np.broadcast_to(arr, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    cx, cy, r = rng.uniform(0.2, 0.45) * w, rng.uniform(0.3, 0.7) * h, 0.13 * h
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 40, 40))
    sx, sy, s = rng.uniform(0.6, 0.8) * w, rng.uniform(0.25, 0.6) * h, 0.22 * h
    d.rectangle([sx, sy, sx + s, sy + s], fill=(40, 60, 200))
    return im


def save(fig, out: Path, name: str, dpi: int = 110) -> None:
    from mechvlm.fileio import atomic_write

    with atomic_write(out / name, "wb") as f:  # never a half-written figure
        fig.savefig(f, format=Path(name).suffix[1:], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print("wrote", out / name)


def qwen_setup(n_examples: int = 4):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(qwen2_5_vl_config(n_layers=6), attn_implementation="eager")
    model = HookedVLM.from_hf(randomize_(hf.eval(), 0, gemma=False))
    proc = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=336 * 224)
    g = torch.Generator().manual_seed(1)
    batches, images = [], []
    for i in range(n_examples):
        im = scene(i)
        px = proc(images=[im], return_tensors="pt")
        grid = px["image_grid_thw"]
        ids, _ = qwen_prompt([6, tuple(grid[0].tolist()), 12], generator=g)
        batches.append({"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": grid})
        images.append(im)
    return model, batches, images


def gemma_setup(n_examples: int = 4):
    from transformers import Gemma3ForConditionalGeneration

    try:
        from transformers import Gemma3ImageProcessorPil as Proc
    except ImportError:  # older transformers
        from transformers import Gemma3ImageProcessor as Proc

    torch.manual_seed(0)
    cfg = gemma3_config(n_layers=6, mm_tokens=16)
    hf = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    model = HookedVLM.from_hf(randomize_(hf.eval(), 0, gemma=True))
    proc = Proc(size={"height": 28, "width": 28})
    g = torch.Generator().manual_seed(2)
    batches, images = [], []
    for i in range(n_examples):
        ims = [scene(10 + 2 * i, (200, 200)), scene(11 + 2 * i, (240, 160))]
        px = proc(images=ims, return_tensors="pt")["pixel_values"]
        ids = gemma3_prompt([3, "image", 2, "image", 10], mm_tokens=16, generator=g)
        batches.append({"input_ids": ids, "pixel_values": px})
        images.append(ims)
    return model, batches, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium screenshot of the widgets")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    from mechvlm.metrics import attention_share, logit_lens, received_attention, visual_text_similarity

    qwen, qb, qimgs = qwen_setup()
    gemma, gb, gimgs = gemma_setup()
    kw = dict(progress=False)

    # Fig. 1: attention share per layer, stacked (text -> image vs text -> EOI)
    shares = {"tiny Qwen2.5-VL": attention_share(qwen, qb, **kw), "tiny Gemma3": attention_share(gemma, gb, **kw)}
    save(viz.fig_attention_share(shares), out, "attention_share.png")

    # Fig. 2: cumulative received attention per layer
    rec = {"tiny Qwen2.5-VL": received_attention(qwen, qb, **kw), "tiny Gemma3": received_attention(gemma, gb, **kw)}
    save(viz.fig_received_attention(rec), out, "received_attention.png")

    # Table 1: the seed's published numbers as an example input
    save(viz.fig_knockout(TABLE1, title="Attention knockout (seed 000 Table 1 values, MMBench)"), out,
         "knockout.png")

    # logit lens (labels: an arbitrary reference set of ids, for the alignment panel)
    lens = logit_lens(qwen, qb, k=5, labels=list(range(100, 140)), **kw)
    roles0 = qwen.roles(**qb[0])
    save(viz.fig_logit_lens(lens, example=0, roles=roles0, max_positions=24), out, "logit_lens.png")
    save(viz.fig_logit_lens_on_image(lens, roles0, layer=3, example=0, image=qimgs[0], cfg=qwen.cfg), out,
         "logit_lens_on_image.png")

    # visual-text similarity, both models (same number of layers)
    sims = {"tiny Qwen2.5-VL": visual_text_similarity(qwen, qb, **kw),
            "tiny Gemma3": visual_text_similarity(gemma, gb, **kw)}
    save(viz.fig_visual_text_similarity(sims), out, "visual_text_similarity.png")

    # attention on the image: Qwen (one image), Gemma3 (two images)
    _, qcache = qwen.run_with_cache(**qb[0], names_filter=lambda n: n.endswith("hook_pattern"))
    save(viz.attention_on_image(qcache, roles0, [qimgs[0]], layer=3, cfg=qwen.cfg, show_grid=True), out,
         "attention_on_image_qwen.png")
    groles = gemma.roles(**gb[0])
    _, gcache = gemma.run_with_cache(**gb[0], names_filter=lambda n: n.endswith("hook_pattern"))
    save(viz.attention_on_image(gcache, groles, gimgs[0], layer=5, cfg=gemma.cfg, show_grid=True), out,
         "attention_on_image_gemma3.png")
    # the geometry check drawn: text attention forced (hook on hook_pattern) onto the tokens
    # whose cell holds the red disc of the original image
    img = np.asarray(qimgs[0]).astype(int)
    red = (img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)
    _, h, w = roles0.spans[0].grid
    H, W = red.shape
    cells = {(int(y * h / H), int(x * w / W)) for y, x in zip(*np.nonzero(red))}
    frac = {c: red[c[0] * H // h:(c[0] + 1) * H // h, c[1] * W // w:(c[1] + 1) * W // w].mean() for c in cells}
    on_disc = [(roles0.grid_row[0] == r) & (roles0.grid_col[0] == c) & roles0.image[0] for (r, c), f in
               frac.items() if f > 0.5]
    target = torch.stack(on_disc).any(0)
    text = roles0.text[0]

    def force(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, text, :] = 0.0
        pattern[:, :, text] = pattern[:, :, text] + target.to(pattern.dtype) / target.sum()
        return pattern

    with qwen.hooks(fwd_hooks=[("blocks.3.attn.hook_pattern", force)]):
        _, fcache = qwen.run_with_cache(**qb[0], names_filter="blocks.3.attn.hook_pattern")
    save(viz.attention_on_image(fcache, roles0, [qimgs[0]], layer=3, cfg=qwen.cfg, show_grid=True,
                                title="Layer 3: text attention forced onto the red disc's cells (geometry check)"),
         out, "attention_on_image_forced.png")

    save(viz.head_thumbnails(qcache, roles0, layer=3, input_ids=qb[0]["input_ids"]), out, "head_thumbnails.png")

    # the widgets, as a browser draws them
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not args.no_browser and Path(chromium).exists():
        page = viz.Page("mechvlm.viz widgets")
        page.add(viz.attention_heads(qcache, roles0, layer=3, input_ids=qb[0]["input_ids"]))
        r = viz.received_per_position(qcache, roles0, layer=3, queries="text")
        page.add(viz.colored_tokens(r, roles0, input_ids=qb[0]["input_ids"],
                                    title="attention received from the text tokens (layer 3, head mean)"))
        with tempfile.TemporaryDirectory() as tmp:
            html_path = page.save(Path(tmp) / "widgets.html")
            shot = Path(tmp) / "shot.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-background-networking", "--disable-component-update", "--no-first-run",
                            "--disable-sync", f"--user-data-dir={Path(tmp) / 'profile'}",
                            "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
                            "--window-size=900,1600", "--virtual-time-budget=8000", f"--screenshot={shot}",
                            html_path.as_uri()], check=True, capture_output=True, timeout=120)
            im = Image.open(shot).convert("RGB")
            arr = np.asarray(im)
            rows = np.nonzero((arr < 250).any(-1).any(-1))[0]
            from mechvlm.fileio import atomic_write

            with atomic_write(out / "widgets.png", "wb") as f:
                im.crop((0, 0, im.width, min(im.height, rows.max() + 20))).save(f, format="PNG", optimize=True)
            print("wrote", out / "widgets.png")
    else:
        print("no Chromium: widgets.png not regenerated", file=sys.stderr)


if __name__ == "__main__":
    main()
