"""The command line starts at once: ``--help`` and argument errors import none of the heavy libraries.

Each check runs ``python -m clap ...`` in a fresh interpreter and reads ``sys.modules`` after the command line has
exited, so an import anywhere in the registration path (a package ``__init__``, an area's ``cli.py``, a module
that registers a sub-command) is caught, whichever area it comes from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Libraries that take seconds to import; only a command that needs them may load them.
HEAVY = ("torch", "transformers", "nnsight", "pandas", "seaborn", "matplotlib", "scipy", "pingouin", "peft",
         "datasets", "pyarrow")

def _run_clap(*args: str) -> tuple[int, str, list[str]]:
    """(exit code, stderr, heavy modules loaded) of ``python -m clap ARGS`` in a fresh interpreter."""
    script = (
        "import json, runpy, sys\n"
        f"HEAVY = {HEAVY!r}\n"
        f"sys.argv = ['clap', *{list(args)!r}]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('clap', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        "sys.stdout.flush()\n"
        "print('\\nLOADED=' + json.dumps([code, [m for m in HEAVY if m in sys.modules]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("LOADED=")]
    assert line, f"no result from the subprocess: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    code, loaded = json.loads(line[-1].removeprefix("LOADED="))
    return code, done.stderr, loaded


@pytest.mark.parametrize("args", [("--help",), ("patch", "--help"), ("run", "--help"), ("analyze", "--help"),
                                  ("probes", "check", "--help"), ("finetune", "--help"), ("corpus", "build", "--help")])
def test_help_imports_no_heavy_library(args):
    code, stderr, loaded = _run_clap(*args)
    assert code == 0, stderr
    assert loaded == [], f"`clap {' '.join(args)}` imported {loaded}"


@pytest.mark.parametrize("args", [("patch", "spec.yaml"), ("run", "study.yaml", "--bogus"), ("nonsense",),
                                  ("analyze",)])
def test_argument_errors_import_no_heavy_library(args):
    code, stderr, loaded = _run_clap(*args)
    assert code == 2 and "error:" in stderr
    assert loaded == [], f"`clap {' '.join(args)}` imported {loaded} before refusing its arguments"


def test_package_names_are_still_importable():
    """The packages resolve their public names on first use; ``from package import name`` works as before."""
    import analyses
    import finetuning
    import interventions
    from interventions import Study, StudySpec, study

    assert Study is study.Study and StudySpec.__module__ == "interventions.spec"
    for package in (interventions, analyses, finetuning):
        for name in package.__all__:
            assert getattr(package, name) is not None and name in dir(package)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        interventions.nonexistent  # noqa: B018 - the attribute access is the test


def test_finetune_preset_names_match_the_presets():
    from finetuning.cli import PRESET_NAMES
    from finetuning.config import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)
