"""Causal tracing on real weights (SmolLM2-135M) over the shipped definitional facts: ROME's qualitative pattern."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from interventions.spec import StudySpec
from interventions.study import Study
from interventions.trace_figures import plot_groups, token_group_table

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from clap.models import builtin_gguf_path, load_model

    try:
        builtin_gguf_path("smollm2-135m")
    except Exception as exc:  # the package is installed by `make` with --no-deps
        pytest.skip(str(exc))
    return load_model("smollm2-135m")


def test_causal_trace_shows_the_published_pattern(smollm2, tmp_path):
    spec = StudySpec.from_dict({
        "name": "trace-smollm2", "model": {"source": "smollm2-135m"},
        "probes": {"file": str(ROOT / "clap/data/probes/definitional.jsonl")},
        "trace": {"samples": 3, "kinds": {"resid_post": 1}},
        "execution": {"progress": False, "max_rows": 128},
    })
    started = time.perf_counter()
    study = Study(spec, model=smollm2)
    frame = study.run(tmp_path)
    elapsed = time.perf_counter() - started
    assert frame.probe_id.nunique() >= 30
    table = token_group_table(frame)
    plot_groups(frame, ROOT / "docs" / "causal_trace_smollm2.png")
    effect = table.set_index(["token_group", "layer"]).effect
    n_layers = smollm2.hf.config.num_hidden_layers
    early = list(range(0, n_layers // 2))
    late = list(range(n_layers - 5, n_layers))
    subject_early = effect["last subject"].loc[early].mean()
    subject_late = effect["last subject"].loc[late].mean()
    last_early = effect["last"].loc[early].mean()
    last_late = effect["last"].loc[late].mean()
    print(f"causal trace of {frame.probe_id.nunique()} facts took {elapsed:.0f} s; last subject token: early "
          f"{subject_early:.4f}, late {subject_late:.4f}; last token: early {last_early:.4f}, late {last_late:.4f}")
    assert subject_early > subject_late  # the subject's last token matters in early-middle layers ...
    assert last_late > last_early  # ... the last token in late layers
    assert last_late > subject_late
