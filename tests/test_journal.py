"""The resume journal (`mechvlm.journal`), fingerprints and `map_units` with a journal, in
one process. The report killed mid-run and resumed: tests/test_resume.py."""

from __future__ import annotations

import json

import pytest
import torch

from mechvlm import fingerprint
from mechvlm.distributed import map_units
from mechvlm.journal import Journal, ResumeRefused, decode, encode

HEADER = {"model": "m1", "data": "d1", "settings": {"batch_size": 4, "limit": None}}


def test_results_read_back_bit_identical():
    g = torch.Generator().manual_seed(0)
    value = {"raw": torch.randn(3, 2, 5, generator=g), "half": torch.randn(4, generator=g).bfloat16(),
             "ids": torch.tensor([[1, 2], [3, 4]]), "mask": torch.tensor([True, False]),
             "empty": torch.zeros(0, 3), "scalar": torch.tensor(0.1), "nan": torch.tensor([float("nan"), 1.0]),
             "rows": [{"prediction": "B", "tokens": [5, 6], "stopped": True, "raw": "B\u2192"}, None], "n": 3}
    back = decode(json.loads(json.dumps(encode(value))))
    for key in ("raw", "half", "ids", "mask", "empty", "scalar"):
        assert back[key].dtype == value[key].dtype and back[key].shape == value[key].shape
        assert torch.equal(back[key], value[key])
    assert torch.equal(back["nan"].isnan(), value["nan"].isnan()) and back["nan"][1] == 1.0
    assert back["rows"] == value["rows"] and back["n"] == 3


def _units(n):
    return [torch.arange(i, i + 3) for i in range(n)]


def test_map_units_reads_back_what_the_journal_holds_and_computes_the_rest(tmp_path):
    calls = []

    def fn(u):
        calls.append(int(u[0]))
        return {"sum": u.sum(), "rows": [int(x) for x in u]}

    with Journal.open(tmp_path, HEADER, resume=False) as j:
        first = map_units(fn, _units(3), journal=j.task("t"))
    with Journal.open(tmp_path, HEADER, resume=True) as j:
        assert j.n_done == 3
        again = map_units(fn, _units(5), journal=j.task("t"))
        assert (j.reused, j.written) == (3, 2)
    assert calls == [0, 1, 2, 3, 4]  # units 0-2 were not recomputed
    assert [torch.equal(a["sum"], b["sum"]) for a, b in zip(first, again)] == [True] * 3
    assert [a["rows"] for a in again] == [[i, i + 1, i + 2] for i in range(5)]
    with Journal.open(tmp_path, HEADER, resume=False) as j:  # without resume: start again
        assert j.n_done == 0
        assert len(j.path.read_text().splitlines()) == 1


@pytest.mark.parametrize("cut", [25, -1])  # inside the line; right before its newline (whole JSON)
def test_a_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path, cut):
    with Journal.open(tmp_path, HEADER, resume=False) as j:
        map_units(lambda u: [int(x) for x in u], _units(2), journal=j.task("items", per_row=True))
        path = j.path
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 2 * 3  # the header, then one line per row of each unit
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:cut])  # killed while writing unit 1's last row
    calls = []
    with Journal.open(tmp_path, HEADER, resume=True) as j:
        assert j.n_done == 1
        out = map_units(lambda u: calls.append(int(u[0])) or [int(x) for x in u], _units(2),
                        journal=j.task("items", per_row=True))
    assert calls == [1] and out == [[0, 1, 2], [1, 2, 3]]
    for raw in path.read_bytes().splitlines():
        json.loads(raw)  # every line whole: the torn one was cut before appending


def test_another_run_is_refused_naming_what_changed(tmp_path):
    with Journal.open(tmp_path, HEADER, resume=False) as j:
        map_units(lambda u: 1, _units(2), journal=j.task("t"))
    changed = {**HEADER, "settings": {"batch_size": 8, "limit": None}}
    with pytest.raises(ResumeRefused, match=r"settings \(batch_size: 4 -> 8\)"):
        Journal.open(tmp_path, changed, resume=True)
    with pytest.raises(ResumeRefused, match=r"model \('m1' -> 'm2'\)"):
        Journal.open(tmp_path, {**HEADER, "model": "m2"}, resume=True)
    with Journal.open(tmp_path, HEADER, resume=True) as j:  # same run, other unit content: refused too
        with pytest.raises(ResumeRefused, match="unit 1 of 't' was recorded for other inputs"):
            map_units(lambda u: 1, [torch.arange(0, 3), torch.arange(9, 12)], journal=j.task("t"))


