"""The cross-domain table (:mod:`analyses.domains`): planted per-domain profiles give the known verdicts, every
number equals analyses/localization.py (or scipy) on that domain's probes alone, pairs are oriented definitional /
one_hop first, additivity gaps and composed-vs-part comparisons against hand computations, and a missing label is
refused by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses.domains import (
    COLUMNS,
    CROSS_DOMAIN_FILE,
    cross_domain_table,
    display,
    findings,
    read_compositions,
    resolve_domain,
    verdict,
)
from analyses.formatting import fmt
from analyses.localization import (
    compare_localization,
    localization_measures,
    permutation_test,
    summarize_localization,
)
from analyses.select import analysis_units
from analyses.synthetic import make_meta, make_results
from clap.errors import ClapError

GROUP = "knowledge_type"
N_LAYERS = 8
SPIKE = [0, 0, 0, 0, 1.2, 0, 0, 0]
FLAT = [0.25] * N_LAYERS
#: two sharp peaks far apart (few effective layers, a wide 80 % window) vs a contiguous block of four layers (more
#: effective layers, a narrow window): the concentration measures disagree
TWO_PEAKS = [0.6, 0, 0, 0, 0, 0, 0, 0.6]
BLOCK = [0, 0, 0.3, 0.3, 0.3, 0.3, 0, 0]
def _approx(value, **kwargs):
    return pytest.approx(value, nan_ok=True, **kwargs)


PLANTED = {  # domain -> (definitional profile, associative profile, expected verdict)
    "alpha": (SPIKE, FLAT, "definitional more localized"),
    "beta": (FLAT, SPIKE, "associative more localized"),
    "gamma": (FLAT, FLAT, "cannot tell"),
    "delta": (TWO_PEAKS, BLOCK, "mixed"),
}


def planted(n_per_group: int = 6, noise_sd: float = 0.03) -> pd.DataFrame:
    """Per domain and knowledge type, ``n_per_group`` probes around one planted profile (attn_out and mlp_out)."""
    frames = []
    seed = 0
    for topic, (definitional, associative, _) in PLANTED.items():
        for kind, profile in (("definitional", definitional), ("associative", associative)):
            seed += 1
            f = make_results(n_probes=n_per_group, n_layers=N_LAYERS, groups={GROUP: (kind,)}, layer_effect=profile,
                             site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",), tokens=("x", "y"),
                             noise_sd=noise_sd, probe_sd=0.0, trivial_sites=False, seed=seed)
            f["probe_id"] = f["probe_id"].str.replace("p", f"{topic}-{kind[:3]}-")
            f["topic"] = topic
            frames.append(f)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def table():
    data = planted()
    out, skipped = cross_domain_table(data, analysis_units(data), domain="topic", group=GROUP, n_layers=N_LAYERS)
    return data, out, skipped


def test_planted_profiles_give_the_known_verdict_in_each_domain(table):
    _, out, skipped = table
    assert list(out.columns) == COLUMNS and not skipped
    for topic, (_, _, expected) in PLANTED.items():
        got = set(out.loc[out["domain"] == topic, "verdict"])
        assert got == {expected}, topic
    assert set(out["domain_label"]) == {"topic"} and set(out["group_label"]) == {GROUP}
    # the mixed domain: fewer effective layers for two peaks, a narrower window for the block, both significant
    delta = out[(out["domain"] == "delta") & (out["site_kind"] == "mlp_out")].set_index("quantity")
    assert delta.loc["eff_layers_pr", "more_localized"] == "definitional"
    assert delta.loc["window_width", "more_localized"] == "associative"
    assert delta.loc["eff_layers_pr", "p_holm"] < 0.05 and delta.loc["window_width", "p_holm"] < 0.05
    # the findings name the measures behind each verdict: the significant concentration measures, else the
    # effective layers
    text = {line.split(" ")[0]: line for line in findings(out)}
    pr, window = (delta.loc[m] for m in ("eff_layers_pr", "window_width"))
    assert (f"`mlp_out`: mixed (effective layers (participation ratio) {fmt(pr['mean_A'])} vs "
            f"{fmt(pr['mean_B'])}, Holm p {fmt(pr['p_holm'])}") in text["delta"]
    assert (f"narrowest 80 % window (layers) {fmt(window['mean_A'])} vs {fmt(window['mean_B'])}, Holm p "
            f"{fmt(window['p_holm'])}") in text["delta"]
    assert "`mlp_out`: cannot tell (effective layers (participation ratio) " in text["gamma"]


def test_each_domain_equals_the_localization_module_on_that_domains_probes(table):
    data, out, _ = table
    for topic in PLANTED:
        sub = data[data["topic"] == topic]
        for kind in ("attn_out", "mlp_out"):
            measures = localization_measures(sub, between=GROUP, site_kind=kind, n_layers=N_LAYERS)
            tests = compare_localization(measures, GROUP).set_index("measure")
            groups = summarize_localization(measures, GROUP).set_index([GROUP, "measure"])
            rows = out[(out["domain"] == topic) & (out["site_kind"] == kind)
                       & (out["part"] == "localization")].set_index("quantity")
            assert len(rows) == len(tests) == 7
            for measure, t in tests.iterrows():
                r = rows.loc[measure]
                # localization.py sorts the pair by name (associative, definitional); the table writes definitional
                # first, so the difference and its interval change sign and the p-values stay
                assert (t["A"], t["B"], r["A"], r["B"]) == ("associative", "definitional", "definitional",
                                                            "associative")
                assert r["diff"] == _approx(-t["diff"], abs=1e-12)
                assert (r["ci_low"], r["ci_high"]) == (_approx(-t["ci_high"]), _approx(-t["ci_low"]))
                assert (r["p"], r["p_holm"]) == (_approx(t["p_perm"]), _approx(t["p_perm_holm"]))
                d, a = groups.loc[("definitional", measure)], groups.loc[("associative", measure)]
                assert (r["n_A"], r["mean_A"], r["ci_A_low"], r["ci_A_high"]) == (
                    d["n"], _approx(d["mean"]), _approx(d["ci_low"]), _approx(d["ci_high"]))
                assert (r["n_B"], r["mean_B"], r["ci_B_high"]) == (a["n"], _approx(a["mean"]),
                                                                   _approx(a["ci_high"]))


def test_difference_is_definitional_minus_associative_by_hand(table):
    data, out, _ = table
    sub = data[(data["topic"] == "alpha") & (data["site_kind"] == "mlp_out")]
    # participation ratio by hand from the planted rows (components: their own recovery at the last token)
    sub = sub[sub["position"] == sub["position"].max()]
    per = sub.pivot(index="probe_id", columns="layer", values="recovery")
    pr = per.abs().sum(axis=1) ** 2 / (per**2).sum(axis=1)
    kinds = sub.drop_duplicates("probe_id").set_index("probe_id")[GROUP]
    d, a = pr[kinds == "definitional"].to_numpy(), pr[kinds == "associative"].to_numpy()
    row = out[(out["domain"] == "alpha") & (out["site_kind"] == "mlp_out")
              & (out["quantity"] == "eff_layers_pr")].iloc[0]
    assert row["diff"] == pytest.approx(d.mean() - a.mean())
    welch = sps.ttest_ind(d, a, equal_var=False).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(welch.low), pytest.approx(welch.high))
    assert row["p"] == pytest.approx(permutation_test(d, a)[1])
    assert row["more_localized"] == "definitional"


def test_verdict_words():
    rows = pd.DataFrame({"quantity": ["eff_layers_pr", "window_width", "centre_of_mass"],
                         "p_holm": [0.01, 0.2, 0.001], "more_localized": ["x", "y", pd.NA]})
    assert verdict(rows) == "x more localized"  # centre of mass says where, not how concentrated
    assert verdict(rows.assign(p_holm=[0.01, 0.04, 0.5])) == "mixed"
    assert verdict(rows.assign(p_holm=[0.2, np.nan, 0.001])) == "cannot tell"


def test_missing_or_misused_labels_are_refused():
    labels = {"knowledge_type": ["a", "b"], "topic": ["x", "y"], "subject": ["s", "t"]}
    assert resolve_domain(None, labels, "knowledge_type") == "topic"
    assert resolve_domain(None, {"knowledge_type": ["a", "b"]}, "knowledge_type") is None
    assert resolve_domain(None, {**labels, "topic": ["x", "x"]}, "knowledge_type") is None  # one domain: no table
    assert resolve_domain("subject", labels, "knowledge_type") == "subject"
    with pytest.raises(ClapError, match=r"'topc' is not a label of the probes.*did you mean 'topic'.*labels: "
                                        r"knowledge_type, subject, topic"):
        resolve_domain("topc", labels, "knowledge_type")
    with pytest.raises(ClapError, match="is also the analysis group"):
        resolve_domain("knowledge_type", labels, "knowledge_type")
    data = planted(n_per_group=3).drop(columns="topic")
    with pytest.raises(ClapError, match="no domain label 'topic'"):
        cross_domain_table(data, analysis_units(data), domain="topic", group=GROUP)


def test_additivity_gap_per_domain_and_group_by_hand():
    data = planted(n_per_group=4)
    units = analysis_units(data)
    rng = np.random.default_rng(3)
    probes = data.drop_duplicates("probe_id")[["probe_id", "topic", GROUP]]
    cells = []
    for p in probes["probe_id"]:
        for family, k, size in (("top_m", 2, 2), ("top_m", N_LAYERS, N_LAYERS), ("pair", None, 2),
                                ("pair", None, 2)):
            cells.append({"probe_id": p, "site_kind": "mlp_out", "family": family, "k": k, "size": size,
                          "gap": float(rng.normal()), "positions": "all", "metric": "logit_diff"})
    cells = pd.DataFrame(cells)
    out, _ = cross_domain_table(data, units, domain="topic", group=GROUP, n_layers=N_LAYERS, additivity=cells)
    add = out[out["part"] == "additivity"]
    assert set(add["quantity"]) == {"gap_all_layers", "gap_top2", "interaction_pairs"}
    assert set(add["site_kind"]) == {"mlp_out"} and set(add["metric"]) == {"logit_diff"}
    merged = cells.merge(probes, on="probe_id")
    for quantity, rule in (("gap_all_layers", merged["size"] == N_LAYERS),
                           ("interaction_pairs", merged["family"] == "pair")):
        per_probe = merged[rule].groupby(["probe_id", "topic", GROUP])["gap"].mean().reset_index()
        x = per_probe[(per_probe.topic == "beta") & (per_probe[GROUP] == "definitional")]["gap"].to_numpy()
        y = per_probe[(per_probe.topic == "beta") & (per_probe[GROUP] == "associative")]["gap"].to_numpy()
        row = add[(add["domain"] == "beta") & (add["quantity"] == quantity)].iloc[0]
        assert (row["A"], row["B"], row["n_A"], row["n_B"]) == ("definitional", "associative", 4, 4)
        half = sps.t.ppf(0.975, 3) * x.std(ddof=1) / 2
        assert (row["mean_A"], row["ci_A_low"]) == (pytest.approx(x.mean()), pytest.approx(x.mean() - half))
        assert row["diff"] == pytest.approx(x.mean() - y.mean())
        welch = sps.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(welch.low), pytest.approx(welch.high))
        assert row["p"] == pytest.approx(permutation_test(x, y)[1]) and pd.isna(row["p_holm"])
    # the bottom-up stack ending at the last layer is "every layer" too
    bottom = cells[cells["size"] == N_LAYERS].assign(family="bottom", k=N_LAYERS - 1)
    again, _ = cross_domain_table(data, units, domain="topic", group=GROUP, n_layers=N_LAYERS, additivity=bottom)
    a = again[again["quantity"] == "gap_all_layers"].reset_index(drop=True)
    b = add[add["quantity"] == "gap_all_layers"].reset_index(drop=True)
    assert a["diff"].to_numpy() == pytest.approx(b["diff"].to_numpy())


def composed_frame(n_chains: int = 5, seed: int = 8) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A compositional domain: per chain a first hop, a second hop and the composed probe (two_hop); random profiles
    over 6 layers, the composed probe's deeper than its hops'."""
    rng = np.random.default_rng(seed)
    rows, composes = [], {}
    for c in range(n_chains):
        ids = {"first": f"h1-{c}", "second": f"h2-{c}", "composed": f"th-{c}"}
        composes[ids["composed"]] = [ids["first"], ids["second"]]
        for role, pid in ids.items():
            shift = 2.5 if role == "composed" else 0.0
            profile = np.exp(-0.5 * ((np.arange(6) - 1.5 - shift - rng.normal(0, 0.6)) / 0.8) ** 2)
            for layer, value in enumerate(profile):
                rows.append({"probe_id": pid, "site": f"layers.{layer}.mlp_out", "site_kind": "mlp_out",
                             "layer": layer, "position": 3, "positions": "last", "operation": "replace",
                             "direction": "denoising", "metric": "logit_diff", "recovery": float(value),
                             "recovery_defined": True, "trivial": False, "token": "x", "head": pd.NA,
                             GROUP: "two_hop" if role == "composed" else "one_hop", "topic": "chains"})
    return pd.DataFrame(rows), composes


