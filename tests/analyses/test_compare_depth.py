"""``clap compare`` across models of different depth, per relative depth bin (analyses/depth.py).

Every number is checked against an independent computation: the bins by exact fractions, each probe's bin value by
hand-binning the results with pandas, the paired t-tests and intervals with scipy, Holm with statsmodels, the
bin x model ANOVA with statsmodels' ``AnovaRM``; and end to end on two tiny random GPT-2 models of 4 and 6 layers run
through ``Study``."""

from __future__ import annotations

import json
from fractions import Fraction
from math import floor

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analyses import depth
from analyses.compare import compare
from analyses.formatting import fmt
from analyses.io import save_results
from analyses.synthetic import make_meta, make_results
from clap.app.cli import main
from clap.errors import ClapError

from .conftest import GROUP

KINDS = ("resid_pre", "mlp_out")


def _hand_bin(layer: int, n_layers: int, bins: int) -> int:
    """The bin of (layer + 1/2) / n_layers in [0, 1) cut into ``bins`` equal parts, in exact fractions."""
    return floor((Fraction(layer) + Fraction(1, 2)) / n_layers * bins)


def test_bins_follow_relative_depth_exactly():
    assert depth.bin_table(4, 4)["depth_bin"].tolist() == [0, 1, 2, 3]
    assert depth.bin_table(6, 4)["depth_bin"].tolist() == [0, 1, 1, 2, 3, 3]  # 1.5 / 6 * 4 = 1: upper bin
    assert depth.bin_table(6, 4)["depth_range"].tolist()[1] == "[0.25, 0.50)"
    for n in range(1, 14):
        for k in range(1, 14):
            got = depth.depth_bin(np.arange(n), n, k).tolist()
            assert got == [_hand_bin(layer, n, k) for layer in range(n)], (n, k)
    # the default, min(N_A, N_B) bins, leaves no bin without a layer of either model
    for n_a in range(1, 13):
        for n_b in range(1, 13):
            bins = depth.resolve_bins(None, n_a, n_b)
            if n_a == n_b:
                assert bins is None  # equal depths: paired by layer
                continue
            for n in (n_a, n_b):
                assert set(depth.depth_bin(np.arange(n), n, bins).tolist()) == set(range(bins)), (n_a, n_b)
    assert depth.resolve_bins(3, 6, 6) == 3
    with pytest.raises(ClapError, match="whole number of at least 1"):
        depth.resolve_bins(0, 4, 6)


def _run(n_layers: int, seed: int, profile: list[float] | None = None, n_probes: int = 10) -> pd.DataFrame:
    return make_results(n_probes=n_probes, n_layers=n_layers, site_kinds=KINDS, metrics=("logit_diff",),
                        tokens=("a", "b"), trivial_sites=False, layer_effect=profile if profile else 0.6,
                        seed=seed)


def _save(frame: pd.DataFrame, folder, **meta) -> None:
    m = make_meta(frame, group_columns=[GROUP])
    m.update(meta)
    save_results(frame, m, folder)


