"""Probe validity: the per-probe table, exclusion rules applied before statistics, shared clean prompts."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.io import save_results
from analyses.pipeline import analyze
from analyses.synthetic import make_meta, make_results
from analyses.validity import (
    apply_exclusions,
    clean_prompts,
    probe_validity,
    shared_clean_prompts,
)
from clap.errors import ClapError

from .conftest import GROUP


def _study(tmp_path, **options):
    data = make_results(n_probes=8, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff", "prob"),
                        tokens=("a", " b"), seed=4)
    ld = data["metric"] == "logit_diff"
    # p001: clean prefers the wrong answer; p002: the corruption does not flip the preference
    data.loc[ld & (data.probe_id == "p001"), "clean"] = -0.5
    data.loc[ld & (data.probe_id == "p002"), "corrupted"] = 0.4
    meta = make_meta(data, group_columns=[GROUP])
    prompts = {f"p{i:03d}": f"prompt {i // 2}" for i in range(8)}  # two probes per clean prompt
    meta["probes"] = [{"probe_id": p, "clean": c, "corrupted": "x"} for p, c in prompts.items()]
    if options:
        meta["spec"]["analysis"] = options
    save_results(data, meta, tmp_path / "r")
    return data, meta


def test_validity_table_values(tmp_path):
    data, meta = _study(tmp_path)
    table = probe_validity(data, meta).set_index("probe_id")
    ld = data[data.metric == "logit_diff"].drop_duplicates("probe_id").set_index("probe_id")
    np.testing.assert_allclose(table["clean_logit_diff"], ld.loc[table.index, "clean"])
    np.testing.assert_allclose(table["abs_diff"], (ld["clean"] - ld["corrupted"]).abs().loc[table.index])
    assert not table.loc["p001", "flips"] and not table.loc["p002", "flips"] and table.loc["p000", "flips"]
    assert table.loc["p003", "clean_prompt"] == "prompt 1"
    assert list(table.columns[:1]) == [GROUP]


def test_exclusions_are_applied_before_the_statistics_and_reported(tmp_path):
    data, meta = _study(tmp_path, min_clean_logit_diff=0.0, require_flip=True)
    result = analyze(tmp_path / "r", figures=False)
    validity = result.tables["probe_validity"].set_index("probe_id")
    assert validity["excluded"].sum() == 2
    assert "clean logit difference -0.5 < 0" in validity.loc["p001", "reason"]
    assert "does not flip" in validity.loc["p002", "reason"]
    assert (result.tables["rm_anova"]["n_subjects"] == 6).all()
    assert set(result.data["probe_id"]) == {f"p{i:03d}" for i in (0, 3, 4, 5, 6, 7)}
    assert any("2 of 8 probe(s) were excluded" in c for c in result.caveats)
    assert any("Probe exclusion before any statistic" in m and "2 of 8" in m for m in result.methods)
    assert (tmp_path / "r" / "analysis" / "probe_validity.csv").exists()


def test_rules_without_logit_diff_are_refused():
    data = make_results(n_probes=4, n_layers=2, metrics=("prob",), site_kinds=("resid_pre",), tokens=("a",))
    with pytest.raises(ClapError, match="need the logit_diff metric"):
        apply_exclusions(data, probe_validity(data, {}), require_flip=True)


def test_shared_clean_prompts_are_detected_and_can_be_the_subject(tmp_path):
    data, meta = _study(tmp_path)
    shared = shared_clean_prompts(clean_prompts(meta))
    assert len(shared) == 4 and (shared["n_probes"] == 2).all()
    result = analyze(tmp_path / "r", figures=False)
    assert any("share 4 clean prompt(s)" in c for c in result.caveats)
    by_prompt = analyze(tmp_path / "r", figures=False, subject="clean_prompt")
    rm = by_prompt.tables["rm_anova"]
    assert (rm["n_subjects"] == 4).all() and rm["reduction"].str.endswith("probes averaged per clean_prompt").all()
    # the subject's value is the mean of its probes' last-position values
    from analyses.stats import one_sample
    table = one_sample(by_prompt.data, subject="clean_prompt", metric="logit_diff", site_kind="resid_pre")
    last = data[(data.metric == "logit_diff") & (data.position == 1)].assign(
        clean_prompt=lambda d: d.probe_id.map(clean_prompts(meta)))
    expected = last.groupby(["clean_prompt", "layer"])["recovery"].mean().groupby("layer").mean()
    np.testing.assert_allclose(table["mean"], expected.to_numpy())


def test_clean_prompt_subject_without_prompts_is_refused(tmp_path):
    data = make_results(n_probes=4, n_layers=2, metrics=("logit_diff",), site_kinds=("resid_pre",), tokens=("a",))
    save_results(data, make_meta(data), tmp_path / "r")
    with pytest.raises(ClapError, match="run.json has no `probes` list"):
        analyze(tmp_path / "r", figures=False, subject="clean_prompt")