def test_composed_probes_against_their_parts_equal_a_paired_t_test():
    data, composes = composed_frame()
    other = planted(n_per_group=3)
    other = other[other["topic"] == "alpha"]
    both = pd.concat([data, other[data.columns]], ignore_index=True)
    out, _ = cross_domain_table(both, analysis_units(both), domain="topic", group=GROUP, n_layers=6,
                                composes=composes)
    comp = out[out["part"] == "composition"]
    assert set(comp["domain"]) == {"chains"} and set(comp["A"]) == {"two_hop"}
    assert set(comp["B"]) == {"first hop", "second hop", "both hops (mean)"}
    measures = localization_measures(data, between=GROUP, site_kind="mlp_out", n_layers=6).set_index("probe_id")
    pairs = sorted(composes)
    for reference, pick in (("first hop", lambda h, m: measures.loc[h[0], m]),
                            ("second hop", lambda h, m: measures.loc[h[1], m]),
                            ("both hops (mean)", lambda h, m: (measures.loc[h[0], m] + measures.loc[h[1], m]) / 2)):
        block = comp[comp["B"] == reference].set_index("quantity")
        ps = []
        for name in ("centre_of_mass", "peak_depth", "eff_layers_pr", "window_width"):
            a = np.array([measures.loc[c, name] for c in pairs], float)
            b = np.array([pick(composes[c], name) for c in pairs], float)
            test = sps.ttest_rel(a, b)
            r = block.loc[name]
            assert (r["n_A"], r["mean_A"], r["mean_B"]) == (5, pytest.approx(a.mean()), pytest.approx(b.mean()))
            assert r["diff"] == pytest.approx((a - b).mean())
            ci = test.confidence_interval(0.95)
            assert (r["ci_low"], r["ci_high"], r["p"]) == (pytest.approx(ci.low), pytest.approx(ci.high),
                                                           pytest.approx(test.pvalue))
            ps.append(test.pvalue)
        import pingouin as pg

        holm = pg.multicomp(np.array(ps), method="holm")[1]
        names = ["centre_of_mass", "peak_depth", "eff_layers_pr", "window_width"]
        assert block.loc[names, "p_holm"].to_numpy() == pytest.approx(holm)
    # the composed probes sit deeper than the mean of their hops, as planted
    row = comp[(comp["B"] == "both hops (mean)") & (comp["quantity"] == "centre_of_mass")].iloc[0]
    assert row["diff"] > 0 and row["p_holm"] < 0.05
    # a composition whose part was excluded leaves the pairs
    fewer, _ = cross_domain_table(both[both["probe_id"] != "h2-0"], analysis_units(both), domain="topic",
                                  group=GROUP, n_layers=6, composes=composes)
    assert set(fewer.loc[fewer["part"] == "composition", "n_A"]) == {4}
    text = findings(out)
    assert any(t.startswith("chains: centre of mass of the composed probes") for t in text)
    contrast, composed = display(out)
    assert list(composed["composed vs"].unique()) == ["first hop", "second hop", "both hops (mean)"]
    assert set(contrast["groups"]) == {"definitional vs associative", "one_hop vs two_hop"}