def _per_layer(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Each probe's value per layer at its last token (the default reduction), with its group."""
    rows = frame[(frame["site_kind"] == kind) & frame["recovery_defined"]]
    rows = rows[rows["position"] == rows.groupby("probe_id")["position"].transform("max")]
    return rows[["probe_id", GROUP, "layer", "recovery"]].astype({"layer": int})


def _hand_binned(frame: pd.DataFrame, kind: str, n_layers: int, bins: int) -> pd.Series:
    """Per probe and bin: the mean over the bin's layers (times N / K for a contribution), probes complete only."""
    per = _per_layer(frame, kind).copy()
    per["bin"] = [_hand_bin(layer, n_layers, bins) for layer in per["layer"]]
    expected_count = per.drop_duplicates("layer").groupby("bin").size()
    grouped = per.groupby(["probe_id", "bin"])["recovery"]
    value, count = grouped.mean(), grouped.size()
    value = value[count.to_numpy() == expected_count.reindex(count.index.get_level_values("bin")).to_numpy()]
    return value * (n_layers / bins if kind == "mlp_out" else 1.0)


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """A 4-layer run A and a 6-layer run B of the same 10 probes; B's MLP outputs carry a planted extra 0.8 (x 0.8
    kind scale) in its top two layers, i.e. in relative depth bin 3; its residual stream follows A's profile."""
    root = tmp_path_factory.mktemp("depth")
    a = _run(4, seed=1, profile=[0.2, 0.5, 0.5, 0.2])
    b = _run(6, seed=2, profile=[0.2, 0.4, 0.5, 0.5, 1.0, 1.0])
    _save(a, root / "A")
    _save(b, root / "B")
    return root, a, b


def test_depth_comparison_equals_hand_binning_and_scipy(depth_runs):
    root, a, b = depth_runs
    res = compare(root / "A", root / "B", root / "out", figures=False)
    assert (res.level, res.bins, res.depths) == ("depth_bin", 4, (4, 6))
    for kind in KINDS:
        ha, hb = _hand_binned(a, kind, 4, 4), _hand_binned(b, kind, 6, 4)
        diff = (hb - ha).dropna()
        paired = res.paired[res.paired["site_kind"] == kind].set_index(["probe_id", "depth_bin"]).sort_index()
        assert len(paired) == len(diff) == 40
        np.testing.assert_allclose(paired["value_A"], ha.loc[paired.index], atol=1e-12)
        np.testing.assert_allclose(paired["value_B"], hb.loc[paired.index], atol=1e-12)
        table = res.differences[res.differences["site_kind"] == kind].set_index("depth_bin")
        p_values = []
        for k in range(4):
            va, vb = ha.xs(k, level="bin"), hb.xs(k, level="bin").loc[ha.xs(k, level="bin").index]
            d = (vb - va).to_numpy()
            t = sps.ttest_rel(vb, va)
            low, high = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
            row = table.loc[k]
            assert row["n"] == 10 and row["diff"] == pytest.approx(d.mean(), abs=1e-12)
            assert row["T"] == pytest.approx(t.statistic) and row["p_unc"] == pytest.approx(t.pvalue)
            assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
            p_values.append(t.pvalue)
        np.testing.assert_allclose(table["p_corr"], multipletests(p_values, method="holm")[1], rtol=1e-9)
    assert table.loc[1, "layers_A"] == "1" and table.loc[1, "layers_B"] == "1, 2"
    assert table.loc[3, "depth_range"] == "[0.75, 1.00)"
    mlp = res.differences[res.differences["site_kind"] == "mlp_out"].set_index("depth_bin")
    assert mlp.loc[3, "p_corr"] < 0.01 and mlp.loc[3, "diff"] > 0.5  # the planted bin
    assert (mlp.drop(index=3)["p_corr"] > 0.05).all()


def test_depth_by_model_anova_matches_statsmodels(depth_runs):
    from statsmodels.stats.anova import AnovaRM

    root, a, b = depth_runs
    res = compare(root / "A", root / "B", root / "out-anova", figures=False)
    for kind in KINDS:
        ha, hb = _hand_binned(a, kind, 4, 4), _hand_binned(b, kind, 6, 4)
        long = pd.concat([h.rename("value").reset_index().assign(model=m) for h, m in ((ha, "A"), (hb, "B"))])
        ref = AnovaRM(long, "value", "probe_id", within=["bin", "model"]).fit().anova_table
        ours = res.anova[res.anova["site_kind"] == kind].set_index("Source")
        for name, theirs in (("depth_bin", "bin"), ("model", "model"), ("depth_bin * model", "bin:model")):
            assert ours.loc[name, "F"] == pytest.approx(ref.loc[theirs, "F Value"], rel=1e-8)
            assert ours.loc[name, "p_unc"] == pytest.approx(ref.loc[theirs, "Pr > F"], rel=1e-6)
            assert ours.loc[name, "ddof1"] == ref.loc[theirs, "Num DF"]
    mlp = res.anova[res.anova["site_kind"] == "mlp_out"].set_index("Source")
    assert mlp.loc["depth_bin * model", "p_unc"] < 1e-3


def test_tables_figures_and_findings_say_relative_depth_bin(depth_runs):
    from statsmodels.stats.anova import AnovaRM

    root, a, b = depth_runs
    out = root / "out-report"
    res = compare(root / "A", root / "B", out, figures=True)
    for name in ("depth_differences.csv", "depth_model_anova.csv", "depth_bins.csv", "paired_differences.csv"):
        assert (out / name).is_file(), name
    assert not (out / "layer_differences.csv").exists()
    bins = pd.read_csv(out / "depth_bins.csv")
    assert bins.groupby("model")["depth_bin"].apply(list).to_dict() == {"A": [0, 1, 2, 3], "B": [0, 1, 1, 2, 3, 3]}
    md = (out / "compare.md").read_text()
    assert "### Paired difference per relative depth bin (B - A, t-test, Holm over relative depth bins)" in md
    assert "### Repeated-measures ANOVA: relative depth bin x model" in md
    assert "The models differ in depth (A: 4 layers, B: 6 layers)" in md
    assert "| 1 | [0.25, 0.50) | 1 | 1, 2 |" in md
    assert "Paired difference per layer" not in md and "ANOVA: layer x model" not in md
    record = json.loads((out / "findings.json").read_text())
    (mlp,) = [s for s in record["slices"] if "mlp_out" in s["slice"]]
    model, interaction, largest = mlp["headline"]
    ha, hb = _hand_binned(a, "mlp_out", 4, 4), _hand_binned(b, "mlp_out", 6, 4)
    long = pd.concat([h.rename("value").reset_index().assign(model=m) for h, m in ((ha, "A"), (hb, "B"))])
    ref = AnovaRM(long, "value", "probe_id", within=["bin", "model"]).fit().anova_table
    assert f"F(1, 9) = {fmt(ref.loc['model', 'F Value'])}" in model
    assert f"relative depth bin x model F(3, 27) = {fmt(ref.loc['bin:model', 'F Value'])}" in interaction
    assert interaction.startswith("The difference depends on the relative depth bin")
    top = (hb - ha).groupby(level="bin").mean()
    assert largest.startswith(f"Largest difference per relative depth bin: +{fmt(top.max())} at relative depth bin "
                              f"3 [0.75, 1.00) ")
    assert "B - A differs at relative depth bin 3 after Holm correction" in largest
    heat = res.files[[p.name.startswith("difference_") and p.suffix == ".png" for p in res.files].index(True)]
    assert heat.is_file()
    assert "relative depth bin" in (heat.with_suffix(".svg")).read_text()


def test_a_probe_lacking_a_layer_has_no_value_in_its_bin(tmp_path):
    a, b = _run(4, seed=1), _run(6, seed=2)
    b = b[~((b["probe_id"] == "p003") & (b["layer"] == 2) & (b["site_kind"] == "mlp_out"))]
    _save(a, tmp_path / "A")
    _save(b, tmp_path / "B")
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    mlp = res.paired[res.paired["site_kind"] == "mlp_out"]
    assert not ((mlp["probe_id"] == "p003") & (mlp["depth_bin"] == 1)).any()
    assert ((mlp["probe_id"] == "p003") & (mlp["depth_bin"] != 1)).sum() == 3
    table = res.differences.set_index(["site_kind", "depth_bin"])
    assert table.loc[("mlp_out", 1), "n"] == 9 and table.loc[("mlp_out", 0), "n"] == 10
    assert table.loc[("resid_pre", 1), "n"] == 10
    # the ANOVA keeps the probes complete in every bin
    assert set(res.anova.loc[res.anova["site_kind"] == "mlp_out", "n_subjects"]) == {9}


def test_more_bins_than_layers_leave_out_the_bins_of_one_model(tmp_path):
    a, b = _run(4, seed=1), _run(6, seed=2)
    _save(a, tmp_path / "A")
    _save(b, tmp_path / "B")
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False, relative_depth=6)
    # A's layers sit at 1/8, 3/8, 5/8, 7/8: bins 0, 2, 3, 5 of six; B has one layer per bin
    assert sorted(set(res.paired["depth_bin"])) == [0, 2, 3, 5]
    assert any("bin(s) measured in one run only left out (B: 1, 4)" in note for note in res.notes)
    assert "Left out:" in (tmp_path / "out" / "compare.md").read_text()


