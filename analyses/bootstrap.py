"""Seeded bootstrap confidence intervals of mean recovery per layer (and group).

A mean over a few dozen probes is only as convincing as its spread; recoveries are bounded and skewed, so a
percentile bootstrap over probes is used instead of a normal-theory interval. Probes, not rows, are resampled:
positions of one probe are not independent observations, so the values are first reduced to one per probe and
layer by the rule of :mod:`analyses.select`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.select import prepare

CI_COLUMNS = ["mean", "ci_low", "ci_high", "sd", "n", "ci", "n_boot", "method"]


def bootstrap_ci(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    between: str | None = None,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    method: Literal["percentile", "bca"] = "percentile",
    missing: str = "keep",
    **select: Any,
) -> pd.DataFrame:
    """Mean of ``dv`` and its bootstrap CI for each level of ``within`` (and each ``between`` group).

    Descriptive intervals need no complete probes, so the default ``missing="keep"`` lets every probe that has a
    value at a level contribute to that level (missing cells simply shrink that cell's ``n``); pass
    ``missing="drop_subjects"`` to describe exactly the probes an ANOVA used.

    Each cell resamples its ``n`` probe values ``n_boot`` times with replacement using
    ``numpy.random.default_rng(seed)`` (one generator for the whole table, cells in sorted order), so the same seed
    gives the same table. ``method="percentile"`` takes the (1-ci)/2 and (1+ci)/2 quantiles of the resampled means;
    ``"bca"`` uses :func:`scipy.stats.bootstrap`'s bias-corrected and accelerated interval.

    Returns one row per cell with columns: ``within`` (and ``between``), ``mean``, ``ci_low``, ``ci_high`` (NaN
    when the cell has a single probe; both equal the mean when all values are equal), ``sd`` (sample SD), ``n`` (probes in the cell), ``ci`` (the
    level), ``n_boot``, ``method``, then the book-keeping columns of :mod:`analyses.stats`.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    prep = prepare(
        data, dv, within, subject, between=between, missing=missing,
        min_subjects=1, min_per_group=1, min_groups=1, min_levels=1, **select,
    )
    keys = [within] + ([between] if between else [])
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    rows = []
    for key, cell in prep.data.groupby(keys, sort=True):
        x = cell[dv].to_numpy(float)
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        row.update(mean=x.mean(), sd=x.std(ddof=1) if len(x) > 1 else np.nan, n=len(x), ci=ci, n_boot=n_boot, method=method)
        if len(x) < 2:
            row.update(ci_low=np.nan, ci_high=np.nan)
        elif np.ptp(x) == 0:  # every resample has the same mean
            row.update(ci_low=float(x[0]), ci_high=float(x[0]))
        elif method == "percentile":
            idx = rng.integers(0, len(x), size=(n_boot, len(x)))
            boot = x[idx].mean(axis=1)
            row.update(ci_low=float(np.quantile(boot, alpha)), ci_high=float(np.quantile(boot, 1 - alpha)))
        else:
            res = sps.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=ci, method="BCa", rng=rng, vectorized=True)
            row.update(ci_low=float(res.confidence_interval.low), ci_high=float(res.confidence_interval.high))
        rows.append(row)
    out = pd.DataFrame(rows, columns=keys + CI_COLUMNS)
    for k, v in prep.summary().items():
        out[k] = v
    return out

