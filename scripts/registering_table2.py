"""Seed 000 Table 2, offline: fine-tune the shipped toys with each Registering variant, run
``mechvlm report`` on every result, and write the summary.

    python scripts/registering_table2.py --runs runs/registering            # all 2 x 4 runs
    python scripts/registering_table2.py --runs runs/registering --families gemma3 --variants 16

Each fine-tune and report is a ``mechvlm`` subprocess with one thread (the machine is
shared), one at a time; a run whose ``model/`` and report exist is reused. The summary goes
to ``mechvlm/assets/registering_table2.json`` (`mechvlm.training.table2`), the tables to
stdout; docs/registering.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechvlm.fileio import write_json  # noqa: E402
from mechvlm.toy.checkpoint import SHIPPED  # noqa: E402
from mechvlm.training.table2 import (SHIPPED_TABLE2, conditions_markdown, registers_share_markdown,  # noqa: E402
                                     table2_entry, table2_markdown, val_curve_markdown)

#: the schedule of the shipped results (seed 000 Table 3 except the toy-sized data and lr)
SCHEDULE = ["--epochs", "10", "--toy-examples", "800", "--global-batch", "32", "--micro-batch", "16",
            "--lr", "1e-4", "--warmup-ratio", "0.03", "--val-every", "20", "--val-limit", "80",
            "--save-every", "100", "--threads", "1", "--no-progress"]
MODEL_NAMES = {"qwen2_5_vl": "toy Qwen2.5-VL", "gemma3": "toy Gemma3"}


def mechvlm(args: list[str], log: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    with open(log, "a") as f:
        run = subprocess.run([sys.executable, "-m", "mechvlm.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if run.returncode:
        raise SystemExit(f"mechvlm {' '.join(args[:3])} failed: see {log}")
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/registering", help="folder of the fine-tuning runs and reports")
    ap.add_argument("--families", default="qwen2_5_vl,gemma3")
    ap.add_argument("--variants", default="none,eoi,16,256")
    ap.add_argument("--out", default=str(SHIPPED_TABLE2), help="summary JSON")
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    table = old.get("table2", {})
    walls = old.get("wall_s", {})
    for family in a.families.split(","):
        name = MODEL_NAMES[family]
        rows = table.setdefault(name, {})
        base_report = runs / family / "base-report"
        if not (base_report / "results.json").is_file():
            walls[f"{family}/base/report"] = mechvlm(["report", "--model", str(SHIPPED[family]), "--out",
                                                     str(base_report), "--no-progress"], runs / "log.txt")
        rows["base"] = table2_entry(json.loads((base_report / "results.json").read_text()))
        for variant in a.variants.split(","):
            run = runs / family / variant
            if not (run / "model" / "config.json").is_file():
                walls[f"{family}/{variant}/finetune"] = mechvlm(
                    ["finetune", "--model", str(SHIPPED[family]), "--out", str(run), "--registering", variant,
                     "--overwrite", *SCHEDULE], runs / "log.txt")
            if not (run / "report" / "results.json").is_file():
                walls[f"{family}/{variant}/report"] = mechvlm(
                    ["report", "--model", str(run / "model"), "--out", str(run / "report"), "--no-progress"],
                    runs / "log.txt")
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
            rows[variant] = table2_entry(json.loads((run / "report" / "results.json").read_text()),
                                         json.loads((run / "run.json").read_text()), log)
            write_json(a.out, {"schedule": SCHEDULE, "table2": table, "wall_s": walls,
                               "note": "mechvlm report on the shipped synthetic MMBench TSV (400 rows, 100 "
                                       "questions x 4 rotations) after fine-tuning on toy cc_sbu_align captions; "
                                       "wall times on a shared 2-core CPU, 1 thread"})
            print(f"{name} {variant}: accuracy {rows[variant]['accuracy']:.3f}", flush=True)
    summary = {"schedule": SCHEDULE, "table2": table}
    print(table2_markdown(summary), conditions_markdown(summary), registers_share_markdown(summary),
          val_curve_markdown(summary), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
