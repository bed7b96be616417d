"""Synthetic results in the engine's exact schema, with effects whose size and shape you choose.

Two uses: the analyses are tested on data whose truth is known (a planted layer effect must be found, a null one
must be rejected at the nominal rate), and a user planning a study can ask "with 20 probes per group and the noise
I saw in a pilot, how often would a layer effect of this size be detected?" (:func:`power`) before paying for the
forward passes.

The generative model of a recovery value, for probe p of group g, layer l, site kind k, position t, metric m::

    recovery = (profile[l] + interaction * c_g * ramp[l]) * kind_scale[k] * position_weight[t]
               + probe_offset[p] + noise

``profile`` is a bump over layers (or the values you pass), ``ramp`` runs from -1 to 1 across layers and
``c_g`` from -0.5 to 0.5 across groups, so ``interaction`` changes the groups' layer profiles without changing their
overall means. ``clean`` and ``corrupted`` are drawn per probe and metric and ``patched`` is set so that
``recovery == (patched - corrupted) / (clean - corrupted)`` exactly.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.io import save_results

DEFAULT_TOKENS = ("The", " Eiffel", " Tower", " is", " located", " in")
DEFAULT_GROUPS: Mapping[str, Sequence[str]] = {"knowledge_type": ("definitional", "associative")}
KIND_SCALE = {"resid_pre": 1.0, "resid_post": 1.0, "block_out": 1.0, "attn_out": 0.45, "mlp_out": 0.8, "head": 0.2,
              "module": 0.7}


def make_results(
    n_probes: int = 24,
    n_layers: int = 6,
    *,
    groups: Mapping[str, Sequence[str]] | None = DEFAULT_GROUPS,
    site_kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    tokens: Sequence[str] = DEFAULT_TOKENS,
    metrics: Sequence[str] = ("logit_diff", "prob"),
    operation: str = "replace",
    direction: str = "denoising",
    layer_effect: float | Sequence[float] = 0.6,
    interaction: float = 0.0,
    probe_sd: float = 0.1,
    noise_sd: float = 0.2,
    position_weights: Sequence[float] | None = None,
    missing_cells: int = 0,
    undefined_probes: int = 0,
    trivial_sites: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """A tidy results table as the patching engine writes it (see :data:`analyses.io.REQUIRED_COLUMNS`).

    ``layer_effect`` is the height of a bump peaking in the middle layer, or one value per layer; 0 gives a null
    layer effect. ``interaction`` is the difference between the first and last group's slopes across layers.
    ``missing_cells`` removes that many random (probe, layer) pairs entirely. ``undefined_probes`` gives that many
    probes clean == corrupted on every metric, so their recovery is undefined (NaN, ``recovery_defined`` False).
    ``trivial_sites`` adds the unembedding and the final norm at the last position (layer NA, recovery 1,
    ``trivial`` True). Probes are assigned to groups in turn (p0 -> first group, p1 -> second, ...).
    """
    rng = np.random.default_rng(seed)
    layers = np.arange(n_layers)
    profile = _profile(layer_effect, n_layers)
    ramp = np.linspace(-1.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)
    n_pos = len(tokens)
    weights = np.asarray(position_weights if position_weights is not None else _default_weights(n_pos), float)
    if len(weights) != n_pos:
        raise ValueError(f"position_weights has {len(weights)} values for {n_pos} tokens")
    group_cols = dict(groups or {})
    labels = {col: [vals[p % len(vals)] for p in range(n_probes)] for col, vals in group_cols.items()}
    first = next(iter(group_cols), None)
    n_groups = len(group_cols[first]) if first else 1
    centre = (
        np.array([group_cols[first].index(labels[first][p]) for p in range(n_probes)], float)
        / max(n_groups - 1, 1) - 0.5
        if first
        else np.zeros(n_probes)
    )
    offsets = rng.normal(0.0, probe_sd, n_probes)
    undefined = (set(rng.choice(n_probes, size=min(undefined_probes, n_probes), replace=False).tolist())
                 if undefined_probes else set())

    frames = []
    for metric in metrics:
        clean, corrupted = _endpoints(metric, n_probes, rng)
        for p in undefined:
            corrupted[p] = clean[p]
        for kind in site_kinds:
            scale = KIND_SCALE.get(kind, 0.7)
            # shape (probe, layer, position)
            mean = ((profile[None, :] + interaction * centre[:, None] * ramp[None, :])[:, :, None] * scale
                    * weights[None, None, :])
            rec = mean + offsets[:, None, None] + rng.normal(0.0, noise_sd, (n_probes, n_layers, n_pos))
            p_idx, l_idx, t_idx = np.meshgrid(np.arange(n_probes), layers, np.arange(n_pos), indexing="ij")
            p_idx, l_idx, t_idx, rec = p_idx.ravel(), l_idx.ravel(), t_idx.ravel(), rec.ravel()
            frames.append(
                _rows(p_idx, l_idx, t_idx, rec, clean, corrupted, kind, metric, tokens, labels, operation, direction,
                      trivial=False)
            )
        if trivial_sites:
            last = n_pos - 1
            for kind in ("unembed", "final_norm"):
                p_idx = np.arange(n_probes)
                frames.append(
                    _rows(p_idx, None, np.full(n_probes, last), np.ones(n_probes), clean, corrupted, kind, metric,
                          tokens, labels, operation, direction, trivial=True)
                )
    data = pd.concat(frames, ignore_index=True)
    if missing_cells:
        pairs = [(p, layer) for p in range(n_probes) for layer in range(n_layers)]
        drop = rng.choice(len(pairs), size=min(missing_cells, len(pairs)), replace=False)
        gone = {(f"p{pairs[i][0]:03d}", pairs[i][1]) for i in drop}
        key = list(zip(data["probe_id"], data["layer"].fillna(-1).astype(int), strict=True))
        data = data[[k not in gone for k in key]].reset_index(drop=True)
    return data


def make_meta(data: pd.DataFrame, *, seed: int = 0, group_columns: Sequence[str] | None = None,
              **spec: Any) -> dict[str, Any]:
    """A ``run.json`` sidecar for synthetic ``data``: a plausible spec, a synthetic model identity, versions."""
    import importlib.metadata as md

    if group_columns is None:
        group_columns = [c for c in DEFAULT_GROUPS if c in data.columns]
    layers = data["layer"].dropna()
    versions = {}
    for pkg in ("clap", "pandas", "numpy", "scipy", "pingouin"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "spec": {
            "model": "synthetic",
            "probes": "synthetic",
            "sites": sorted(set(data["site_kind"])),
            "positions": sorted(set(data["positions"])),
            "operation": sorted(set(data["operation"])),
            "direction": sorted(set(data["direction"])),
            "metrics": sorted(set(data["metric"])),
            **spec,
        },
        "model": {
            "name": "synthetic",
            "architecture": "synthetic",
            "n_layers": int(layers.max()) + 1 if len(layers) else 0,
            "n_heads": 0,
            "d_model": 0,
            "dtype": "float32",
            "revision": "synthetic",
        },
        "versions": versions,
        "seed": int(seed),
        "group_columns": list(group_columns),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_probes": int(data["probe_id"].nunique()),
    }


def write_synthetic(results_dir: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """Write synthetic ``results.parquet`` and ``run.json`` into ``results_dir``.

    ``kwargs`` go to :func:`make_results`.
    """
    data = make_results(seed=seed, **kwargs)
    groups = kwargs.get("groups", DEFAULT_GROUPS) or {}
    meta = make_meta(data, seed=seed, group_columns=list(groups))
    return save_results(data, meta, results_dir)


def power(
    n_sims: int = 200,
    alpha: float = 0.05,
    test: str = "rm_anova",
    *,
    seed: int = 0,
    p_column: str | None = None,
    **kwargs: Any,
) -> float:
    """Fraction of ``n_sims`` synthetic studies in which ``test`` rejects at ``alpha``: the power (or, with no
    planted effect, the false-positive rate).

    ``test`` is ``"rm_anova"`` (column ``p_GG_corr``), ``"friedman"`` (``p_unc``) or ``"mixed_anova"`` (the
    interaction's ``p_GG_corr``); ``kwargs`` go to :func:`make_results` (one site kind, metric and position by
    default, to keep each simulation to a few milliseconds).
    """
    import warnings

    from analyses import stats
    from analyses.select import AnalysisWarning

    kwargs.setdefault("site_kinds", ("resid_pre",))
    kwargs.setdefault("metrics", ("logit_diff",))
    kwargs.setdefault("tokens", ("x",))
    kwargs.setdefault("trivial_sites", False)
    funcs = {"rm_anova": (stats.rm_anova, "p_GG_corr", None), "friedman": (stats.friedman, "p_unc", None),
             "mixed_anova": (stats.mixed_anova, "p_GG_corr", "Interaction")}
    if test not in funcs:
        raise ValueError(f"test must be one of {', '.join(funcs)}, got {test!r}")
    func, column, source = funcs[test]
    column = p_column or column
    seeds = np.random.SeedSequence(seed).generate_state(n_sims)
    hits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for s in seeds:
            data = make_results(seed=int(s), **kwargs)
            table = func(data)
            row = table[table["Source"] == source].iloc[0] if source else table.iloc[0]
            hits += bool(row[column] < alpha)
    return hits / n_sims


def _profile(layer_effect: float | Sequence[float], n_layers: int) -> np.ndarray:
    if np.ndim(layer_effect) == 0:
        centre = (n_layers - 1) / 2
        width = max(n_layers / 5, 0.75)
        return float(layer_effect) * np.exp(-0.5 * ((np.arange(n_layers) - centre) / width) ** 2)
    values = np.asarray(layer_effect, float)
    if len(values) != n_layers:
        raise ValueError(f"layer_effect has {len(values)} values for {n_layers} layers")
    return values


def _default_weights(n_pos: int) -> np.ndarray:
    """Most recovery at the last token, some at the subject tokens (positions 1-2), little elsewhere."""
    w = np.full(n_pos, 0.2)
    w[1:3] = 0.6
    w[-1] = 1.0
    return w[:n_pos]


def _endpoints(metric: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if metric == "prob":
        return rng.uniform(0.4, 0.9, n), rng.uniform(0.01, 0.1, n)
    if metric == "kl":
        return np.zeros(n), rng.uniform(1.0, 3.0, n)
    return rng.normal(3.0, 0.5, n), rng.normal(-1.0, 0.5, n)


def _rows(p_idx, l_idx, t_idx, rec, clean, corrupted, kind, metric, tokens, labels, operation, direction, trivial):
    n = len(p_idx)
    denom = clean[p_idx] - corrupted[p_idx]
    defined = np.abs(denom) > 1e-9
    recovery = np.where(defined, rec, np.nan)
    patched = corrupted[p_idx] + np.where(defined, rec, 0.0) * denom
    if l_idx is None:
        site = np.full(n, "lm_head" if kind == "unembed" else "final_norm", dtype=object)
        layer = pd.array([pd.NA] * n, dtype="Int64")
    else:
        site = np.array([f"layers.{index}.{kind}" for index in l_idx], dtype=object)
        layer = pd.array(l_idx, dtype="Int64")
    frame = {
        "probe_id": np.array([f"p{p:03d}" for p in p_idx], dtype=object),
        **{col: np.array([vals[p] for p in p_idx], dtype=object) for col, vals in labels.items()},
        "site": site,
        "site_kind": kind,
        "layer": layer,
        "head": pd.array([pd.NA] * n, dtype="Int64"),
        "position": pd.array(t_idx, dtype="Int64"),
        "positions": "all",
        "token": np.array([tokens[t] for t in t_idx], dtype=object),
        "operation": operation,
        "direction": direction,
        "metric": metric,
        "clean": clean[p_idx].astype(float),
        "corrupted": corrupted[p_idx].astype(float),
        "patched": patched.astype(float),
        "recovery": recovery.astype(float),
        "recovery_defined": defined,
        "trivial": trivial,
    }
    return pd.DataFrame(frame)
