"""Atomic output: an interrupted write leaves the previous file, never a truncated one."""

import json
import os

import pytest

from mechvlm import fileio


def test_write_text_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    fileio.write_text(p, "first")
    fileio.write_text(p, "second")
    assert p.read_text() == "second"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_an_exception_mid_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "results.json"
    p.write_text('{"old": 1}')
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(p) as f:
            f.write('{"new": ')  # half a file
            raise RuntimeError("disk full")
    assert json.loads(p.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_failed_first_write_leaves_no_file(tmp_path):
    p = tmp_path / "sub" / "x.bin"
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_write(p, "wb") as f:
            f.write(b"12")
            raise KeyboardInterrupt
    assert not p.exists() and os.listdir(p.parent) == []


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        fileio.write_json(tmp_path / "n.json", {"x": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_atomic_dir_swaps_whole_folders(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with fileio.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        with fileio.atomic_write("x", "a"):
            pass
