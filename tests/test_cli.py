"""The top-level command line: every area's commands are registered."""

from __future__ import annotations

from clap import __version__
from clap.app.cli import build_parser, main


def test_every_command_is_registered():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"patch", "sites", "corpus", "finetune", "analyze", "report", "demo"} <= commands


def test_version_and_no_command(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"clap {__version__}"
