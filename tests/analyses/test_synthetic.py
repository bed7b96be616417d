"""The synthetic generator writes the engine's schema with the effects, gaps and flags it promises."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import load_results, validate_results
from analyses.synthetic import make_results, write_synthetic


def test_schema_and_recovery_identity():
    data = make_results(n_probes=6, n_layers=3, seed=1)
    checked = validate_results(data, group_columns=["knowledge_type"])
    defined = checked[checked.recovery_defined]
    np.testing.assert_allclose(
        defined.recovery, (defined.patched - defined.corrupted) / (defined.clean - defined.corrupted), rtol=1e-9
    )
    assert len(data) == 2 * (6 * 3 * 3 * 6 + 2 * 6)  # metrics x (probes x layers x kinds x positions + 2 trivial sites)
    triv = checked[checked.trivial]
    assert set(triv.site) == {"lm_head", "final_norm"} and triv.layer.isna().all() and (triv.recovery == 1).all()
    assert sorted(checked.drop_duplicates("probe_id").knowledge_type.value_counts().tolist()) == [3, 3]


def test_missing_cells_and_undefined_probes():
    data = make_results(n_probes=8, n_layers=4, missing_cells=3, undefined_probes=2, metrics=("logit_diff",), seed=2)
    cells = data[data.layer.notna()].groupby(["probe_id", "layer"]).size()
    assert len(cells) == 8 * 4 - 3
    bad = data[~data.recovery_defined]
    assert bad.probe_id.nunique() == 2 and bad.recovery.isna().all() and (bad.clean == bad.corrupted).all()


def test_planted_profile_shapes_the_layer_means():
    data = make_results(n_probes=60, n_layers=5, layer_effect=[0.0, 0.2, 0.8, 0.2, 0.0], metrics=("logit_diff",),
                        site_kinds=("resid_pre",), tokens=("x",), noise_sd=0.05, trivial_sites=False, seed=3)
    means = data.groupby("layer").recovery.mean().to_numpy()
    np.testing.assert_allclose(means - means.mean(), np.array([0.0, 0.2, 0.8, 0.2, 0.0]) - 0.24, atol=0.05)
    with pytest.raises(ValueError, match="3 values for 5 layers"):
        make_results(n_layers=5, layer_effect=[0, 1, 0])


def test_write_synthetic_is_loadable(tmp_path):
    write_synthetic(tmp_path, n_probes=4, n_layers=2, seed=5)
    data, meta = load_results(tmp_path)
    assert meta["n_probes"] == 4 and meta["seed"] == 5 and meta["model"]["n_layers"] == 2
    assert set(meta["versions"]) >= {"pandas", "pingouin"}
