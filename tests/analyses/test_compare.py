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


def _with_probes(meta, frame):
    """run.json's ``probes`` list as the engine writes it (prompts and answer tokens per probe)."""
    ids = sorted(frame["probe_id"].unique())
    meta["probes"] = [{"probe_id": pid, "clean": f"The fact about {pid} is", "corrupted": f"The fact about {pid} was",
                       "answer_ids": [10 + i], "wrong_ids": [50 + i]} for i, pid in enumerate(ids)]
    return meta


def test_same_id_with_other_prompts_or_answers_is_refused(tmp_path):
    """Rows carry only the tokens at patched positions: a clean prompt changed elsewhere (same length) or another
    answer must still be refused, naming each probe and field."""
    a = make_results(n_probes=6, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", "b"),
                     trivial_sites=False)
    meta_a = _with_probes(make_meta(a, group_columns=[GROUP]), a)
    save_results(a, meta_a, tmp_path / "A")
    meta_b = _with_probes(make_meta(a, group_columns=[GROUP]), a)
    meta_b["probes"][2]["clean"] = meta_b["probes"][2]["clean"].replace("fact", "FACT")
    meta_b["probes"][4]["answer_ids"] = [99]
    meta_b["probes"][5]["corrupted"] = "Something else entirely"
    save_results(a, meta_b, tmp_path / "B")
    with pytest.raises(ClapError) as info:
        compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    text = str(info.value)
    assert text.startswith("3 probe id(s) stand for different probes in the two runs")
    assert "p002 (clean; clean: 'The fact about p002 is' in" in text and "'The FACT about p002 is' in" in text
    assert "p004 (answer_ids; answer_ids: [14] in" in text
    assert "p005 (corrupted;" in text
    assert not (tmp_path / "out").exists()
    save_results(a, meta_a, tmp_path / "A2")  # the same probes recorded alike: paired
    assert compare(tmp_path / "A", tmp_path / "A2", tmp_path / "ok", figures=False).paired["probe_id"].nunique() == 6


def test_compare_honours_the_analysis_options(tmp_path):
    """``position_reduction: max`` (recorded in run A's spec, or given) gives each probe's max over positions, as
    ``clap analyze`` does; the exclusion rules drop a probe failing them in either run from both."""
    a = make_results(n_probes=8, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",),
                     tokens=("a", "b", "c"), trivial_sites=False, seed=2)
    rng = np.random.default_rng(4)
    b = a.copy()
    b["recovery"] = b["recovery"] + rng.normal(0, 0.3, len(b))
    save_results(a, make_meta(a, group_columns=[GROUP], analysis={"position_reduction": "max"}), tmp_path / "A")
    save_results(b, make_meta(b, group_columns=[GROUP]), tmp_path / "B")

    def reduced(frame, how):
        rows = frame[frame["recovery_defined"]]
        if how == "last":
            rows = rows[rows["position"] == rows.groupby("probe_id")["position"].transform("max")]
            return rows.groupby(["probe_id", "layer"])["recovery"].first()
        return rows.groupby(["probe_id", "layer"])["recovery"].max()

    for given, how in ((None, "max"), ({"position_reduction": "last"}, "last")):
        res = compare(tmp_path / "A", tmp_path / "B", tmp_path / f"out-{how}", figures=False, analysis=given)
        paired = res.paired.set_index(["probe_id", "layer"]).sort_index()
        expected = (reduced(b, how) - reduced(a, how)).sort_index()
        np.testing.assert_allclose(paired["diff"].to_numpy(), expected.loc[paired.index].to_numpy(), atol=1e-12)
        assert len(paired) == len(expected) == 8 * 3
        assert res.options["position_reduction"] == how
    assert "max over positions" in set(compare(tmp_path / "A", tmp_path / "B", tmp_path / "o", figures=False)
                                       .paired["reduction"].str.split(" \\(").str[0])

    # an exclusion rule: the probes whose |clean - corrupted| is below the threshold in A or in B
    ends = a[a["metric"] == "logit_diff"].groupby("probe_id")[["clean", "corrupted"]].first()
    gap = (ends["clean"] - ends["corrupted"]).abs().sort_values()
    threshold = float(gap.iloc[2:4].mean())  # between the 3rd and 4th smallest: 3 probes fail
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "excl", figures=False,
                  analysis={"position_reduction": "max", "min_abs_diff": threshold})
    dropped = sorted(gap.index[:3])
    assert sorted(res.excluded["probe_id"]) == dropped and set(res.excluded["run"]) == {"both"}
    assert not set(res.paired["probe_id"]) & set(dropped) and res.paired["probe_id"].nunique() == 5
    assert (tmp_path / "excl" / "excluded_probes.csv").is_file()
    assert f"Excluded by the analysis rules (from both runs): 3 probe(s) ({', '.join(dropped)};" in (
        tmp_path / "excl" / "compare.md").read_text()