def test_same_depth_forced_into_one_layer_bins_equals_the_layer_comparison(tmp_path):
    a = _run(5, seed=1)
    rng = np.random.default_rng(3)
    b = a.copy()
    b["recovery"] += rng.normal(0, 0.1, len(b))
    _save(a, tmp_path / "A")
    _save(b, tmp_path / "B")
    by_layer = compare(tmp_path / "A", tmp_path / "B", tmp_path / "layers", figures=False)
    assert by_layer.level == "layer" and by_layer.bins is None
    assert (tmp_path / "layers" / "layer_differences.csv").is_file()
    by_bin = compare(tmp_path / "A", tmp_path / "B", tmp_path / "bins", figures=False, relative_depth=5)
    assert by_bin.level == "depth_bin" and by_bin.bins == 5
    left = by_layer.differences.rename(columns={"layer": "depth_bin"})
    right = by_bin.differences[left.columns]
    pd.testing.assert_frame_equal(left.reset_index(drop=True), right.reset_index(drop=True), check_dtype=False)
    np.testing.assert_allclose(by_layer.anova["F"], by_bin.anova["F"], rtol=1e-12)
    assert "Both models have 5 layers; as asked (--relative-depth)" in (tmp_path / "bins" / "compare.md").read_text()


def _probes_meta(frame: pd.DataFrame, answer_base: int = 10) -> list[dict]:
    ids = sorted(frame["probe_id"].unique())
    return [{"probe_id": pid, "clean": f"The fact about {pid} is", "corrupted": f"The fact about {pid} was",
             "answer_ids": [answer_base + i], "wrong_ids": [answer_base + 50 + i]} for i, pid in enumerate(ids)]


