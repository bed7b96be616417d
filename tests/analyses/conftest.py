"""Synthetic results in the engine's schema, shared by the analyses tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.io import save_results, validate_results
from analyses.synthetic import make_meta, make_results

GROUP = "knowledge_type"


@pytest.fixture(autouse=True)
def _quiet_analysis_warnings():
    """Tests that care about AnalysisWarning check it with pytest.warns; others need not see it."""
    from analyses.select import AnalysisWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        yield


@pytest.fixture(scope="session")
def results() -> pd.DataFrame:
    """24 probes in two groups, 6 layers, 3 site kinds, 6 positions, 2 metrics, a planted layer effect and
    interaction, 2 missing (probe, layer) cells and 1 probe with undefined recovery."""
    data = make_results(interaction=0.8, missing_cells=2, undefined_probes=1, seed=1)
    return validate_results(data, group_columns=[GROUP])


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory) -> Path:
    """A small complete results directory (fast to analyse): 10 probes, 4 layers, 2 site kinds, 3 tokens."""
    root = tmp_path_factory.mktemp("results")
    data = make_results(n_probes=10, n_layers=4, site_kinds=("resid_pre", "mlp_out"), metrics=("logit_diff",),
                        tokens=("Paris", " is", " in"), undefined_probes=1, missing_cells=1, seed=3)
    save_results(data, make_meta(data, seed=3, group_columns=[GROUP]), root)
    return root


def wide(data: pd.DataFrame, dv: str = "recovery", within: str = "layer", subject: str = "probe_id") -> np.ndarray:
    """probes x levels matrix of a prepared (one value per cell, complete) table."""
    return data.pivot(index=subject, columns=within, values=dv).sort_index(axis=1).to_numpy(float)


def rm_frame(values: np.ndarray, groups: list[str] | None = None) -> pd.DataFrame:
    """A minimal long frame (probe_id, layer, recovery[, knowledge_type]) from a probes x layers matrix."""
    n, k = values.shape
    rows = []
    for i in range(n):
        for j in range(k):
            row = {"probe_id": f"s{i:02d}", "layer": j, "recovery": float(values[i, j])}
            if groups is not None:
                row[GROUP] = groups[i]
            rows.append(row)
    return pd.DataFrame(rows)


def constant_results() -> pd.DataFrame:
    """Recoveries that are exactly 0 everywhere: no variance for any test to measure."""
    data = make_results(n_probes=6, n_layers=4, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        trivial_sites=False, seed=3)
    data["recovery"] = 0.0  # e.g. a patched token the clean and corrupted prompts share: exactly no effect
    return data