def test_fingerprints_see_a_changed_byte_in_small_and_sampled_files(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1 << 16)  # sample the big file
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 1 << 12)
    before = fingerprint.folder_fingerprint(folder)
    data = bytearray((folder / "weights.bin").read_bytes())
    data[-1] ^= 1  # the last byte: inside the last sampled block
    (folder / "weights.bin").write_bytes(bytes(data))
    after = fingerprint.folder_fingerprint(folder)
    assert after != before
    (folder / "config.json").write_text('{"a": 2}')
    last = fingerprint.folder_fingerprint(folder)
    assert last != after
    (folder / ".mechvlm-manifest.json").write_text("{}")  # hidden files do not count
    assert fingerprint.folder_fingerprint(folder) == last


def test_long_analyses_resume_from_the_journal_without_recomputing(tmp_path):
    """token_budget / token_contribution killed after two of three batches, then resumed:
    the result of an uninterrupted run (random draws included), with forwards only for the
    batch not journaled."""
    from conftest import make_hf_qwen, qwen_batch

    from mechvlm import HookedVLM
    from mechvlm.analyses import token_budget, token_contribution

    model = HookedVLM.from_hf(make_hf_qwen(seed=9, n_layers=2))
    pairs = []
    for i, rows in enumerate([[[3, (1, 4, 4), 5]], [[2, (1, 4, 6), 6], [4, (1, 4, 4), 4]], [[3, (1, 4, 4), 5]]]):
        batch = qwen_batch(rows, seed=40 + i)
        target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        target[:, -2:] = True
        pairs.append((batch, target))
    runs = {"token_budget": lambda b, **kw: token_budget(model, b, fractions=[0.5, 1.0], strategies=("first", "random"),
                                                          draws=2, seed=4, progress=False, **kw),
            "token_contribution": lambda b, **kw: token_contribution(model, b, unit="row", batch_size=8,
                                                                      progress=False, **kw)}
    forwards = []
    model.hook_embed.add_hook(lambda x, hook: forwards.append(1), is_permanent=True)
    try:
        for name, run in runs.items():
            want = run(pairs).to_dict()
            with Journal.open(tmp_path / name, HEADER, resume=False) as j:
                run(pairs[:2], journal=j.task(name))  # the interrupted run
            forwards.clear()
            with Journal.open(tmp_path / name, HEADER, resume=True) as j:
                got = run(pairs, journal=j.task(name)).to_dict()
                assert (j.reused, j.written) == (2, 1), name
            resumed_forwards = len(forwards)
            assert resumed_forwards == run(pairs[2:]).n_forwards, name  # only the last batch ran
            for key, value in want.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[key].isnan(), value.isnan()), (name, key)
                    assert torch.equal(got[key].nan_to_num(), value.nan_to_num()), (name, key)
                elif key in ("maps", "unit_delta"):
                    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(got[key], value)), key
                else:
                    assert got[key] == value, (name, key)
    finally:
        model.reset_hooks(including_permanent=True)


def test_head_attribution_resumes_and_refuses_other_masks(tmp_path):
    """head_attribution's ablation loops (random masks, single heads) stopped after two of
    three batches, then resumed: the uninterrupted result; other masks are refused."""
    from conftest import make_hf_qwen, qwen_batch

    from mechvlm import HookedVLM
    from mechvlm.analyses import head_attribution

    model = HookedVLM.from_hf(make_hf_qwen(seed=9, n_layers=2))
    batches = [qwen_batch(rows, seed=50 + i) for i, rows in
               enumerate([[[3, (1, 4, 4), 5]], [[2, (1, 4, 4), 6], [4, (1, 4, 4), 4]], [[3, (1, 4, 4), 5]]])]

    def run(b, **kw):
        return head_attribution(model, b, reference=batches, n_masks=8, ablate_prob=0.3, masks_per_forward=8,
                                n_bootstrap=10, attention=False, progress=False, **kw)

    want = run(batches)
    with Journal.open(tmp_path, HEADER, resume=False) as j:
        run(batches[:2], journal=j.task("head_attribution"))
    with Journal.open(tmp_path, HEADER, resume=True) as j:
        got = run(batches, journal=j.task("head_attribution"))
        assert (j.reused, j.written) == (4, 2)  # two batches of each loop read back, one computed
    for key in ("drops", "clean", "targets", "single", "weights"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    assert got.n_forwards == want.n_forwards
    with Journal.open(tmp_path, HEADER, resume=True) as j, pytest.raises(ResumeRefused, match="other inputs"):
        head_attribution(model, batches, reference=batches, n_masks=8, seed=1, masks_per_forward=8, n_bootstrap=10,
                         attention=False, progress=False, journal=j.task("head_attribution"))
