"""Clean-run ablations: how much each head and each layer's attention / MLP output matters to the clean answer.

The run (:func:`interventions.derived.ablation_spec`) has no corrupted prompt: both baselines are the clean prompt,
and each site is zeroed, replaced by its mean over the probe set, or by another probe's activation (resample). The
``effect`` column is then the change in the clean metric, ``ablated - clean`` (negative: the site was needed).
Patching asks whether a site's clean activation *suffices* to restore the answer in the corrupted run; ablation
whether the clean run *needs* it. The two need not agree, so their rank agreement over heads is reported:
Spearman's rho between each head's mean drop under ablation (``clean - ablated``) and its mean patching recovery
on the same probes, with a permutation p over heads (:func:`scipy.stats.permutation_test`, pairings) and a
percentile-bootstrap interval over probes (the unit of replication).

DataFrame in, DataFrame out: :func:`ablation_cells`, :func:`ablation_summary`, :func:`head_rank_agreement`,
:func:`methods_sentences`, :func:`findings_sentences`; :func:`analyze_ablation` does it for a run's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats as sps

from analyses.formatting import fmt, interval
from clap.contract import atomic_write_frame, read_results
from clap.errors import ClapError

TABLE_FILES = {"summary": "ablation_summary.csv", "agreement": "ablation_rank_agreement.csv"}
SUMMARY_COLUMNS = ["n", "clean", "ablated", "change", "sd", "ci_low", "ci_high", "p_unc"]
AGREEMENT_COLUMNS = ["operation", "n_heads", "n_probes", "rho", "p_perm", "ci_low", "ci_high", "n_boot", "n_perm"]


def ablation_cells(ablation: pd.DataFrame, metric: str = "logit_diff") -> pd.DataFrame:
    """One row per probe, site and operation of ``metric``: ``clean``, ``ablated`` and ``change`` = ablated - clean.
    Refuses results that are not a clean-run ablation (a corrupted prompt that differs from the clean one)."""
    rows = ablation[ablation["metric"] == metric]
    if rows.empty:
        raise ClapError(f"ablation: no rows of metric {metric} (the run has {', '.join(ablation['metric'].unique())})")
    if not np.allclose(rows["clean"], rows["corrupted"], rtol=0, atol=1e-6):
        raise ClapError("ablation: the run's corrupted baseline differs from its clean one; a clean-run ablation "
                        "runs the clean prompt twice (corrupted_prompt: clean, no baseline intervention)")
    out = rows.rename(columns={"patched": "ablated"}).copy()
    out["change"] = out["ablated"] - out["clean"]
    keep = [c for c in ("probe_id", "site", "site_kind", "layer", "head", "positions", "operation", "clean",
                        "ablated", "change") if c in out.columns]
    extra = [c for c in rows.columns if c not in keep and c not in _RESULT_COLUMNS]
    return out[keep[:1] + extra + keep[1:]].reset_index(drop=True)


_RESULT_COLUMNS = {"module", "position", "token", "source_token", "direction", "metric", "corrupted", "patched",
                   "recovery", "recovery_defined", "trivial", "n_patched_tokens", "window", "sample", "effect",
                   "approximate"}


def _mean_ci(values: np.ndarray) -> dict[str, float]:
    n = len(values)
    out = {"n": n, "change": float(values.mean()) if n else np.nan, "sd": np.nan, "ci_low": np.nan,
           "ci_high": np.nan, "p_unc": np.nan}
    if n > 1:
        out["sd"] = float(values.std(ddof=1))
        if out["sd"] > 0:
            half = sps.t.ppf(0.975, n - 1) * out["sd"] / np.sqrt(n)
            out.update(ci_low=out["change"] - half, ci_high=out["change"] + half,
                       p_unc=float(sps.ttest_1samp(values, 0.0).pvalue))
    return out


def ablation_summary(cells: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """Per operation and site (and group, with ``all`` for every probe): ``n`` probes, mean ``clean`` and ``ablated``
    metric, mean ``change`` with ``sd``, 95 % t interval and the two-sided one-sample t-test against 0 (uncorrected),
    sorted by operation, then in the network's order (layer, site kind, head)."""
    keys = ["operation", "site", "site_kind", "layer", "head"]
    splits = [("all", cells)] + (list(cells.groupby(group, sort=True)) if group and group in cells else [])
    rows = []
    for label, part in splits:
        for key, block in part.groupby(keys, sort=False, dropna=False):
            stats = _mean_ci(block["change"].to_numpy(float))
            rows.append({**dict(zip(keys, key, strict=True)), **({group: label} if group else {}),
                         "clean": block["clean"].mean(), "ablated": block["ablated"].mean(), **stats})
    table = pd.DataFrame(rows, columns=keys + ([group] if group else []) + SUMMARY_COLUMNS)
    order = {"attn_out": 0, "head": 1, "mlp_out": 2}
    table["_kind"] = table["site_kind"].map(order).fillna(3)
    sort = ["operation", *([group] if group else []), "layer", "_kind", "head"]
    return table.sort_values(sort, na_position="last").drop(columns="_kind").reset_index(drop=True)


