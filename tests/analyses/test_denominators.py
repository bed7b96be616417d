"""Small recovery denominators: probes with a near-zero |clean - corrupted| (or, across models, |source - target|)
are flagged, a ``min_abs_diff`` that fits is suggested, and no rule is suggested that would exclude (nearly) every
probe (the demo's cross-model stage was told `require_flip: true`, which would have excluded all 24 probes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analyses.io import save_results
from analyses.pipeline import analyze
from analyses.synthetic import make_meta, make_results
from analyses.validity import probe_validity

N = 24
TINY = {"p003": 0.31, "p010": -0.27}  # new signed denominators of two probes


def layer_data(seed: int = 5) -> pd.DataFrame:
    """24 probes, 6 layers, a clear layer effect (recovery 0 -> ~0.95), logit difference only."""
    return make_results(n_probes=N, n_layers=6, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("x",),
                        layer_effect=[0.0, 0.0, 0.1, 0.5, 0.9, 0.95], noise_sd=0.15, trivial_sites=False, seed=seed)


def shrink(data: pd.DataFrame, denominators: dict[str, float]) -> pd.DataFrame:
    """Give probes a new (small) denominator while keeping each cell's effect patched - corrupted: their
    recoveries grow by the ratio of the gaps, as a near-zero |clean - corrupted| does in a real run."""
    data = data.copy()
    for probe, d in denominators.items():
        rows = data["probe_id"] == probe
        effect = data.loc[rows, "patched"] - data.loc[rows, "corrupted"]
        data.loc[rows, "corrupted"] = data.loc[rows, "clean"] - d
        data.loc[rows, "patched"] = data.loc[rows, "corrupted"] + effect
        data.loc[rows, "recovery"] = effect / d
    return data


def write(root: Path, data: pd.DataFrame) -> Path:
    return save_results(data, make_meta(data, group_columns=["knowledge_type"]), root)


def test_small_denominators_are_flagged_and_a_fitting_min_abs_diff_suggested(tmp_path):
    data = shrink(layer_data(), TINY)
    gaps = (data.groupby("probe_id")["clean"].first() - data.groupby("probe_id")["corrupted"].first()).abs()
    span = data.groupby("probe_id")["recovery"].agg(["min", "max"])
    assert span.loc["p003", "max"] > 2 and span.loc["p010", "min"] < -1  # far outside [-1, 2]
    run = write(tmp_path / "run", data)
    plain = analyze(run, figures=False, n_boot=100)
    caveat = next(c for c in plain.caveats if c.startswith("Small denominators:"))
    assert f"2 of {N} probe(s)" in caveat
    assert "p003 (|denominator| 0.31" in caveat and "p010 (|denominator| 0.27" in caveat
    # the suggested threshold lies above both small gaps and at or below every other gap: it keeps 22 of 24
    threshold = float(caveat.split("`min_abs_diff: ")[1].split("`")[0])
    others = gaps.drop(list(TINY))
    assert max(abs(d) for d in TINY.values()) < threshold <= others.min()
    assert f"keep {N - 2} of {N} probes" in caveat
    assert "require_flip" not in caveat
    fitted = analyze(run, out_dir=tmp_path / "fitted", figures=False, n_boot=100, analysis={"min_abs_diff": threshold})
    validity = fitted.tables["probe_validity"].set_index("probe_id")
    assert set(validity.index[validity["excluded"]]) == set(TINY)
    assert not any(c.startswith("Small denominators:") for c in fitted.caveats)
    # the layer effect the two probes drowned is clear without them (Friedman: ranks, as in the report)
    p_plain = float(plain.tables["friedman"]["p_unc"].iloc[0])
    p_fitted = float(fitted.tables["friedman"]["p_unc"].iloc[0])
    assert p_fitted < 1e-6 and p_fitted < p_plain


def test_no_rule_is_suggested_that_would_exclude_most_probes(tmp_path):
    """No probe flips (corrupted has the clean run's sign): `require_flip: true` would exclude all of them."""
    data = layer_data()
    ends = data.groupby("probe_id")["clean"].first()
    for probe, clean in ends.items():  # corrupted = clean / 4: same sign, gap 3/4 of clean; recovery unchanged
        rows = data["probe_id"] == probe
        effect = data.loc[rows, "recovery"] * (0.75 * clean)
        data.loc[rows, "corrupted"] = clean / 4
        data.loc[rows, "patched"] = clean / 4 + effect
    run = write(tmp_path / "run", data)
    caveats = analyze(run, figures=False, n_boot=100).caveats
    flip = next(c for c in caveats if "does not flip" in c)
    assert f"In {N} of {N} analysed probe(s)" in flip
    assert f"`require_flip: true` would keep only 0 of {N} probes, so it is not suggested" in flip
    assert not any("Consider `require_flip: true`" in c for c in caveats)


def test_a_minority_that_does_not_flip_still_gets_the_suggestion(tmp_path):
    data = layer_data()
    rows = data["probe_id"] == "p001"
    data.loc[rows, "corrupted"] = data.loc[rows, "clean"] / 4
    data.loc[rows, "patched"] = data.loc[rows, "corrupted"] + data.loc[rows, "recovery"] * 0.75 * data.loc[
        rows, "clean"]
    ends = data.groupby("probe_id")[["clean", "corrupted"]].first()
    flips = int((np.sign(ends["clean"]) * np.sign(ends["corrupted"]) < 0).sum())
    assert N // 2 <= flips < N and not (np.sign(ends.loc["p001"]) < 0).any()
    caveats = analyze(write(tmp_path / "run", data), figures=False, n_boot=100).caveats
    assert any(f"Consider `require_flip: true` in the `analysis:` section (it would keep {flips} of {N} probes)." in c
               for c in caveats)


def cross_model(data: pd.DataFrame, gaps: dict[str, float]) -> pd.DataFrame:
    """A same-prompt cross-model run: the target model's clean and corrupted runs are one run (clean ==
    corrupted); recovery runs from it to the source model's clean run, ``gaps`` away."""
    data = data.copy()
    rng = np.random.default_rng(3)
    gap = {p: gaps.get(p, float(rng.uniform(1.5, 3.0))) for p in data["probe_id"].unique()}
    d = data["probe_id"].map(gap)
    effect = data["recovery"] * np.where(data["probe_id"].isin(list(gaps)), 2.0, d)  # a typical effect size
    data["recovery"] = effect / d
    data["corrupted"] = data["clean"]
    data["source_model_clean"] = data["clean"] + d
    data["source_model_corrupted"] = data["clean"] + d
    data["patched"] = data["clean"] + effect
    return data


def test_cross_model_denominators_are_the_models_gap(tmp_path):
    data = cross_model(layer_data(), {})
    run = write(tmp_path / "run", data)
    validity = probe_validity(*_read(run))
    expected = (data.groupby("probe_id")["source_model_clean"].first()
                - data.groupby("probe_id")["corrupted"].first()).abs()
    assert np.allclose(validity.set_index("probe_id")["abs_diff"], expected.reindex(validity["probe_id"]))
    caveats = analyze(run, figures=False, n_boot=100).caveats
    # one prompt run twice has no corruption to flip: no require_flip advice at all
    assert not any("require_flip" in c or "does not flip" in c for c in caveats)


def test_cross_model_small_gaps_are_flagged(tmp_path):
    data = cross_model(layer_data(), {"p002": 0.08, "p015": 0.11})
    caveats = analyze(write(tmp_path / "run", data), figures=False, n_boot=100).caveats
    caveat = next(c for c in caveats if c.startswith("Small denominators:"))
    assert "2 of 24 probe(s)" in caveat and "p002 (|denominator| 0.08" in caveat and "p015" in caveat
    assert "keep 22 of 24 probes" in caveat and "require_flip" not in " ".join(caveats)


def _read(run: Path):
    from analyses.io import load_results

    data, meta = load_results(run)
    return data, meta