def test_models_with_other_tokenizers_are_matched_on_prompt_text(tmp_path):
    """Another tokenizer: other tokens, another prompt length and other answer ids for the same probes. Paired when
    run.json records the same prompts; refused, naming the probe, when a prompt differs; refused when run.json
    records no prompts (nothing says the ids mean the same probes)."""
    a = _run(4, seed=1)
    b = make_results(n_probes=10, n_layers=6, site_kinds=KINDS, metrics=("logit_diff",), tokens=("x", "y", "z"),
                     trivial_sites=False, seed=2)
    _save(a, tmp_path / "A", probes=_probes_meta(a))
    _save(b, tmp_path / "B", probes=_probes_meta(b, answer_base=900))
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    assert res.paired["probe_id"].nunique() == 10 and res.bins == 4
    # each run's own last token: A's position 1, B's position 2
    ha, hb = _hand_binned(a, "resid_pre", 4, 4), _hand_binned(b, "resid_pre", 6, 4)
    paired = res.paired[res.paired["site_kind"] == "resid_pre"].set_index(["probe_id", "depth_bin"]).sort_index()
    np.testing.assert_allclose(paired["diff"], (hb - ha).loc[paired.index], atol=1e-12)

    probes = _probes_meta(b, answer_base=900)
    probes[3]["clean"] = "Another prompt entirely"
    _save(b, tmp_path / "B2", probes=probes)
    with pytest.raises(ClapError, match=r"1 probe id\(s\) stand for different probes .*p003 \(clean;"):
        compare(tmp_path / "A", tmp_path / "B2", tmp_path / "out2", figures=False)
    _save(b, tmp_path / "B3")
    with pytest.raises(ClapError, match="tokenized the prompts differently and their run.json files do not record"):
        compare(tmp_path / "A", tmp_path / "B3", tmp_path / "out3", figures=False)
    # the same tokenizer: answer ids must still agree
    a6 = _run(6, seed=3)
    _save(a6, tmp_path / "A6", probes=_probes_meta(a6, answer_base=900))
    _save(_run(4, seed=1), tmp_path / "A4", probes=_probes_meta(a6))
    with pytest.raises(ClapError, match=r"10 probe id\(s\) stand for different probes .*answer_ids"):
        compare(tmp_path / "A4", tmp_path / "A6", tmp_path / "out4", figures=False)


