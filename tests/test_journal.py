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
