"""Per-slice reductions: the position rule must not erase the layer effect, heads are summed, rules are named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses import prepare
from analyses.stats import rm_anova
from clap.errors import ClapError

from .conftest import wide

TOKENS = ["The", " Eiffel", " Tower", " is", " in"]


def conserved(n_probes: int = 12, n_layers: int = 6, seed: int = 0) -> pd.DataFrame:
    """Position sweep where recovery is conserved across positions (sums to 1 per layer): early layers carry it at
    the subject tokens (1-2), late layers at the last token; the mean over positions is 1/5 at every layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_probes):
        for layer in range(n_layers):
            late = layer / (n_layers - 1)
            share = np.array([0.0, (1 - late) / 2, (1 - late) / 2, 0.0, late])
            share = share + rng.normal(0, 0.05, 5)
            share += (1 - share.sum()) / 5  # exactly conserved
            for t, tok in enumerate(TOKENS):
                rows.append({"probe_id": f"p{p}", "layer": layer, "position": t, "token": tok,
                             "subject": "Eiffel Tower", "positions": "each", "site_kind": "resid_pre",
                             "recovery": share[t]})
    return pd.DataFrame(rows)


def test_mean_over_positions_erases_a_conserved_layer_effect_the_last_position_keeps_it():
    data = conserved()
    last = rm_anova(data).iloc[0]
    assert last["p_GG_corr"] < 1e-8 and last["reduction"] == "last position"
    # the old default: the mean is 1/5 at every layer, so there is no layer effect left to find
    with pytest.raises(ClapError, match="no error variance"):
        rm_anova(data, agg="mean")
    # the last position is exactly what a reader would compute by hand
    got = wide(prepare(data).data)
    expected = data[data.position == 4].pivot(index="probe_id", columns="layer", values="recovery").to_numpy()
    np.testing.assert_allclose(got, expected)


def test_max_sum_index_and_subject_rules():
    data = conserved(n_probes=4, n_layers=3)
    cell = data[(data.probe_id == "p1") & (data.layer == 1)].set_index("position")["recovery"]
    get = lambda **kw: prepare(data, **kw).data.set_index(["probe_id", "layer"])["recovery"][("p1", 1)]  # noqa: E731
    assert get(position_reduction="max") == pytest.approx(cell.max())
    assert get(position_reduction="sum") == pytest.approx(cell.sum())
    assert get(position_reduction=2) == pytest.approx(cell[2])
    assert get(position_reduction=-1) == pytest.approx(cell[4])
    assert get(position_reduction="subject") == pytest.approx(cell[1] + cell[2])  # " Eiffel", " Tower"
    assert get(position_reduction="subject_last") == pytest.approx(cell[2])
    assert prepare(data, position_reduction="subject").reduction == "subject tokens (sum)"


def test_subject_rule_refuses_without_the_label_or_a_match():
    data = conserved(n_probes=3, n_layers=2)
    with pytest.raises(ClapError, match=r"needs the probe label 'subject'.*have: probe_id"):
        prepare(data.drop(columns="subject"), position_reduction="subject")
    with pytest.raises(ClapError, match=r"subject 'Louvre' not found in its patched tokens"):
        prepare(data.assign(subject="Louvre"), position_reduction="subject")


def test_single_position_slices_are_used_as_patched():
    data = conserved(n_probes=3, n_layers=2)
    data = data[data.position == 4].assign(positions="last")
    prep = prepare(data, position_reduction="max")
    assert prep.reduction == "single position (as patched)"


def test_heads_summed_before_the_position_rule_and_each_is_refused_for_layer_tests():
    rows = []
    for p in range(3):
        for layer in range(2):
            for head in range(3):
                for t in range(2):
                    rows.append({"probe_id": f"p{p}", "layer": layer, "head": head, "position": t, "site_kind": "head",
                                 "recovery": (p + 1) * (head == 0) * (t == 1) + layer * 0.1 * t})
    data = pd.DataFrame(rows)
    got = prepare(data).data.set_index(["probe_id", "layer"])["recovery"]
    assert got[("p2", 1)] == pytest.approx(3 + 3 * 0.1)  # last position, all three heads of layer 1
    assert prepare(data).reduction == "last position; heads summed per layer"
    with pytest.raises(ClapError, match="heads are analysed one by one"):
        prepare(data, head_reduction="each")
    incomplete = data.drop(data[(data.probe_id == "p0") & (data.layer == 1) & (data["head"] == 2)].index)
    prep = prepare(incomplete)  # a sum short of a head is not a layer total: that probe is incomplete and dropped
    assert "p0" in prep.dropped_subjects


def test_demo_like_rm_anova_is_exact_on_the_reduced_values():
    data = conserved(seed=3)
    x = wide(prepare(data).data)
    n, k = x.shape
    ss_l = n * ((x.mean(0) - x.mean()) ** 2).sum()
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    F = (ss_l / (k - 1)) / ((resid**2).sum() / ((k - 1) * (n - 1)))
    assert rm_anova(data).iloc[0]["F"] == pytest.approx(F)
    assert rm_anova(data).iloc[0]["p_unc"] == pytest.approx(sps.f.sf(F, k - 1, (k - 1) * (n - 1)))
