"""The command line works offline on a local save_pretrained directory."""

from __future__ import annotations

import re

from conftest import make_hf_qwen
from mechvlm.cli import main


def test_demo_reports_parity(capsys):
    assert main(["demo", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    diffs = [float(x) for x in re.findall(r"= ([0-9.e+-]+)\n", out)[:3]]
    assert len(diffs) == 3 and max(diffs) < 1e-4, out


def test_hooks_on_local_directory(tmp_path, capsys):
    make_hf_qwen(seed=1, n_layers=2).save_pretrained(tmp_path)
    assert main(["hooks", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.hook_pattern               (1, 4, 8, 8)" in out
    assert "50 hook points in all" in out  # + hook_tokens, unembed.hook_in/hook_out, hook_video_embeds


def _parsers(monkeypatch):
    """The top-level parser and every subcommand's, as `main` builds them."""
    import argparse

    from mechvlm import cli

    class Built(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        main([])
    except Built as e:
        top = e.args[0]
    monkeypatch.undo()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return cli, top, dict(sub.choices)


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    import argparse

    cli, top, subs = _parsers(monkeypatch)
    assert "`" not in top.description and "report" in top.description
    assert set(subs) >= {"report", "make-mmbench", "train-toy", "demo", "hooks", "crosscheck"}
    for name, parser in subs.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help and action.help.strip(), f"{name} {action.dest}: no help text"
            shown = action.help if action.default is None else parser._get_formatter()._get_help_string(action)
            if action.default not in (None, False) and not action.required:
                assert "default" in shown, f"{name} {action.option_strings}: default {action.default!r} not shown"
                assert str(action.default) in text or "default" in action.help, (name, action.dest)
            if action.default is None and action.option_strings and not action.required \
                    and action.nargs != 0 and not isinstance(action, argparse._StoreTrueAction):
                assert "default" in action.help, f"{name} {action.option_strings}: say what no value means"


def test_version(capsys):
    from importlib import metadata

    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"mechvlm {metadata.version('mechvlm')}"
