"""Probe validity: does each probe test what it claims, and which probes are independent subjects?

A probe only measures recovery when the clean run prefers the answer and the corruption removes that preference.
:func:`probe_validity` tabulates, per probe, the clean and corrupted logit differences (answer minus wrong token),
whether the corruption flips the preference (opposite signs) and the magnitude of the denominator of recovery
(|clean - corrupted|; across models, |source model's run - target model's run|). :func:`apply_exclusions` drops
probes that fail the rules of the ``analysis:`` section *before* any statistic, and says which and why.

Probes that share a clean prompt (one clean sentence corrupted several ways) are not independent observations: a
test that counts them as separate subjects overstates n. :func:`clean_prompts` reads the prompts from ``run.json``
(its ``probes`` list) and :func:`shared_clean_prompts` reports the sharing; ``subject: clean_prompt`` then averages
such probes into one subject.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from clap.errors import ClapError

VALIDITY_COLUMNS = [
    "probe_id", "clean_prompt", "clean_logit_diff", "corrupted_logit_diff", "flips", "abs_diff", "excluded", "reason",
]


def clean_prompts(meta: Mapping[str, Any], probe_ids: list[Any] | None = None) -> pd.Series | None:
    """probe_id -> clean prompt, from ``run.json``'s ``probes`` list; None when the sidecar does not record them."""
    probes = meta.get("probes") or []
    mapping = {p["probe_id"]: p.get("clean") for p in probes if isinstance(p, Mapping) and "probe_id" in p}
    if not mapping or any(v is None for v in mapping.values()):
        return None
    series = pd.Series(mapping, name="clean_prompt")
    series.index.name = "probe_id"
    return series if probe_ids is None else series.reindex(probe_ids)


def shared_clean_prompts(prompts: pd.Series | None) -> pd.DataFrame:
    """Clean prompts used by more than one probe: ``clean_prompt``, ``n_probes``, ``probe_ids``."""
    if prompts is None or prompts.empty:
        return pd.DataFrame(columns=["clean_prompt", "n_probes", "probe_ids"])
    groups = prompts.reset_index().groupby("clean_prompt", sort=True)["probe_id"].agg(list)
    shared = groups[groups.map(len) > 1]
    return pd.DataFrame({"clean_prompt": shared.index, "n_probes": shared.map(len).to_numpy(),
                         "probe_ids": [", ".join(map(str, v)) for v in shared]})


def probe_validity(data: pd.DataFrame, meta: Mapping[str, Any] | None = None,
                   metric: str = "logit_diff") -> pd.DataFrame:
    """One row per probe: ``probe_id``, its labels, ``clean_prompt`` (NA when run.json lacks it),
    ``clean_logit_diff``, ``corrupted_logit_diff`` (the metric on the unpatched runs), ``flips`` (opposite signs:
    the corruption reverses the preference), ``abs_diff`` (|recovery denominator| of the metric: |clean -
    corrupted|, across models :func:`denominators`), ``excluded`` / ``reason`` (filled
    by :func:`apply_exclusions`). Without a ``logit_diff`` metric the values are NA (the table still lists probes)."""
    labels = [c for c in (meta or {}).get("group_columns", []) if c in data.columns]
    probes = data.drop_duplicates("probe_id")[["probe_id", *labels]].set_index("probe_id")
    rows = data[data["metric"] == metric] if "metric" in data.columns else data.iloc[0:0]
    ends = rows.groupby("probe_id", observed=True)[["clean", "corrupted"]].first()
    out = probes.join(ends, how="left").rename(
        columns={"clean": "clean_logit_diff", "corrupted": "corrupted_logit_diff"})
    prompts = clean_prompts(meta or {}, out.index.tolist())
    out["clean_prompt"] = prompts.to_numpy() if prompts is not None else pd.NA
    c, k = out["clean_logit_diff"].astype(float), out["corrupted_logit_diff"].astype(float)
    out["flips"] = pd.array(np.where(c.notna() & k.notna(), np.sign(c) * np.sign(k) < 0, pd.NA), dtype="boolean")
    out["abs_diff"] = denominators(rows).reindex(out.index).abs() if len(rows) else (c - k).abs()
    out["excluded"] = False
    out["reason"] = ""
    out = out.reset_index()
    return out[["probe_id", *labels, *VALIDITY_COLUMNS[1:]]]


def denominators(rows: pd.DataFrame) -> pd.Series:
    """Per probe the denominator of its recovery: ``clean - corrupted`` within one model; across models (a
    ``source_model_clean`` column) the source model's run on the source prompt minus the target model's run on the
    target prompt (denoising: ``source_model_clean - corrupted``; noising: ``source_model_corrupted - clean``)."""
    first = rows.groupby("probe_id", observed=True).first()
    within = first["clean"].astype(float) - first["corrupted"].astype(float)
    if "source_model_clean" not in first.columns or not first["source_model_clean"].notna().any():
        return within
    noising = first["direction"].astype(str).eq("noising") if "direction" in first.columns else False
    across = np.where(noising, first["source_model_corrupted"].astype(float) - first["clean"].astype(float),
                      first["source_model_clean"].astype(float) - first["corrupted"].astype(float))
    return pd.Series(across, index=first.index).where(first["source_model_clean"].notna(), within)


def apply_exclusions(
    data: pd.DataFrame,
    validity: pd.DataFrame,
    *,
    min_clean_logit_diff: float | None = None,
    require_flip: bool = False,
    min_abs_diff: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mark probes failing the rules in ``validity`` (``excluded``, ``reason``: every failed rule) and drop their
    rows from ``data``. Rules need the ``logit_diff`` metric; asking for one without it is an error."""
    rules = min_clean_logit_diff is not None or require_flip or min_abs_diff is not None
    validity = validity.copy()
    if not rules:
        return data, validity
    if validity["clean_logit_diff"].isna().all():
        raise ClapError("probe exclusion rules (min_clean_logit_diff, require_flip, min_abs_diff) need the logit_diff "
                        "metric in the results; add `logit_diff` to the study's metrics")
    reasons: list[list[str]] = [[] for _ in range(len(validity))]
    c = validity["clean_logit_diff"].astype(float).to_numpy()
    k = validity["corrupted_logit_diff"].astype(float).to_numpy()
    d = validity["abs_diff"].astype(float).to_numpy()
    for i in range(len(validity)):
        if min_clean_logit_diff is not None and not c[i] >= min_clean_logit_diff:
            reasons[i].append(f"clean logit difference {c[i]:.3g} < {min_clean_logit_diff:g}")
        if require_flip and not bool(validity["flips"].fillna(False).iloc[i]):
            reasons[i].append(f"corruption does not flip the preference (clean {c[i]:.3g}, corrupted {k[i]:.3g})")
        if min_abs_diff is not None and not d[i] >= min_abs_diff:
            reasons[i].append(f"|recovery denominator| {d[i]:.3g} < {min_abs_diff:g}")
    validity["reason"] = ["; ".join(r) for r in reasons]
    validity["excluded"] = validity["reason"] != ""
    dropped = set(validity.loc[validity["excluded"], "probe_id"])
    return data[~data["probe_id"].isin(dropped)], validity
