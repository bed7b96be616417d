"""``clap run`` with ``additivity:`` and ``ablation:`` sections: the derived stages run, their results and the
model report's tables agree with a recomputation from the results folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clap.app.pipeline import run_study
from clap.contract import read_results
from tests.test_run import PROBES, model_dirs, tokenizer, write_probes  # noqa: F401 (fixtures)


def test_additivity_and_ablation_stages(tmp_path, model_dirs):  # noqa: F811
    base, _ = model_dirs
    write_probes(tmp_path / "probes.jsonl", PROBES)
    (tmp_path / "study.yaml").write_text(f"""
name: tiny-derived
model: {{source: {base}}}
probes: {{file: probes.jsonl}}
patches:
  - sites: ["layers[*].attn_out", "layers[*].mlp_out", "layers[*].heads[*]"]
    positions: [last]
metrics: [logit_diff]
seed: 3
execution: {{max_rows: 64, progress: false}}
report: {{figures: true, n_boot: 200}}
additivity: {{top: [2], pairs: 2}}
ablation: {{sites: ["layers[*].heads[*]", "layers[*].mlp_out"]}}
""", encoding="utf-8")
    out = tmp_path / "out"
    result = run_study(tmp_path / "study.yaml", out, echo=lambda line: None)
    assert list(result.stages) == ["patch[model]", "patch[additivity:model]", "patch[ablation:model]",
                                   "analyze[model]", "report"]
    singles = read_results(out / "models" / "model")[0]
    joint = read_results(out / "additivity" / "model")[0]
    design = pd.read_csv(out / "additivity" / "model" / "design.csv", dtype={"layers": str})
    analysis = out / "models" / "model" / "analysis"
    gaps = pd.read_csv(analysis / "additivity_gaps.csv")
    # by hand: the whole stack of MLP outputs (layers 0..1) minus the sum of the two single layers, per probe
    mlp = singles[(singles.site_kind == "mlp_out")].pivot(index="probe_id", columns="layer", values="recovery")
    whole = joint[joint.site == "layers[0:2].mlp_out"].set_index("probe_id").recovery
    expected = (whole - mlp[0] - mlp[1]).dropna()
    row = gaps[(gaps.site_kind == "mlp_out") & (gaps.family == "bottom") & (gaps.k == 1)
               & (gaps.knowledge_type == "all")].iloc[0]
    assert row.n == len(expected) and row.gap == pytest.approx(expected.mean(), abs=1e-9)
    assert set(design.family) == {"bottom", "top", "top_m", "pair"}
    # the ablation: zero ablation of layer 1's MLP output, change in the clean logit difference
    ablated = read_results(out / "ablation" / "model")[0]
    zero = ablated[(ablated.site == "layers.1.mlp_out") & (ablated.operation == "zero")]
    summary = pd.read_csv(analysis / "ablation_summary.csv")
    srow = summary[(summary.site == "layers.1.mlp_out") & (summary.operation == "zero")
                   & (summary.knowledge_type == "all")].iloc[0]
    assert srow.change == pytest.approx(float(np.mean(zero.patched - zero.clean)), abs=1e-9)
    agreement = pd.read_csv(analysis / "ablation_rank_agreement.csv")
    assert list(agreement.operation) == ["mean", "resample", "zero"] and (agreement.n_heads == 4).all()
    html = (analysis / "report.html").read_text(encoding="utf-8")
    assert "Additivity: layers patched jointly" in html and "Ablation of the clean run" in html
    assert "fig-additivity_joint_vs_sum" in html and "fig-ablation_heads_zero" in html
    assert "Additivity check:" in (analysis / "report.md").read_text(encoding="utf-8")
    # the study page shows each model's top-m and pair gaps as its own table prints them
    from analyses.formatting import fmt, interval

    top = gaps[(gaps.site_kind == "mlp_out") & (gaps.family == "top_m") & (gaps.knowledge_type == "all")]
    study_page = (out / "report.md").read_text(encoding="utf-8")
    assert "## Additivity" in study_page
    for record in top.to_dict("records"):
        assert f"{fmt(record['gap'])} {interval(record['ci_low'], record['ci_high'])}" in study_page
    assert "<h2>Additivity</h2>" in (out / "report.html").read_text(encoding="utf-8")