def head_rank_agreement(cells: pd.DataFrame, patching: pd.DataFrame, *, dv: str = "recovery",
                        metric: str = "logit_diff", positions: str | None = None, n_boot: int = 2000,
                        n_perm: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Per ablation operation: Spearman's rho over heads between the mean drop ``clean - ablated`` and the mean
    patching ``dv`` (``replace`` rows of ``metric`` at ``positions``, default the ablation's own), on the probes and
    heads both hold; ``p_perm`` a two-sided permutation p over heads (pairings), ``ci_low`` / ``ci_high`` the 95 %
    percentile-bootstrap interval over probes (probes resampled with replacement, both means recomputed)."""
    heads = cells[cells["site_kind"] == "head"]
    if heads.empty:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    positions = positions or str(heads["positions"].iloc[0])
    patch = patching[(patching["site_kind"] == "head") & (patching["metric"] == metric)
                     & (patching["operation"] == "replace") & (patching["positions"].astype(str) == positions)]
    patched = patch.pivot_table(index="probe_id", columns="site", values=dv, aggfunc="mean")
    rng = np.random.default_rng(seed)
    rows = []
    for operation, part in heads.groupby("operation", sort=True):
        drop = (-part.pivot_table(index="probe_id", columns="site", values="change", aggfunc="mean"))
        probes = sorted(set(drop.index) & set(patched.index))
        sites = sorted(set(drop.columns) & set(patched.columns))
        a = drop.loc[probes, sites].to_numpy(float)
        b = patched.loc[probes, sites].to_numpy(float)
        complete = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
        a, b = a[complete], b[complete]
        row = {"operation": operation, "n_heads": len(sites), "n_probes": len(a), "rho": np.nan, "p_perm": np.nan,
               "ci_low": np.nan, "ci_high": np.nan, "n_boot": n_boot, "n_perm": n_perm}
        if len(sites) >= 3 and len(a) >= 2:
            x, y = a.mean(0), b.mean(0)
            row["rho"] = float(sps.spearmanr(x, y).statistic)
            test = sps.permutation_test((x, y), lambda u, v: sps.spearmanr(u, v).statistic,
                                        permutation_type="pairings", n_resamples=n_perm, alternative="two-sided",
                                        rng=rng)
            row["p_perm"] = float(test.pvalue)
            boots = []
            for _ in range(n_boot):
                pick = rng.integers(0, len(a), len(a))
                boots.append(sps.spearmanr(a[pick].mean(0), b[pick].mean(0)).statistic)
            boots = np.asarray(boots, float)
            boots = boots[np.isfinite(boots)]
            if len(boots):
                row["ci_low"], row["ci_high"] = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
        rows.append(row)
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def methods_sentences(cells: pd.DataFrame, metric: str, agreement: pd.DataFrame, dv: str) -> list[str]:
    """The Methods sentences of the ablation section."""
    ops = ", ".join(f"`{o}`" for o in sorted(cells["operation"].unique()))
    out = [f"Ablation of the clean run (no corrupted prompt; operations {ops}: zero, the mean over the probe set's "
           "clean prompts at the same position counted from the end, another probe's clean activation by a seeded "
           f"derangement) at position `{cells['positions'].iloc[0]}`: per probe the change in the clean {metric}, "
           "ablated - clean (negative: the site is needed); means over probes with 95 % t intervals and one-sample "
           "t-tests against 0 (uncorrected)."]
    if len(agreement):
        out.append(f"Rank agreement with head patching: Spearman's rho over heads between the mean drop under "
                   f"ablation (clean - ablated) and the mean patching {dv} on the same probes; permutation p over "
                   f"heads ({int(agreement['n_perm'].iloc[0])} pairings) and a 95 % percentile-bootstrap interval "
                   f"over probes ({int(agreement['n_boot'].iloc[0])} resamples).")
    return out


def findings_sentences(summary: pd.DataFrame, agreement: pd.DataFrame, group: str | None = None) -> list[str]:
    """Per operation: the site whose ablation lowers the clean metric most, and the rank agreement with patching."""
    rows = summary[summary[group] == "all"] if group and group in summary else summary
    out = []
    for operation, part in rows.groupby("operation", sort=True):
        part = part[np.isfinite(part["change"])]
        if part.empty:
            continue
        worst = part.loc[part["change"].idxmin()]
        line = (f"`{operation}` ablation: the largest drop of the clean value is at {worst['site']} "
                f"({fmt(worst['change'])} {interval(worst['ci_low'], worst['ci_high'])}, n = {int(worst['n'])})")
        agree = agreement[agreement["operation"] == operation] if len(agreement) else agreement
        if len(agree) and np.isfinite(agree["rho"].iloc[0]):
            a = agree.iloc[0]
            line += (f"; rank agreement with head patching over {int(a['n_heads'])} heads: rho = {fmt(a['rho'])} "
                     f"{interval(a['ci_low'], a['ci_high'])}, permutation p = {fmt(a['p_perm'])}")
        out.append(line + ".")
    return out


@dataclass
class AblationResult:
    """What :func:`analyze_ablation` computed."""

    cells: pd.DataFrame
    summary: pd.DataFrame
    agreement: pd.DataFrame
    methods: list[str]
    findings: list[str]
    figures: list[Any] = field(default_factory=list)  #: (name, title, caption, paths)
    files: list[Path] = field(default_factory=list)


def analyze_ablation(ablation_dir: str | Path, out: str | Path, patching: pd.DataFrame | None = None, *,
                     dv: str = "recovery", metric: str = "logit_diff", group: str | None = None,
                     probes: list[str] | None = None, n_boot: int = 2000, seed: int = 0, figures: bool = True,
                     dpi: int = 200) -> AblationResult:
    """The ablation tables of a clean-run ablation folder, restricted to ``probes`` (the analysis's kept probes),
    with the rank agreement against ``patching`` (the study's head-patching rows), written into ``out``."""
    frame, _ = read_results(ablation_dir)
    cells = ablation_cells(frame, metric)
    if probes is not None:
        cells = cells[cells["probe_id"].isin(probes)].reset_index(drop=True)
    summary = ablation_summary(cells, group)
    agreement = (head_rank_agreement(cells, patching, dv=dv, metric=metric, n_boot=n_boot, seed=seed)
                 if patching is not None else pd.DataFrame(columns=AGREEMENT_COLUMNS))
    result = AblationResult(cells, summary, agreement, methods_sentences(cells, metric, agreement, dv),
                            findings_sentences(summary, agreement, group))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.files += [atomic_write_frame(out / TABLE_FILES["summary"], summary),
                     atomic_write_frame(out / TABLE_FILES["agreement"], agreement)]
    if figures and (cells["site_kind"] == "head").any():
        from analyses.figures import heatmap_layer_head, save_figure

        for operation in sorted(cells["operation"].unique()):
            rows = frame[(frame["metric"] == metric) & frame["probe_id"].isin(cells["probe_id"].unique())]
            fig = heatmap_layer_head(rows.assign(effect=rows["patched"] - rows["clean"]), "effect", group,
                                     operation=operation, metric=metric, site_kind="head",
                                     title=f"Change in the clean {metric} under {operation} ablation, per head")
            name = f"ablation_heads_{operation}"
            paths = save_figure(fig, out / "figures" / name, dpi=dpi)
            result.figures.append((name, f"Head map: {operation} ablation of the clean run",
                                   f"Mean over probes of ablated - clean {metric} per layer and head (blue: the head "
                                   "is needed).", paths))
            result.files += paths
    return result
