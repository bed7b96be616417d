"""Noise draws: how much a study's averaged values move between its seeded noise draws.

A study with ``samples: N`` reports, per cell, the average over N noise draws (``results.parquet``); the draws
themselves are in ``samples.parquet`` (read through :func:`clap.contract.read_samples`). Why a table of its own: an
average over few draws can hide a spread as large as the effect, and the reader of a trace needs to see it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: what identifies one cell across its draws
CELL_COLUMNS = ["probe_id", "site", "site_kind", "window", "layer", "head", "positions", "position", "operation",
                "direction", "metric"]


def sample_spread(samples: pd.DataFrame, value: str = "effect", by: Sequence[str] = ("metric", "site_kind", "window",
                                                                                    "layer"),
                  confidence: float = 0.95) -> pd.DataFrame:
    """Per ``by`` group: ``n_cells``, ``n_samples`` (draws per cell), ``mean`` (of the cells' means over draws),
    and the spread of each cell's ``value`` over its draws: ``median_sd`` and ``max_sd`` (ddof 1) and
    ``mean_half_width``, the mean half-width of the cells' ``confidence`` t intervals over draws."""
    cells = [c for c in CELL_COLUMNS if c in samples.columns]
    per_cell = samples.groupby(cells, dropna=False, observed=True)[value].agg(["mean", "std", "count"]).reset_index()
    n = per_cell["count"].to_numpy(dtype=float)
    per_cell["half_width"] = stats.t.ppf(0.5 + confidence / 2, n - 1) * per_cell["std"].to_numpy() / np.sqrt(n)
    keys = [c for c in by if c in per_cell.columns]
    table = per_cell.groupby(keys, dropna=False, observed=True).agg(
        n_cells=("mean", "size"), n_samples=("count", "max"), mean=("mean", "mean"), median_sd=("std", "median"),
        max_sd=("std", "max"), mean_half_width=("half_width", "mean")).reset_index()
    table.insert(len(keys), "value", value)
    return table