def test_compositions_are_read_from_the_probe_file_run_json_names(tmp_path):
    import json

    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "composes": []}, {"id": "c", "composes": ["a", "b"]}, {"id": "b"}]), encoding="utf-8")
    assert read_compositions({"spec": {"probes": {"file": str(path)}}}) == {"c": ["a", "b"]}
    assert read_compositions({"spec": {"probes": {"file": "probes.jsonl"}}}, tmp_path / "run") == {"c": ["a", "b"]}
    assert read_compositions({"spec": {"probes": {"file": str(tmp_path / "gone.jsonl")}}}) == {}


def test_analyze_writes_the_table_and_the_report_section(tmp_path):
    from analyses.io import save_results
    from analyses.pipeline import analyze
    from analyses.report import render_html, render_markdown

    data = planted(n_per_group=4)
    run = save_results(data, make_meta(data, seed=0, group_columns=[GROUP, "topic"]), tmp_path / "run")
    result = analyze(run, figures=False, n_boot=50)
    assert result.options["domain"] == "topic"
    written = pd.read_csv(result.out_dir / CROSS_DOMAIN_FILE)
    direct, _ = cross_domain_table(result.data, result.tables["units"], domain="topic", group=GROUP,
                                   n_layers=N_LAYERS, seed=result.options["seed"])
    assert len(written) == len(direct) == 4 * 2 * 7
    assert written["diff"].to_numpy() == pytest.approx(direct["diff"].to_numpy())
    assert list(written["verdict"]) == list(direct["verdict"])
    html, md = render_html(result), render_markdown(result)
    assert 'id="cross_domain"' in html and "## Across domains: localization within each `topic`" in md
    assert "alpha (definitional vs associative, n = 4 / 4)" in md
    assert any(m.startswith("Cross-domain table:") for m in result.methods)
    # the label declared; a label the probes lack is refused by name before anything is written
    declared = analyze(run, out_dir=tmp_path / "other", figures=False, n_boot=50, analysis={"domain": "topic",
                                                                                      "group": GROUP})
    assert declared.options["domain"] == "topic" and (tmp_path / "other" / CROSS_DOMAIN_FILE).exists()
    with pytest.raises(ClapError, match="analysis.domain: 'field' is not a label of the probes"):
        analyze(run, out_dir=tmp_path / "bad", figures=False, n_boot=50, analysis={"domain": "field"})
    assert not (tmp_path / "bad").exists()
    # without the label there is no table
    plain = save_results(data.drop(columns="topic"), make_meta(data, seed=0, group_columns=[GROUP]),
                         tmp_path / "plain")
    assert analyze(plain, figures=False, n_boot=50).options["domain"] is None
    assert not (plain / "analysis" / CROSS_DOMAIN_FILE).exists()