def test_nothing_to_align_is_refused(tmp_path):
    a = make_results(n_probes=6, n_layers=4, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a",),
                     trivial_sites=False)
    b = make_results(n_probes=6, n_layers=6, site_kinds=("mlp_out",), metrics=("logit_diff",), tokens=("a",),
                     trivial_sites=False, seed=1)
    _save(a, tmp_path / "A")
    _save(b, tmp_path / "B")
    with pytest.raises(ClapError, match=r"nothing to align by relative depth: no site kind with layers in both runs "
                                        r"\(.*A: resid_pre; .*B: mlp_out\)"):
        compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    # layers 0-1 of an 8-layer model (bins 0, 1 of 6) against layers 4-5 of a 6-layer one (bins 4, 5)
    low = make_results(n_probes=6, n_layers=2, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a",),
                       trivial_sites=False)
    high = make_results(n_probes=6, n_layers=6, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a",),
                        trivial_sites=False, seed=1)
    high = high[high["layer"] >= 4]
    _save(low, tmp_path / "L", model={"n_layers": 8, "name": "low"})
    _save(high, tmp_path / "H", model={"n_layers": 6, "name": "high"})
    with pytest.raises(ClapError, match=r"no slice has a relative depth bin with values in both runs .*"
                                        r"measured in one run only left out \(A: 0, 1; B: 4, 5\)"):
        compare(tmp_path / "L", tmp_path / "H", tmp_path / "out2", figures=False)
    # a run that does not record its depth
    _save(high, tmp_path / "U", model={"name": "unknown"})
    with pytest.raises(ClapError, match="run.json records no model.n_layers"):
        compare(tmp_path / "L", tmp_path / "U", tmp_path / "out3", figures=False, relative_depth=4)


def test_cli_relative_depth(tmp_path, capsys):
    a, b = _run(4, seed=1), _run(6, seed=2)
    _save(a, tmp_path / "A")
    _save(b, tmp_path / "B")
    args = ["--quiet", "compare", str(tmp_path / "A"), str(tmp_path / "B"), "--no-figures"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    assert "10 probes paired, by relative depth: 4 bins, models of 4 and 6 layers" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "out2"), "--relative-depth", "2"]) == 0
    assert "2 bins" in capsys.readouterr().out
    assert sorted(pd.read_csv(tmp_path / "out2" / "depth_bins.csv").query("model == 'B'")["depth_bin"]) == \
        [0, 0, 0, 1, 1, 1]
    assert main([*args, "-o", str(tmp_path / "out3"), "--relative-depth", "0"]) == 2
    assert "--relative-depth 0: expected a number of bins" in capsys.readouterr().err


