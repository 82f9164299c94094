"""The Table 2 analog: `table2_entry` reads a report's results by hand-built example, and the
shipped summary is complete and is what docs/registering.md quotes."""

from pathlib import Path

from mechvlm.training.table2 import (VARIANT_ORDER, load_table2, registers_share_markdown, table2_entry, table2_markdown,
                                     val_curve_markdown)

ROOT = Path(__file__).resolve().parent.parent


def _condition(acc, std, letter):
    return {"accuracy": acc, "std": std, "n": 4, "output_fractions": {"letter": letter, "eos_only": 0.0,
                                                                     "other": 1 - letter}}


def test_table2_entry_reads_the_report_and_the_run():
    none = dict(_condition(0.75, 0.433, 0.5), circular={"accuracy": 0.5},
                per_category={"color": {"accuracy": 1.0}, "count": {"accuracy": 0.5}})
    results = {"knockout": {"none": none, "text→image:pre_softmax_mask": _condition(0.25, 0.433, 1.0)},
               "attention_share": {"mean_head_share": [[0.1, 0.9]]}, "wall_s": 3.0,
               "analyses": {"registering": {"text_to_registers": [0.2, 0.4], "registering": {"registers": 16}}}}
    run = {"steps": 7, "final_loss": 1.5, "first_val_loss": 9.0, "final_val_loss": 2.0, "wall_s": 1.0,
           "median_tokens_per_s": 10.0, "n_train": 9, "n_val": 1, "config": {"lr": 1e-4, "global_batch": 32}}
    log = [{"step": 0, "loss": 9.0, "val_loss": 9.5}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5}]
    e = table2_entry(results, run, log)
    assert (e["accuracy"], e["std"], e["n"], e["circular"]) == (0.75, 0.433, 4, 0.5)
    assert e["outputs"] == {"letter": 0.5, "eos_only": 0.0, "other": 0.5}
    assert e["per_category"] == {"color": 1.0, "count": 0.5}
    assert e["conditions"]["text→image:pre_softmax_mask"]["accuracy"] == 0.25
    assert e["text_to_registers"] == [0.2, 0.4] and e["registering"] == {"registers": 16}
    assert e["training"]["steps"] == 7 and e["training"]["lr"] == 1e-4 and e["training"]["global_batch"] == 32
    md = table2_markdown({"table2": {"m": {"16": e}}})
    assert "| m | w/ registering (16 tokens) | 0.750 (0.433) | 0.500 | 0.500 | 0.000 | 0.500 | 2.000 |" in md
    assert "| m | w/ registering (16 tokens) | 0.20 / 0.40 |" in registers_share_markdown({"table2": {"m": {"16": e}}})
    assert e["training"]["val_curve"] == [[0, 9.5], [2, 2.5]]
    assert "| m | w/ registering (16 tokens) | 9.50 | 2.50 |" in val_curve_markdown({"table2": {"m": {"16": e}}})


def test_shipped_table2_is_complete_and_quoted_by_the_docs():
    table = load_table2()
    for model in ("toy Qwen2.5-VL", "toy Gemma3"):
        assert set(table["table2"][model]) == set(VARIANT_ORDER), model
        for variant in VARIANT_ORDER[1:]:
            training = table["table2"][model][variant]["training"]
            assert training["steps"] > 0 and training["val_curve"][-1][0] == training["steps"]
    docs = (ROOT / "docs" / "registering.md").read_text()
    assert table2_markdown(table) in docs
    assert registers_share_markdown(table) in docs
    assert val_curve_markdown(table) in docs
