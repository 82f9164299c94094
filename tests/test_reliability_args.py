"""Negative or out-of-range arguments are refused with an error that names the argument.

Before issue 12 they wrapped (``heads=[-1]`` cut the last head), fell back silently
(``query_chunk=0``), returned zeros / NaN (``query_chunk < 0``, thresholds outside
(0, 1]) or ran with nothing to do (``--limit 0``)."""

from __future__ import annotations

import pytest

from mechvlm import attention_share, received_attention
from mechvlm.cli import main
from mechvlm.interventions import ablate_heads, knockout


@pytest.mark.parametrize("heads", [[-1], -2, [0, -1]])
def test_negative_heads_are_refused(qwen_model, image_batch, heads):
    roles = qwen_model.roles(**image_batch)
    with pytest.raises(ValueError, match=r"heads: -\d+ is not a head index"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=knockout(roles, heads=heads))
    with pytest.raises(ValueError, match=r"heads: -\d+ is not a head index"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=ablate_heads({0: heads}))


@pytest.mark.parametrize("chunk", [0, -1, 1.5])
def test_query_chunk_must_be_positive(qwen_model, image_batch, chunk):
    with pytest.raises(ValueError, match="query_chunk must be a positive number of query rows"):
        attention_share(qwen_model, image_batch, query_chunk=chunk, progress=False)
    with pytest.raises(ValueError, match="query_chunk must be a positive number of query rows"):
        received_attention(qwen_model, image_batch, query_chunk=chunk, progress=False)


@pytest.mark.parametrize("thresholds", [(0.0, 0.5), (0.5, 1.5), (-0.1,), ()])
def test_received_attention_thresholds_in_zero_one(qwen_model, image_batch, thresholds):
    with pytest.raises(ValueError, match=r"thresholds must be fractions of the mass in \(0, 1\]"):
        received_attention(qwen_model, image_batch, thresholds=thresholds, progress=False)


@pytest.mark.parametrize("argv, option", [
    (["report", "--limit", "0"], "--limit"),
    (["report", "--limit", "-3"], "--limit"),
    (["report", "--batch-size", "0"], "--batch-size"),
    (["make-mmbench", "--out", "x.tsv", "--questions", "0"], "--questions"),
    (["hooks", "--model", "x", "--tokens", "0"], "--tokens"),
    (["train-toy", "--out", "x", "--steps", "0"], "--steps"),
])
def test_cli_counts_must_be_positive(tmp_path, monkeypatch, capsys, argv, option):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a positive integer" in err, err
    assert not (tmp_path / "x.tsv").exists() and not (tmp_path / "mechvlm-report").exists()


def test_report_config_counts_must_be_positive(tmp_path):
    from mechvlm.report import ReportConfig, run_report

    for field, value in (("limit", 0), ("batch_size", -1), ("max_new_tokens", 0)):
        with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
            run_report(ReportConfig(out=str(tmp_path / "r"), **{field: value}))
    from mechvlm.toy.benchmark import write_benchmark

    with pytest.raises(ValueError, match="n_questions must be a positive integer"):
        write_benchmark(tmp_path / "b.tsv", n_questions=0)