E2E_PROBES = [
    {"id": "fr", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
     "answer": " Paris", "wrong": " Madrid", "labels": {"knowledge_type": "definitional"}},
    {"id": "de", "clean": "The capital of Germany is", "corrupted": "The capital of Italy is",
     "answer": " Berlin", "wrong": " Rome", "labels": {"knowledge_type": "definitional"}},
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Migraine is a chronic disorder of the",
     "answer": " brain", "wrong": " head", "labels": {"knowledge_type": "associative"}},
    {"id": "lev", "clean": "Levetiracetam treats", "corrupted": "Atorvastatin treats",
     "answer": " seizures", "wrong": " cholesterol", "labels": {"knowledge_type": "associative"}},
]


def _tiny_gpt2(n_layer: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clap.models import wrap
    from tests.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=4, n_embd=64, n_positions=64, vocab_size=len(tokenizer))
    config._attn_implementation = "eager"
    return wrap(GPT2LMHeadModel(config).eval(), tokenizer, {"source": f"tiny-gpt2-{n_layer}"})


def test_tiny_gpt2_of_4_and_6_layers_through_study_then_compare(tmp_path):
    """Two random GPT-2 models of 4 and 6 layers patched by ``Study`` (residual stream, MLP outputs and heads at the
    last token), then compared: by relative depth in 4 bins, every paired value equal to hand-binning each run's
    results.parquet (heads summed per layer first)."""
    from interventions.spec import StudySpec
    from interventions.study import Study

    spec = {"name": "depth", "model": {"source": "tiny"}, "probes": {"inline": E2E_PROBES}, "metrics": ["logit_diff"],
            "execution": {"progress": False},
            "patches": [{"sites": ["layers[*].resid_pre", "layers[*].mlp_out"], "positions": ["last"]},
                        {"sites": ["layers[*].heads[*]"], "positions": ["last"]}]}
    for name, layers, seed in (("A", 4, 11), ("B", 6, 12)):
        Study(StudySpec.from_dict(spec), model=_tiny_gpt2(layers, seed)).run(tmp_path / name)
    res = compare(tmp_path / "A", tmp_path / "B", tmp_path / "out", figures=False)
    assert (res.bins, res.depths) == (4, (4, 6))
    assert set(res.paired["site_kind"]) == {"resid_pre", "mlp_out", "head"}
    runs = {name: pd.read_parquet(tmp_path / name / "results.parquet") for name in "AB"}
    for kind, scale in (("resid_pre", (1.0, 1.0)), ("mlp_out", (1.0, 1.5)), ("head", (1.0, 1.5))):
        binned = []
        for frame, n, s in zip(runs.values(), (4, 6), scale, strict=True):
            rows = frame[(frame["site_kind"] == kind) & frame["recovery_defined"] & ~frame["trivial"]]
            per_layer = rows.groupby(["probe_id", "layer"])["recovery"].sum()  # one row per layer, or its heads
            if kind != "head":
                assert rows.groupby(["probe_id", "layer"]).size().max() == 1
            table = per_layer.reset_index()
            table["bin"] = [_hand_bin(int(layer), n, 4) for layer in table["layer"]]
            binned.append(table.groupby(["probe_id", "bin"])["recovery"].mean() * s)
        expected = (binned[1] - binned[0]).dropna()
        got = res.paired[res.paired["site_kind"] == kind].set_index(["probe_id", "depth_bin"])["diff"]
        assert len(got) == len(expected) > 0
        np.testing.assert_allclose(got.sort_index(), expected.loc[got.sort_index().index], atol=1e-9)
        table = res.differences[res.differences["site_kind"] == kind].set_index("depth_bin")
        for k in table.index:
            d = expected.xs(k, level="bin")
            assert table.loc[k, "diff"] == pytest.approx(d.mean(), abs=1e-9)
            if len(d) > 1 and d.std() > 0:
                assert table.loc[k, "p_unc"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue, rel=1e-6)
    sidecars = [json.loads((tmp_path / n / "run.json").read_text())["model"]["n_layers"] for n in "AB"]
    assert sidecars == [4, 6]


STUDY = __import__("pathlib").Path(__file__).resolve().parents[2] / "studies" / "gpt2-vs-smollm2.yaml"


