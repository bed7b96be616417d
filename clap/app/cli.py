"""The ``clap`` command line.

Each area registers its own sub-commands (``register(subparsers)`` in ``<area>/cli.py``) so the command
line grows without one file that every area must edit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from clap import __version__
from clap.errors import ClapError

#: Modules that contribute sub-commands; each exposes ``register(subparsers)``.
COMMAND_MODULES = ("interventions.cli", "clap.app.trace", "corpora.cli", "finetuning.cli", "analyses.cli",
                   "clap.app.demo")
COMMAND_MODULES += ("clap.app.probes",)  # `clap probes check`
COMMAND_MODULES += ("clap.app.pipeline",)  # `clap run`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clap",
        description="Causal activation-patching studies of language models, built on nnsight.",
    )
    parser.add_argument("--version", action="version", version=f"clap {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not installed yet must not break the others
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # e.g. `clap sites MODEL | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ClapError as exc:
        print(f"clap: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that cannot be written: the file and the reason, not a traceback
        from clap.outputs import os_error_text

        print(f"clap: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clap: interrupted; finished results are kept and a rerun resumes", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
