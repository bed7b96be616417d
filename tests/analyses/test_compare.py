"""`clap compare`: paired B - A differences, the layer x model ANOVA (checked against statsmodels) and matching."""

from __future__ import annotations

import lxml.html
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses.compare import check_matched, compare
from analyses.io import save_results
from analyses.synthetic import make_meta, make_results
from clap.app.cli import main
from clap.errors import ClapError

from .conftest import GROUP

SLICE = dict(metric="logit_diff", operation="replace", direction="denoising", positions="all")


def _runs(tmp_path, shift=0.5, layer=2, kind="mlp_out"):
    a = make_results(n_probes=10, n_layers=4, site_kinds=("resid_pre", "mlp_out"), metrics=("logit_diff",),
                     tokens=("a", "b"), trivial_sites=False, seed=1)
    rng = np.random.default_rng(9)
    b = a.copy()
    b["recovery"] = b["recovery"] + rng.normal(0, 0.05, len(b))
    b.loc[(b["site_kind"] == kind) & (b["layer"] == layer), "recovery"] += shift
    save_results(a, make_meta(a, group_columns=[GROUP]), tmp_path / "A")
    save_results(b, make_meta(b, group_columns=[GROUP]), tmp_path / "B")
    return a, b


def _per_probe(frame, kind):
    """Each probe's value at its own last token (the default reduction), never a mean over positions."""
    rows = frame[(frame["site_kind"] == kind) & frame["recovery_defined"]]
    rows = rows[rows["position"] == rows.groupby("probe_id")["position"].transform("max")]
    assert rows.groupby(["probe_id", "layer"]).size().max() == 1
    return rows.groupby(["probe_id", "layer"])["recovery"].mean().unstack()


def test_paired_differences_find_the_planted_layer(tmp_path):
    a, b = _runs(tmp_path)
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    diff = res.differences
    for kind in ("resid_pre", "mlp_out"):
        wa, wb = _per_probe(a, kind), _per_probe(b, kind)
        part = diff[diff["site_kind"] == kind].set_index("layer")
        for layer in range(4):
            d = (wb[layer] - wa[layer]).to_numpy()
            t = sps.ttest_rel(wb[layer], wa[layer])
            low, high = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
            row = part.loc[layer]
            assert row["diff"] == pytest.approx(d.mean()) and row["n"] == 10
            assert row["T"] == pytest.approx(t.statistic) and row["p_unc"] == pytest.approx(t.pvalue)
            assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    mlp = diff[diff["site_kind"] == "mlp_out"].set_index("layer")
    assert mlp.loc[2, "diff"] == pytest.approx(0.5, abs=0.05) and mlp.loc[2, "p_corr"] < 1e-4
    assert (mlp.drop(index=2)["p_corr"] > 0.05).all()
    assert (diff[diff["site_kind"] == "resid_pre"]["p_corr"] > 0.05).all()


def test_layer_by_model_anova_matches_statsmodels(tmp_path):
    from statsmodels.stats.anova import AnovaRM

    a, b = _runs(tmp_path)
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    anova = res.anova[res.anova["site_kind"] == "mlp_out"].set_index("Source")
    wa, wb = _per_probe(a, "mlp_out"), _per_probe(b, "mlp_out")
    long = pd.concat([w.stack().rename("value").reset_index().assign(model=m) for w, m in ((wa, "A"), (wb, "B"))])
    long["layer"] = long["layer"].astype(int)
    ref = AnovaRM(long, "value", "probe_id", within=["layer", "model"]).fit().anova_table
    for ours, theirs in (("layer", "layer"), ("model", "model"), ("layer * model", "layer:model")):
        assert anova.loc[ours, "F"] == pytest.approx(ref.loc[theirs, "F Value"], rel=1e-8)
        assert anova.loc[ours, "p_unc"] == pytest.approx(ref.loc[theirs, "Pr > F"], rel=1e-6)
    assert anova.loc["layer * model", "p_unc"] < 1e-4 and anova.loc["model", "p_unc"] < 1e-3


def test_mismatched_runs_are_refused_with_the_probes_named():
    a = make_results(n_probes=8, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", "b"),
                     trivial_sites=False)
    with pytest.raises(ClapError, match=r"different probes: 1 only in A \(p003\)"):
        check_matched(a, a[a["probe_id"] != "p003"], [GROUP])
    b = a.copy()
    b.loc[(b["probe_id"] == "p005") & (b["position"] == 1), "token"] = "z"
    with pytest.raises(ClapError, match=r"1 probe\(s\) have different prompt tokens .*p005: 'ab' vs 'az'"):
        check_matched(a, b, [GROUP])
    b = a.copy()
    b.loc[b["probe_id"].isin(["p001", "p002"]), GROUP] = "other"
    with pytest.raises(ClapError,
                       match=r"column 'knowledge_type' differs between the runs for 2 probe\(s\) \(p001, p002\)"):
        check_matched(a, b, [GROUP])
    with pytest.raises(ClapError, match=r"different sites: 1 only in A \(layers.2.resid_pre\)"):
        check_matched(a, a[a["layer"] != 2], [GROUP])


def test_cli_compare_writes_report_and_heatmap(tmp_path, capsys):
    _runs(tmp_path)
    assert main(["--quiet", "compare", str(tmp_path / "A"), str(tmp_path / "B"), "-o", str(tmp_path / "out")]) == 0
    assert "10 probes paired" in capsys.readouterr().out
    out = tmp_path / "out"
    for name in ("paired_differences.csv", "layer_differences.csv", "layer_model_anova.csv", "compare.md"):
        assert (out / name).is_file(), name
    doc = lxml.html.fromstring((out / "compare.html").read_text())
    assert len(doc.xpath("//img[starts-with(@src, 'data:image/png;base64,')]")) == 1
    assert "Repeated-measures ANOVA: layer x model" in doc.text_content()
    bold = [r.xpath("./td")[0].text_content() for r in doc.xpath("//tr[@class='sig']")]
    assert "2" in bold  # the planted layer's row is highlighted
    # missing ids: exit code 2 with the reason
    b = pd.read_parquet(tmp_path / "B" / "results.parquet")
    b = b[b["probe_id"] != "p004"]
    b.to_parquet(tmp_path / "B" / "results.parquet", index=False)
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "-o", str(tmp_path / "o2")]) == 2
    assert "p004" in capsys.readouterr().err
