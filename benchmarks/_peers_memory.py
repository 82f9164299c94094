"""Peak memory of one call of a compare_peers contender, each measure in a fresh process.

    python benchmarks/_peers_memory.py JOBS_JSON      (run by `run_memory`, not by hand)

The worker loads the weights the parent saved (the same draw as every timed tool), builds
only the tool it measures (``private``: on the HF model itself, no copies), warms it up on a
short text-only prompt and prints the extra peak memory of one call (`_common.extra_peak`).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
import _peers as P  # noqa: E402
from _common import MALLOC_ENV, extra_peak  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def memory_worker(jobs_json: str) -> None:
    """Subprocess: for each job (tool, spec, weights file), build the model (when the job needs
    another one than the last), warm the tool up on a short text-only prompt, and measure the
    extra peak memory of one call on the job's inputs. One JSON line per job."""
    job = json.loads(jobs_json)
    torch.set_num_threads(job["threads"])
    torch.set_flush_denormal(True)
    dtype, device = DTYPES[job["dtype"]], torch.device(job["device"])
    models, key = None, None
    with torch.inference_mode():
        for j in job["jobs"]:
            spec = P.Spec(**j["spec"])
            if (j["weights"], spec.with_(image_tokens=0, batch=0)) != key:
                key, models = (j["weights"], spec.with_(image_tokens=0, batch=0)), None
                gc.collect()
                hf = P.build_hf(spec, dtype, device, weights=j["weights"])
                tools = {i["tool"] for i in job["jobs"] if i["weights"] == j["weights"]}
                models = P.Models(hf, private=len(tools) == 1)  # one tool: no copies at all
                del hf
            warm = P.make_inputs(spec.with_(batch=1), models.hf.config, dtype, device, text_only=True)
            P.contender(j["tool"], models, warm)()
            inp = P.make_inputs(spec, models.hf.config, dtype, device)
            res = extra_peak(P.contender(j["tool"], models, inp), device)
            res.update(tool=j["tool"], image_tokens=spec.image_tokens, batch=spec.batch, n_tokens=inp.n_tokens)
            print("MEMORY " + json.dumps(res), flush=True)


def run_memory(jobs: list[dict], args, log=print) -> list[dict]:
    """Each job in a fresh subprocess (``--quick``: all jobs in one); jobs that share a
    ``process`` key share one (the scaling curve of one tool)."""
    groups: dict = {}
    for i, j in enumerate(jobs):
        groups.setdefault("all" if args.quick else j.get("process", i), []).append(j)
    env = dict(os.environ, **MALLOC_ENV)
    out = []
    for group in groups.values():
        payload = {"jobs": [{**j, "spec": vars(j["spec"])} for j in group], "dtype": args.dtype,
                   "device": args.device, "threads": args.threads}
        res = subprocess.run([sys.executable, __file__, json.dumps(payload)],
                             capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker failed for {[j['tool'] for j in group]}:\n{res.stderr[-4000:]}")
        results = [json.loads(line[7:]) for line in res.stdout.splitlines() if line.startswith("MEMORY ")]
        for j, m in zip(group, results, strict=True):
            m.update(section=j["section"], family=j["spec"].family)
            out.append(m)
            log(f"  memory {j['section']:<8} {m['tool']:<16} {m['image_tokens']:>5} image tokens, batch {m['batch']}: "
                f"extra peak {m['extra_peak_mib']:9.1f} MiB (base {m['base_mib']:.0f})")
    return out


if __name__ == "__main__":
    memory_worker(sys.argv[1])
