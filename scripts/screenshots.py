"""Screenshots of the report page for the docs (docs/img/report_*.png), taken by headless
Chromium from a report that `mechvlm report` wrote.

    python scripts/screenshots.py                          # runs the report (both toys) first
    python scripts/screenshots.py --report mechvlm-report  # or uses a report you already have

Chromium opens the page offline at 1200 px wide; a probe reads where the sections start, a
full-page screenshot is taken and cut into one picture per part of the page:

- report_top.png: the header, "How to read this page" and Table 1 with its chart;
- report_tables.png: output kinds, per-category and circular accuracy;
- report_figures.png: Fig. 1 and Fig. 2;
- report_examples.png: the first example rows;
- report_footer.png: the run-info footer.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mechvlm.fileio import write_bytes  # noqa: E402

WIDTH = 1200
PARTS = [("report_top.png", "top", "outputs-table"), ("report_tables.png", "outputs-table", "fig1"),
         ("report_figures.png", "fig1", "examples"), ("report_examples.png", "examples", None),
         ("report_footer.png", "run-info", "end")]
PROBE = """<script>window.addEventListener('load', function () { setTimeout(function () {
  var y = function (el) { return el ? el.getBoundingClientRect().top + scrollY : null; };
  var out = {height: document.documentElement.scrollHeight, top: 0,
             'outputs-table': y(document.querySelector('table[data-table="outputs"]')),
             fig1: y(document.getElementById('fig1')), examples: y(document.getElementById('examples')),
             'run-info': y(document.getElementById('run-info'))};
  out.end = out.height;
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 300); });</script>"""


def chromium() -> str:
    path = os.environ.get("MECHVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise SystemExit(f"headless Chromium not found at {path} (apt-get install chromium)")
    return path


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=8000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def positions(page: Path, work: Path) -> dict:
    probed = work / "probe.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    res = _run([f"--window-size={WIDTH},1000", "--dump-dom", probed.as_uri()], work / "profile1")
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise SystemExit(f"the probe found nothing (rc {res.returncode}): {res.stderr[-1500:]}")
    return json.loads(html.unescape(m.group(1)))


def screenshots(report_dir: Path, out_dir: Path, *, scale: float = 0.8, max_part: int = 1500) -> list[Path]:
    from PIL import Image

    page = report_dir / "report.html"
    if not page.is_file():
        raise SystemExit(f"{page} does not exist (run mechvlm report first, or leave out --report)")
    with tempfile.TemporaryDirectory(prefix="mechvlm-shots-") as tmp:
        work = Path(tmp)
        pos = positions(page, work)
        shot = work / "full.png"
        _run([f"--window-size={WIDTH},{int(pos['height'])}", f"--screenshot={shot}", page.as_uri()],
             work / "profile2")
        full = Image.open(shot).convert("RGB")
        written = []
        for name, start, stop in PARTS:
            y0 = int(pos[start] or 0)
            y1 = int(pos[stop]) if stop and pos.get(stop) else y0 + max_part
            y1 = min(y1, y0 + max_part, full.height)
            part = full.crop((0, max(0, y0 - 8), WIDTH, y1))
            part = part.resize((int(part.width * scale), int(part.height * scale)), Image.LANCZOS)
            buf = io.BytesIO()
            part.save(buf, format="PNG", optimize=True)
            written.append(write_bytes(out_dir / name, buf.getvalue()))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--report", default=None, help="a folder mechvlm report wrote (default: run the report now)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go")
    ap.add_argument("--limit", type=int, default=None, help="rows of the TSV when the report is run here")
    args = ap.parse_args(argv)
    if args.report:
        report = Path(args.report)
        return _print(screenshots(report, Path(args.out)))
    with tempfile.TemporaryDirectory(prefix="mechvlm-report-") as tmp:
        cmd = [sys.executable, "-m", "mechvlm.cli", "report", "--out", str(Path(tmp) / "r"), "--no-progress"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return _print(screenshots(Path(tmp) / "r", Path(args.out)))


def _print(paths: list[Path]) -> int:
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
