"""The examples in the public docstrings of :mod:`analyses` (and a few modules around it) run as written.

Each analyses example builds a tiny synthetic results table (:func:`analyses.synthetic.make_results`), so the
printed numbers are deterministic; a change that alters a statistic or a table's layout fails here as well as
in the unit tests.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "analyses.bootstrap",
    "analyses.io",
    "analyses.select",
    "analyses.stats",
    "analyses.pipeline",
    "analyses.options",
    "analyses.formatting",
    "analyses.report",
    "analyses.compare",
    "analyses.localization",
    "clap.contract",
    "corpora.build",
    "interventions.alignment",
    # validating a fine-tuning config imports transformers (several seconds on a loaded machine)
    pytest.param("finetuning.config", marks=pytest.mark.slow),
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
    assert result.attempted > 0, f"{name} has no docstring examples"