@pytest.fixture(scope="module")
def gpt2_dirs(shared_data, tmp_path_factory):
    """Two tiny random GPT-2 folders (2 and 3 layers) with the real GPT-2 tokenizer, under which the study's probe
    sets are token-aligned (needs ``../shared``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(shared_data)
    folders = {}
    for name, layers in (("gpt2", 2), ("smollm2", 3)):
        torch.manual_seed(layers)
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=2, n_embd=32, n_positions=64,
                                           vocab_size=len(tokenizer)))
        folders[name] = tmp_path_factory.mktemp(name) / "model"
        model.eval().save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_study_template_validates_and_compares_the_two_models():
    from clap.app.study_file import StudyFile

    study = StudyFile.from_yaml(STUDY)
    assert study.comparisons() == [["gpt2", "smollm2"]]
    assert {n: e.source for n, e in study.model_entries().items()} == {"gpt2": "openai-community/gpt2",
                                                                       "smollm2": "smollm2-135m"}


def test_study_offline_stops_before_any_stage_and_dry_run_checks_the_rest(gpt2_dirs, tmp_path, monkeypatch):
    """GPT-2 not cached and the hub offline: `clap run` stops before its first stage naming the model; the dry run
    checks the other model (here a local stand-in for SmolLM2) and then says what it could not check."""
    import huggingface_hub

    from clap.app.pipeline import check_study, run_study

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # not in any cache
    local = {"smollm2": str(gpt2_dirs["smollm2"])}
    with pytest.raises(ClapError) as info:
        check_study(STUDY, models=local)
    text = str(info.value)
    assert text.startswith("dry run of study 'gpt2-vs-smollm2': the study file, its 6 stages and model(s) 'smollm2' "
                           "(sites against the config, probes with the tokenizer) check out, but 1 model(s) could not")
    assert "model 'gpt2': the weights of 'openai-community/gpt2' are not in the local Hugging Face cache and the hub " \
           "cannot be reached (offline mode is set)" in text
    assert "--model gpt2=SOURCE" in text
    out = tmp_path / "out"
    with pytest.raises(ClapError, match=r"^model 'gpt2': the weights of 'openai-community/gpt2' are not in the"):
        run_study(STUDY, out, models=local, echo=lambda line: None)
    assert not (out / "models").exists() and not (out / "stages.json").exists()
    # both models local: the dry run passes and lists the stages
    stages = check_study(STUDY, models={"gpt2": str(gpt2_dirs["gpt2"]), **local})
    assert stages == ["patch[gpt2]", "patch[smollm2]", "analyze[gpt2]", "analyze[smollm2]",
                      "compare[gpt2-vs-smollm2]", "report"]


@pytest.mark.slow
def test_study_runs_on_tiny_stand_ins_and_compares_by_relative_depth(gpt2_dirs, tmp_path):
    """The whole study on two tiny GPT-2 stand-ins of 2 and 3 layers: the compare stage pairs by relative depth."""
    import yaml

    from clap.app.pipeline import run_study

    data = yaml.safe_load(STUDY.read_text())
    data["report"] = {"figures": False}
    data["analysis"] = {}  # random models know nothing: keep every probe
    for name, folder in gpt2_dirs.items():
        data["models"][name] = {"source": str(folder)}
    run_study(data, tmp_path / "out", progress=False, echo=lambda line: None)
    folder = tmp_path / "out" / "compare" / "gpt2-vs-smollm2"
    bins = pd.read_csv(folder / "depth_bins.csv")
    assert bins.groupby("model")["depth_bin"].apply(list).to_dict() == {"A": [0, 1], "B": [0, 1, 1]}
    table = pd.read_csv(folder / "depth_differences.csv")
    assert set(table["site_kind"]) == {"resid_pre", "attn_out", "mlp_out"} and set(table["depth_bin"]) == {0, 1}
    assert "relative depth bin" in (folder / "compare.md").read_text()
