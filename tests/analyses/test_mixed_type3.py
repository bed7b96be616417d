"""Mixed ANOVA sums of squares: pingouin's weighted means (Type II) and Type III for unbalanced groups."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from analyses.stats import mixed_anova

from .conftest import GROUP, rm_frame


def _data(sizes):
    rng = np.random.default_rng(5)
    groups = [g for g, n in zip("abc", sizes, strict=True) for _ in range(n)]
    effect = {"a": [0, 0.5, 1.0, 0.3], "b": [0.2, 0.2, 0.8, 0.9], "c": [0.1, 0.6, 0.4, 0.0]}
    values = (np.array([effect[g] for g in groups]) + rng.normal(0, 0.4, (len(groups), 4))
              + rng.normal(0, 0.3, (len(groups), 1)))
    return values, groups


def test_type3_layer_effect_is_the_unweighted_means_formula():
    values, groups = _data((4, 9, 6))
    t2 = mixed_anova(rm_frame(values, groups), between=GROUP).set_index("Source")
    t3 = mixed_anova(rm_frame(values, groups), between=GROUP, ss_type=3).set_index("Source")
    g = np.array(groups)
    levels = sorted(set(groups))
    cell = np.array([values[g == lv].mean(0) for lv in levels])  # group x layer means
    unweighted = cell.mean(0)
    harmonic = len(levels) / sum(1 / (g == lv).sum() for lv in levels)
    ss3 = len(levels) * harmonic * ((unweighted - unweighted.mean()) ** 2).sum()
    assert t3.loc["layer", "SS"] == pytest.approx(ss3)
    weighted = values.mean(0)
    assert t2.loc["layer", "SS"] == pytest.approx(len(g) * ((weighted - weighted.mean()) ** 2).sum())
    assert t3.loc["layer", "SS"] != pytest.approx(t2.loc["layer", "SS"])
    # the between effect and the interaction do not depend on the type
    for source in (GROUP, "Interaction"):
        assert t3.loc[source, "SS"] == pytest.approx(t2.loc[source, "SS"])
    # same error term: F and p follow
    ms_error = t2.loc["layer", "MS"] / t2.loc["layer", "F"]
    F = ss3 / 3 / ms_error
    assert t3.loc["layer", "F"] == pytest.approx(F)
    assert t3.loc["layer", "p_unc"] == pytest.approx(sps.f.sf(F, 3, t2.loc["layer", "ddof2"]))
    eps = t2.loc["layer", "eps"]
    assert t3.loc["layer", "p_GG_corr"] == pytest.approx(sps.f.sf(F, 3 * eps, t2.loc["layer", "ddof2"] * eps))
    assert (t3["ss_type"] == 3).all() and (t2["ss_type"] == 2).all()


def test_balanced_groups_give_the_same_table_for_both_types():
    values, groups = _data((6, 6, 6))
    t2 = mixed_anova(rm_frame(values, groups), between=GROUP)
    t3 = mixed_anova(rm_frame(values, groups), between=GROUP, ss_type=3)
    np.testing.assert_allclose(t3["SS"], t2["SS"])
    np.testing.assert_allclose(t3["p_GG_corr"].astype(float), t2["p_GG_corr"].astype(float))
