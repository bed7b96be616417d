"""Engine -> analyses: real patching results flow through the statistics, figures and report."""

from __future__ import annotations

import numpy as np
import pytest

from clap.app.cli import main
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


@pytest.fixture(scope="module")
def results_dir(tiny_gpt2, tmp_path_factory):
    more = PROBES + [
        {"id": "de", "clean": "The capital of Germany is", "corrupted": "The capital of Italy is",
         "answer": " Berlin", "wrong": " Rome", "labels": {"knowledge_type": "definitional"}},
        {"id": "lev", "clean": "Levetiracetam treats", "corrupted": "Atorvastatin treats",
         "answer": " seizures", "wrong": " cholesterol", "labels": {"knowledge_type": "associative"}},
    ]
    spec = StudySpec.from_dict({
        "name": "integration", "model": {"source": "tiny-gpt2"}, "probes": {"inline": more, "multi_token": "first"},
        "metrics": ["logit_diff"], "execution": {"progress": False},
        "patches": [
            {"sites": ["layers[*].heads[*]"], "positions": ["last"]},
            {"sites": ["layers[*].resid_pre"], "positions": ["each"]},
        ],
    })
    out = tmp_path_factory.mktemp("results")
    Study(spec, model=tiny_gpt2).run(out)
    return out


def test_layer_head_heatmap_shows_the_per_probe_means(results_dir):
    from analyses import load_results
    from analyses.figures import heatmap_layer_head

    data, _ = load_results(results_dir)
    fig = heatmap_layer_head(data, "patched", group="knowledge_type", metric="logit_diff", positions="last")
    heads = data[(data.site_kind == "head")]
    # not strict: fig.axes may also hold colorbar axes after the two panels
    for ax, group in zip(fig.axes, ("associative", "definitional"), strict=False):
        part = heads[heads.knowledge_type == group]
        expected = part.groupby(["head", "layer"]).patched.mean().unstack("layer").sort_index().to_numpy()
        drawn = np.asarray(ax.collections[0].get_array()).reshape(expected.shape)
        np.testing.assert_allclose(drawn, expected, rtol=1e-9)


def test_analyze_and_report_run_on_engine_output(results_dir):
    assert main(["analyze", str(results_dir)]) == 0
    analysis = results_dir / "analysis"
    figures = {p.name for p in (analysis / "figures").glob("*.png")}
    assert any(name.startswith("layer_head_") for name in figures)
    assert any(name.startswith("layer_position_") and "each" in name for name in figures)
    # "last" is one position per probe (at different indices): no layer x position map for it
    assert not any(name.startswith("layer_position_") and "last" in name for name in figures)
    assert (analysis / "rm_anova.csv").is_file()
    assert main(["report", str(results_dir)]) == 0
    html = (analysis / "report.html").read_text()
    assert "integration on tiny-gpt2" in html
    assert "by layer and head" in html
