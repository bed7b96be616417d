"""The additivity check: do single-layer patching effects add up when the layers are patched together?

The study's analyses assume layer contributions combine linearly. A joint patch of a set of layers S (the run
derived by :func:`interventions.derived.additivity_spec`: cumulative stacks 0..k and k..N-1, each probe's top-m
layers, pairs among its top layers) measures that directly: per probe,

* ``gap = joint(S) - sum_{l in S} single(l)``: 0 if the layers add up, negative if they overlap (redundant copies
  of the answer, saturation), positive if they need each other (one layer's effect depends on another's);
* for a pair, the same quantity is the interaction term ``joint(i, j) - single(i) - single(j)``.

Values are the dependent variable (``recovery`` of one metric by default) of each probe at the position the joint
run patched, the single-layer values taken from the study's own single-layer rows (after the probe exclusions the
analysis applied). Means over probes come with 95 % t intervals and a one-sample t-test against 0.

DataFrame in, DataFrame out: :func:`additivity_cells` (one row per probe and joint cell), :func:`gap_summary` and
:func:`pair_summary` (means with intervals), :func:`methods_sentences`, :func:`findings_sentences`;
:func:`joint_vs_sum_figure` draws the "joint vs sum" figure. :func:`analyze_additivity` does all of it for a joint
run's folder and writes the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats as sps

from analyses.formatting import fmt, interval
from clap.contract import DESIGN_FILE, atomic_write_frame, read_results
from clap.errors import ClapError

#: the table files :func:`analyze_additivity` writes into the analysis folder
TABLE_FILES = {"cells": "additivity_cells.csv", "gaps": "additivity_gaps.csv", "pairs": "additivity_pairs.csv"}
FAMILY_WORDS = {"bottom": "layers 0..k", "top": "layers k..N-1", "top_m": "each probe's top-m layers",
                "pair": "pairs among each probe's top layers"}
SUMMARY_COLUMNS = ["n", "joint", "sum_single", "gap", "gap_sd", "ci_low", "ci_high", "T", "p_unc"]


#: the columns of :func:`gap_summary` besides the group column
GAP_COLUMNS = ("site_kind", "family", "k", "n", "joint", "sum_single", "gap", "gap_sd", "ci_low", "ci_high", "T",
               "p_unc")


def additivity_cells(singles: pd.DataFrame, joint: pd.DataFrame, design: pd.DataFrame, *, dv: str = "recovery",
                     metric: str = "logit_diff", group: str | None = None) -> pd.DataFrame:
    """One row per probe and design entry: the joint value, the sum of its layers' single values and the gap.

    ``singles``: tidy single-layer results (rows with ``window`` 1 and no head; the probes kept by the analysis);
    ``joint``: the joint run's tidy results; ``design``: :func:`interventions.derived.additivity_spec`'s table. A
    probe missing from either side, or with an undefined value, is left out (and counted by the summaries' ``n``).
    """
    positions = sorted(joint["positions"].astype(str).unique())
    if len(positions) != 1:
        raise ClapError(f"additivity: the joint run patched several token selections ({', '.join(positions)}); one "
                        "is compared with the single-layer rows")
    rows = singles[(singles["metric"] == metric) & (singles["operation"] == "replace")
                   & (singles["positions"].astype(str) == positions[0]) & singles["head"].isna()
                   & singles["site_kind"].isin(design["site_kind"].unique())]
    if "window" in rows.columns:
        rows = rows[rows["window"].fillna(1) == 1]
    single = {(str(p), str(k), int(layer)): float(v)
              for p, k, layer, v in zip(rows["probe_id"], rows["site_kind"], rows["layer"], rows[dv], strict=True)}
    j = joint[joint["metric"] == metric]
    joint_value = {(str(p), str(s)): float(v) for p, s, v in zip(j["probe_id"], j["site"], j[dv], strict=True)}
    labels = rows.drop_duplicates("probe_id").set_index("probe_id")[group] if group else None
    out = []
    for entry in design.to_dict("records"):
        probe, kind = str(entry["probe_id"]), str(entry["site_kind"])
        layers = [int(v) for v in str(entry["layers"]).split(",")]
        parts = [single.get((probe, kind, layer)) for layer in layers]
        value = joint_value.get((probe, str(entry["site"])))
        if value is None or any(p is None for p in parts):
            continue
        row = {"probe_id": probe, **({group: labels.get(probe)} if labels is not None else {}), **entry,
               "joint": value, "sum_single": float(np.sum(parts)), "singles": ",".join(f"{p:.6g}" for p in parts)}
        row["gap"] = row["joint"] - row["sum_single"]
        out.append(row)
    cells = pd.DataFrame(out)
    if cells.empty:
        raise ClapError("additivity: no probe has both joint and single-layer values (the joint run and the "
                        "study's single-layer rows share no probe, or every value is undefined)")
    return cells[np.isfinite(cells["joint"]) & np.isfinite(cells["sum_single"])].reset_index(drop=True)


def _summary(values: pd.DataFrame) -> dict[str, Any]:
    """Mean joint, sum and gap over probes (each probe once), the gap's 95 % t interval and t-test against 0."""
    gap = values["gap"].to_numpy(float)
    n = len(gap)
    out = {"n": n, "joint": values["joint"].mean(), "sum_single": values["sum_single"].mean(), "gap": gap.mean(),
           "gap_sd": gap.std(ddof=1) if n > 1 else np.nan, "ci_low": np.nan, "ci_high": np.nan, "T": np.nan,
           "p_unc": np.nan}
    if n > 1 and out["gap_sd"] > 0:
        half = sps.t.ppf(0.975, n - 1) * out["gap_sd"] / np.sqrt(n)
        test = sps.ttest_1samp(gap, 0.0)
        out.update(ci_low=out["gap"] - half, ci_high=out["gap"] + half, T=float(test.statistic),
                   p_unc=float(test.pvalue))
    return out


def _by_group(cells: pd.DataFrame, keys: list[str], group: str | None) -> pd.DataFrame:
    """:func:`_summary` per ``keys`` over all probes (``group`` column ``all``) and per group."""
    rows = []
    splits = [("all", cells)] + (list(cells.groupby(group, sort=True)) if group and group in cells else [])
    for label, part in splits:
        for key, block in part.groupby(keys, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            # a probe contributes one value per key (several design rows per key are averaged first)
            per_probe = block.groupby("probe_id")[["joint", "sum_single", "gap"]].mean()
            rows.append({**dict(zip(keys, key, strict=True)), **({group: label} if group else {}),
                         **_summary(per_probe)})
    columns = keys + ([group] if group else []) + SUMMARY_COLUMNS
    return pd.DataFrame(rows, columns=columns)


def gap_summary(cells: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """Per site kind, family (``bottom``, ``top``, ``top_m``, ``pair``) and k (a stack's varying end layer, m of a
    top-m set; pairs pooled per probe): ``n`` probes, mean ``joint``, mean ``sum_single``, mean ``gap`` with its
    ``gap_sd``, 95 % t interval (``ci_low``, ``ci_high``), ``T`` and two-sided ``p_unc`` against 0; over all probes
    (``group`` ``all``) and per group."""
    cells = cells.assign(k=cells["k"].where(cells["family"] != "pair", -1))
    table = _by_group(cells, ["site_kind", "family", "k"], group)
    table["k"] = table["k"].astype("Int64").mask(table["family"] == "pair")
    return table


def pair_summary(cells: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """The interaction term ``joint(i, j) - single(i) - single(j)`` per site kind and pair of ranks (``ranks``
    ``1,2``: each probe's two layers of largest single recovery, whichever layers they are), as :func:`gap_summary`
    (``gap`` is the mean interaction)."""
    pairs = cells[cells["family"] == "pair"]
    if pairs.empty:
        return pd.DataFrame(columns=["site_kind", "ranks", *([group] if group else []), *SUMMARY_COLUMNS])
    return _by_group(pairs, ["site_kind", "ranks"], group)


def methods_sentences(cells: pd.DataFrame, dv: str, metric: str) -> list[str]:
    """The Methods sentences of the additivity check (only the families that ran)."""
    families = [f for f in FAMILY_WORDS if f in set(cells["family"])]
    kinds = ", ".join(f"`{k}`" for k in sorted(cells["site_kind"].unique()))
    position = str(cells["positions"].iloc[0]) if "positions" in cells else "as patched"
    return [
        f"Additivity check: {', '.join(FAMILY_WORDS[f] for f in families)} patched jointly ({kinds}, position "
        f"`{position}`, one cell per set of layers); per probe the gap = joint {dv} - the sum of the same layers' "
        f"single-layer {dv} (metric {metric}): 0 when the layers add up, negative when they overlap, positive when "
        "they need each other; for pairs it is the interaction term joint(i, j) - single(i) - single(j). Each probe's "
        f"layers are ranked by their single-layer {dv} (largest first). Means over probes with 95 % t intervals and "
        "one-sample t-tests against 0 (uncorrected). Residual-stream layers are not stacked: at the patched token "
        "the last one overwrites what the earlier ones did.",
    ]


def findings_sentences(gaps: pd.DataFrame, group: str | None = None, alpha: float = 0.05) -> list[str]:
    """One sentence per site kind (all probes): the gap of the whole stack and of each top-m set, with intervals."""
    overall = gaps[gaps[group] == "all"] if group and group in gaps else gaps
    out = []
    for kind, part in overall.groupby("site_kind", sort=True):
        bits = []
        whole = part[part["family"] == "bottom"]
        if len(whole):
            row = whole.loc[whole["k"].astype(float).idxmax()]
            bits.append(f"all layers together {fmt(row['joint'])} vs the sum of single layers "
                        f"{fmt(row['sum_single'])} (gap {_gap(row, alpha)})")
        for row in part[part["family"] == "top_m"].to_dict("records"):
            bits.append(f"top {int(row['k'])} layers {fmt(row['joint'])} vs {fmt(row['sum_single'])} "
                        f"(gap {_gap(row, alpha)})")
        if bits:
            out.append(f"Additivity of `{kind}` (means over n = {int(part['n'].max())} probes, gap with 95 % t "
                       "interval): "
                       + "; ".join(bits) + ".")
    return out


def _gap(row: dict, alpha: float) -> str:
    ci = f" {interval(row['ci_low'], row['ci_high'])}" if np.isfinite(row["ci_low"]) else ""
    verdict = ""
    if np.isfinite(row["p_unc"]):
        verdict = ", not additive" if row["p_unc"] < alpha else ", consistent with additive"
    return f"{fmt(row['gap'])}{ci}{verdict}"


def gap_display(gaps: pd.DataFrame) -> pd.DataFrame:
    """The headline of an additivity check as one small table: per site kind and group (``all`` first), the gap
    (joint - sum of single layers) of each probe's top-m layers and the mean over its pairs, each ``gap [95 % t
    interval]`` (the cumulative stacks stay in the model's report). Empty when there is nothing of those families."""
    chosen = gaps[gaps["family"].isin(["top_m", "pair"])]
    if chosen.empty:
        return pd.DataFrame()
    group = next((c for c in gaps.columns if c not in GAP_COLUMNS), None)
    rows = []
    keys = ["site_kind"] + ([group] if group else [])
    for values, part in chosen.groupby(keys, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(["site kind"] + ([group] if group else []), values, strict=True))
        row["n"] = int(part["n"].max())
        for record in part.to_dict("records"):
            name = "pairs" if record["family"] == "pair" else f"top {int(record['k'])}"
            row[name] = f"{fmt(record['gap'])} {interval(record['ci_low'], record['ci_high'])}"
        rows.append(row)
    table = pd.DataFrame(rows)
    ordered = sorted((c for c in table.columns if c.startswith("top ")), key=lambda c: int(c.split()[1]))
    return table[[c for c in table.columns if not c.startswith("top ") and c != "pairs"] + ordered
                 + (["pairs"] if "pairs" in table.columns else [])]


def joint_vs_sum_figure(cells: pd.DataFrame, dv: str = "recovery") -> Any:
    """Each probe's joint value against the sum of its layers' single values, one panel per site kind, colour by
    family; the diagonal is perfect additivity (below it: overlap, above it: synergy)."""
    import seaborn as sns

    from analyses.figures import COLUMN_WIDTH_IN, LINE_PALETTE, house_style, new_figure

    kinds = sorted(cells["site_kind"].unique())
    fig, axes = new_figure(3.0 * len(kinds), nrows=len(kinds), width=COLUMN_WIDTH_IN)
    families = [f for f in FAMILY_WORDS if f in set(cells["family"])]
    with house_style():
        for ax, kind in zip(axes, kinds, strict=True):
            part = cells[cells["site_kind"] == kind]
            sns.scatterplot(data=part, x="sum_single", y="joint", hue="family", hue_order=families, style="family",
                            palette=LINE_PALETTE, ax=ax, s=18, alpha=0.75)
            low = float(np.nanmin([part["sum_single"].min(), part["joint"].min()]))
            high = float(np.nanmax([part["sum_single"].max(), part["joint"].max()]))
            ax.plot([low, high], [low, high], color="0.4", lw=0.8, ls="--", zorder=0)
            ax.set_xlabel(f"sum of single-layer {dv}")
            ax.set_ylabel(f"joint {dv}")
            ax.set_title(f"{kind}: joint vs sum (diagonal: additive)")
            ax.legend(title=None, loc="best")
    return fig


@dataclass
class AdditivityResult:
    """What :func:`analyze_additivity` computed: the tables, Methods and findings sentences, figures."""

    cells: pd.DataFrame
    gaps: pd.DataFrame
    pairs: pd.DataFrame
    methods: list[str]
    findings: list[str]
    figures: list[Any] = field(default_factory=list)  #: analyses.pipeline.FigureFile entries
    files: list[Path] = field(default_factory=list)


def analyze_additivity(singles: pd.DataFrame, joint_dir: str | Path, out: str | Path, *, dv: str = "recovery",
                       metric: str | None = None, group: str | None = None, alpha: float = 0.05,
                       figures: bool = True, dpi: int = 200) -> AdditivityResult:
    """The additivity tables of a joint run (``joint_dir``: results.parquet, run.json and ``design.csv``) against
    the analysis's single-layer rows ``singles``, written into ``out`` (with the figure when ``figures``)."""
    joint_dir, out = Path(joint_dir), Path(out)
    design_path = joint_dir / DESIGN_FILE
    if not design_path.is_file():
        raise ClapError(f"additivity: {design_path} is missing; the joint run is written by `clap run` with an "
                        "`additivity:` section (interventions.derived.additivity_spec writes the design)")
    joint, _ = read_results(joint_dir)
    design = pd.read_csv(design_path, dtype={"layers": str, "ranks": str, "probe_id": str})
    metrics = list(dict.fromkeys(joint["metric"]))
    metric = metric or ("logit_diff" if "logit_diff" in metrics else metrics[0])
    cells = additivity_cells(singles, joint, design, dv=dv, metric=metric, group=group)
    cells["positions"] = str(joint["positions"].iloc[0])
    cells["metric"] = metric
    result = AdditivityResult(cells, gap_summary(cells, group), pair_summary(cells, group),
                              methods_sentences(cells, dv, metric), [])
    result.findings = findings_sentences(result.gaps, group, alpha)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("cells", "gaps", "pairs"):
        result.files.append(atomic_write_frame(out / TABLE_FILES[name], getattr(result, name)))
    if figures:
        from analyses.figures import save_figure

        paths = save_figure(joint_vs_sum_figure(cells, dv), out / "figures" / "additivity_joint_vs_sum", dpi=dpi)
        result.figures.append(("additivity_joint_vs_sum", "Joint patch vs the sum of single-layer effects",
                               "Each point one probe and one set of layers patched together; dashed: perfect "
                               "additivity (below: the layers overlap, above: they need each other).", paths))
        result.files += paths
    return result
