"""The reduction rule: selection, exclusions (counted), position aggregation, missing-cell policies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses import AnalysisWarning, analysis_units, prepare, rm_anova, select_rows
from analyses.synthetic import make_results
from clap.errors import ClapError

from .conftest import GROUP

SEL = dict(metric="logit_diff", site_kind="resid_pre")


def test_ambiguous_selection_lists_the_choices(results):
    with pytest.raises(ClapError, match=r"several metric values \(logit_diff, prob\); choose one with metric="):
        prepare(results, site_kind="resid_pre")
    with pytest.raises(ClapError,
                       match=r"several site_kind values \(attn_out, final_norm, mlp_out, resid_pre, unembed\)"):
        prepare(results, metric="prob")
    with pytest.raises(ClapError,
                       match=r"no rows with metric == 'kl'; the results hold metric values: logit_diff, prob"):
        prepare(results, metric="kl", site_kind="resid_pre")


def test_missing_column_is_named(results):
    with pytest.raises(ClapError, match=r"column\(s\) nope not in the results"):
        prepare(results, dv="nope", **SEL)


def test_position_rule_is_the_last_position_per_probe_and_layer_by_default(results):
    prep = prepare(results, **SEL)
    rows = results[(results.metric == "logit_diff") & (results.site_kind == "resid_pre") & results.recovery_defined]
    expected = rows[rows["position"] == rows["position"].max()].set_index(["probe_id", "layer"])["recovery"]
    got = prep.data.set_index(["probe_id", "layer"])["recovery"]
    assert len(got) == prep.n_subjects * 6
    np.testing.assert_allclose(got.to_numpy(), expected.loc[got.index].to_numpy(), rtol=1e-12)
    assert prep.reduction == "last position"
    mean = prepare(results, agg="mean", **SEL)  # the legacy keyword still works, and is named
    assert mean.reduction == "mean over positions and heads"
    mx = prepare(results, agg="max", **SEL).data.set_index(["probe_id", "layer"])["recovery"]
    np.testing.assert_allclose(mx.to_numpy(),
                               rows.groupby(["probe_id", "layer"])["recovery"].max().loc[mx.index].to_numpy())
    assert prep.data["layer"].dtype == np.int64  # plain ints, so pingouin labels read 3, not 3.0


def test_exclusions_are_counted(results):
    sel = select_rows(results, metric="logit_diff", site_kind="unembed")
    assert sel.n_outside_stack == 24 and sel.rows.empty
    sel = select_rows(results, metric="logit_diff", site_kind="unembed", require_layer=False)
    assert sel.n_trivial == 24 and sel.n_undefined == 0  # trivial rows are set aside before undefined ones
    sel = select_rows(results, **SEL)
    undefined_probe = results.loc[~results.recovery_defined, "probe_id"].unique()
    assert len(undefined_probe) == 1
    n_rows_probe = ((results.probe_id == undefined_probe[0]) & (results.metric == "logit_diff")
                    & (results.site_kind == "resid_pre")).sum()
    assert sel.n_undefined == n_rows_probe == 36  # 6 layers x 6 positions
    assert sel.rows["recovery_defined"].all()


def test_trivial_rows_can_be_included_on_request():
    data = make_results(n_probes=4, n_layers=3, metrics=("logit_diff",), site_kinds=("resid_post",), tokens=("a",),
                        trivial_sites=False)
    data.loc[data.layer == 2, "trivial"] = True
    data.loc[data.layer == 2, "recovery"] = 1.0
    assert prepare(data).levels == [0, 1]
    assert prepare(data, include_trivial=True).levels == [0, 1, 2]


def test_missing_cells_drop_subjects_with_a_warning(results):
    with pytest.warns(AnalysisWarning, match=r"dropped 2 of 23 probe_ids lacking some layer values"):
        prep = prepare(results, **SEL)
    assert len(prep.dropped_subjects) == 2 and prep.n_subjects == 21
    assert prep.summary()["n_dropped"] == 2


def test_missing_cells_drop_levels_or_error(results):
    with pytest.warns(AnalysisWarning, match=r"dropped layer"):
        prep = prepare(results, missing="drop_levels", **SEL)
    assert prep.n_subjects == 23 and len(prep.levels) == 6 - len(prep.dropped_levels) and prep.dropped_levels
    with pytest.raises(ClapError, match=r"2 of 23 probe_ids lack some layer values.*choose missing="):
        prepare(results, missing="error", **SEL)
    with pytest.raises(ClapError, match="missing='sometimes' is not a known policy"):
        prepare(results, missing="sometimes", **SEL)


def test_between_label_must_be_constant_per_probe(results):
    bad = results.copy()
    bad.loc[(bad.probe_id == "p000") & (bad.layer == 0), GROUP] = "associative"
    with pytest.raises(ClapError, match="must be constant per probe_id; probe_id 'p000' has 2 different labels"):
        prepare(bad, between=GROUP, **SEL)


def test_undefined_everywhere_is_a_clear_error(results):
    bad = results.copy()
    bad["recovery_defined"] = False
    with pytest.raises(ClapError, match=r"no usable rows for recovery.*undefined"):
        prepare(bad, **SEL)


def test_analysis_units_lists_testable_slices(results):
    units = analysis_units(results)
    assert len(units) == 6  # 2 metrics x 3 site kinds; unembed / final_norm are outside the stack and trivial
    assert set(units["site_kind"]) == {"resid_pre", "attn_out", "mlp_out"}
    assert (units["n_levels"] == 6).all()
    assert list(units.columns[:5]) == ["metric", "site_kind", "operation", "direction", "positions"]


def test_heads_are_summed_within_a_layer():
    rows = []
    for p in range(3):
        for layer in range(2):
            for head in range(4):
                rows.append({"probe_id": f"p{p}", "layer": layer, "head": head, "site_kind": "head",
                             "recovery": p + layer + head / 10})
    prep = prepare(pd.DataFrame(rows))
    got = prep.data.set_index(["probe_id", "layer"])["recovery"]
    assert got[("p1", 1)] == pytest.approx(4 * (1 + 1) + 0.6)  # the layer's total, never the mean
    assert prep.reduction == "single position (as patched); heads summed per layer"


# regression (review): raw module sites of different roles are refused as one layer effect, not tested together
def test_raw_modules_of_different_roles_are_not_one_layer_effect():
    data = make_results(n_probes=6, n_layers=2, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        trivial_sites=False, seed=4)
    data["site_kind"] = "module"
    data["module"] = data["layer"].map({0: "transformer.h.0.mlp", 1: "transformer.h.1.attn.c_attn"})
    with pytest.raises(ClapError, match="different roles"):
        rm_anova(data, dv="recovery", within="layer", subject="probe_id", metric="logit_diff")
    data["module"] = data["layer"].map({0: "transformer.h.0.mlp", 1: "transformer.h.1.mlp"})
    assert rm_anova(data, dv="recovery", within="layer", subject="probe_id", metric="logit_diff").F.notna().all()
