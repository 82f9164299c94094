"""Hostile text never becomes markup: ``<script>``, ``</div>``, U+2028 in TSV text, in model
names and in token strings. (These held before issue 12 and must keep holding.)"""

from __future__ import annotations

import re
import shutil

import torch

from mechvlm.cli import main
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED

SCRIPT = "<script>alert(1)</script>"
HOSTILE = f"{SCRIPT} </div></table> line\u2028separator"


def test_report_with_hostile_tsv_text_and_model_name(tmp_path):
    lines = SHIPPED_TSV.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    q, c = header.index("question"), header.index("category")
    rows = []
    for line in lines[1:5]:
        f = line.split("\t")
        f[q], f[c] = f"{HOSTILE} {f[q]}", f"{SCRIPT}{f[c]}"
        rows.append("\t".join(f))
    tsv = tmp_path / "hostile.tsv"
    tsv.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    model = tmp_path / "<img src=x onerror=alert(1)>"
    shutil.copytree(SHIPPED["qwen2_5_vl"], model)
    out = tmp_path / "r"
    assert main(["report", "--model", str(model), "--mmbench", str(tsv), "--out", str(out), "--limit", "4",
                 "--batch-size", "4", "--conditions", "none", "--no-progress"]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert SCRIPT not in html and "<img src=x" not in html and "</div></table> line" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<table") == html.count("</table>") and html.count("<div") == html.count("</div>")


def test_widget_token_strings_cannot_end_the_script(qwen_model, image_batch):
    from mechvlm.viz import Page, attention_pattern, colored_tokens

    _, cache = qwen_model.run_with_cache(**image_batch, names_filter="blocks.0.attn.hook_pattern")
    roles = qwen_model.roles(**image_batch)
    n = image_batch["input_ids"].shape[1]
    labels = [f"</script>{SCRIPT}\u2028\u2029{i}" for i in range(n)]
    page = Page(f"title {SCRIPT}")
    page.add(attention_pattern(cache, roles, layer=0, labels=labels, collapse_images=False, title=HOSTILE))
    page.add(colored_tokens(torch.rand(n), roles, labels=labels, drop_padding=False))
    html = page.html()
    assert SCRIPT not in html and "</script><script>alert" not in html
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert scripts and not any("\u2028" in js or "\u2029" in js for js in scripts)  # JS line terminators
    assert html.count("<script>") == html.count("</script>")
