"""``clap analyze``: every test, table and figure for a results directory, written to one folder.

The study may hold several slices (metrics, site kinds, operations, directions, position selections). Each slice
with at least two layers is tested on its own (see :func:`analyses.select.analysis_units`); a test that cannot run
on a slice (a single probe, too few per group) is recorded in ``skipped.csv`` with its reason instead of stopping
the others. The tables of all slices are concatenated; their book-keeping columns say which slice a row belongs to.

Files written to the output folder:

``probe_counts.csv``   probes, rows, undefined and trivial rows per group (and ``all``)
``units.csv``          the slices tested
``rm_anova.csv``       :func:`analyses.stats.rm_anova` per slice
``friedman.csv``       :func:`analyses.stats.friedman` per slice
``mixed_anova.csv``    :func:`analyses.stats.mixed_anova` per slice (with a group column of 2+ groups)
``posthoc_layers.csv`` :func:`analyses.stats.pairwise_within` per slice
``posthoc_groups.csv`` :func:`analyses.stats.pairwise_between` per slice (with groups)
``bootstrap_ci.csv``   :func:`analyses.bootstrap.bootstrap_ci` per slice and group
``module_ci.csv``      bootstrap CI per site (trivial sites included), per metric
``trivial_sites.csv``  the sites flagged ``trivial`` and their mean recovery
``skipped.csv``        tests not run, with the reason
``caveats.md``         the automatic caveats, one per paragraph
``figures/*.png|svg``  the figures (PNG at 200 dpi and SVG)
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from analyses import caveats as _caveats
from analyses import figures as _figures
from analyses.bootstrap import CI_COLUMNS, bootstrap_ci
from analyses.io import load_results
from analyses.select import SELECT_COLUMNS, AnalysisWarning, analysis_units
from analyses.stats import (
    FRIEDMAN_COLUMNS,
    MIXED_COLUMNS,
    PAIRWISE_BETWEEN_COLUMNS,
    PAIRWISE_WITHIN_COLUMNS,
    RM_COLUMNS,
    friedman,
    mixed_anova,
    pairwise_between,
    pairwise_within,
    rm_anova,
)
from clap.errors import ClapError

TABLE_FILES = {
    "probe_counts": "probe_counts.csv",
    "units": "units.csv",
    "rm_anova": "rm_anova.csv",
    "friedman": "friedman.csv",
    "mixed_anova": "mixed_anova.csv",
    "posthoc_layers": "posthoc_layers.csv",
    "posthoc_groups": "posthoc_groups.csv",
    "bootstrap_ci": "bootstrap_ci.csv",
    "module_ci": "module_ci.csv",
    "trivial_sites": "trivial_sites.csv",
    "skipped": "skipped.csv",
}

#: Book-keeping columns every statistics table ends with (see :mod:`analyses.stats`).
BOOK_COLUMNS = ["dv", *SELECT_COLUMNS, "n_subjects", "n_levels", "n_dropped", "n_undefined"]

#: Beyond this many sites a per-module bar plot is unreadable; the heatmaps cover layer sweeps.
MAX_BAR_SITES = 80


@dataclass
class FigureFile:
    """One saved figure: what it shows and where its files are."""

    name: str
    title: str
    caption: str
    unit: dict[str, Any]
    paths: list[Path]

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")


@dataclass
class Analysis:
    """Everything ``clap analyze`` computed; :mod:`analyses.report` renders it."""

    results_dir: Path
    out_dir: Path
    data: pd.DataFrame
    meta: dict[str, Any]
    options: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    caveats: list[str]
    figures: list[FigureFile] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def analyze(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    dv: str = "recovery",
    group: str | None = None,
    metrics: Sequence[str] | None = None,
    site_kinds: Sequence[str] | None = None,
    agg: str = "mean",
    missing: str = "drop_subjects",
    n_boot: int = 2000,
    seed: int | None = None,
    alpha: float = 0.05,
    figures: bool = True,
    dpi: int = 200,
) -> Analysis:
    """Load ``results_dir``, run every test on every slice, write tables, caveats and figures to ``out_dir``.

    ``out_dir`` defaults to ``RESULTS_DIR/analysis``. ``group`` defaults to the first of the sidecar's
    ``group_columns`` (no group tests when there is none). ``seed`` defaults to the run's seed, so the bootstrap
    intervals of a study are reproducible from its sidecar. ``metrics`` / ``site_kinds`` restrict the slices.
    """
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "analysis"
    data, meta = load_results(results_dir)
    group = _resolve_group(group, meta, data)
    seed = int(meta.get("seed", 0) if seed is None else seed)
    data = _restrict(data, "metric", metrics)
    options = dict(dv=dv, group=group, metrics=list(metrics or []), site_kinds=list(site_kinds or []), agg=agg,
                   missing=missing, n_boot=n_boot, seed=seed, alpha=alpha)
    tables = compute_tables(data, dv=dv, group=group, site_kinds=site_kinds, agg=agg, missing=missing, n_boot=n_boot, seed=seed)
    notes = _caveats.collect(data, tables, group, alpha)
    result = Analysis(results_dir, out, data, meta, options, tables, notes)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        path = out / TABLE_FILES[name]
        table.to_csv(path, index=False)
        result.files.append(path)
    caveat_path = out / "caveats.md"
    caveat_path.write_text("".join(f"- {c}\n\n" for c in notes) or "No caveats.\n", encoding="utf-8")
    result.files.append(caveat_path)
    if figures:
        result.figures = make_figures(data, tables, out / "figures", dv=dv, group=group, site_kinds=site_kinds, dpi=dpi)
        result.files.extend(p for f in result.figures for p in f.paths)
    return result


def compute_tables(
    data: pd.DataFrame,
    *,
    dv: str = "recovery",
    group: str | None = None,
    site_kinds: Sequence[str] | None = None,
    agg: str = "mean",
    missing: str = "drop_subjects",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """All statistics tables (the keys of :data:`TABLE_FILES`), without writing anything."""
    units = analysis_units(data)
    if site_kinds:
        unknown = sorted(set(site_kinds) - set(units["site_kind"]))
        if unknown:
            raise ClapError(
                f"no testable slice with site_kind {', '.join(unknown)}; site kinds with 2+ layers in the results: "
                f"{', '.join(sorted(set(units['site_kind']))) or 'none'}"
            )
        units = units[units["site_kind"].isin(list(site_kinds))].reset_index(drop=True)
    n_groups = data[group].nunique() if group else 0
    collected: dict[str, list[pd.DataFrame]] = {k: [] for k in ("rm_anova", "friedman", "mixed_anova", "posthoc_layers", "posthoc_groups", "bootstrap_ci")}
    skipped: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)  # counts are in the tables and the caveats
        for unit in units.to_dict("records"):
            sel = {c: unit[c] for c in SELECT_COLUMNS if c in unit}
            common = dict(dv=dv, agg=agg, **sel)
            runs: list[tuple[str, Callable[[], pd.DataFrame]]] = [
                ("rm_anova", lambda: rm_anova(data, missing=missing, **common)),
                ("friedman", lambda: friedman(data, missing=missing, **common)),
                ("posthoc_layers", lambda: pairwise_within(data, missing=missing, **common)),
            ]
            if group and n_groups >= 2:
                runs += [
                    ("mixed_anova", lambda: mixed_anova(data, between=group, missing=missing, **common)),
                    ("posthoc_groups", lambda: pairwise_between(data, between=group, missing=missing, **common)),
                ]
            runs.append(("bootstrap_ci", lambda: bootstrap_ci(data, between=group, n_boot=n_boot, seed=seed, **common)))
            for name, run in runs:
                try:
                    collected[name].append(run())
                except ClapError as exc:
                    skipped.append({**sel, "test": name, "reason": str(exc)})
    columns = {
        "rm_anova": RM_COLUMNS,
        "friedman": FRIEDMAN_COLUMNS,
        "mixed_anova": MIXED_COLUMNS,
        "posthoc_layers": PAIRWISE_WITHIN_COLUMNS,
        "posthoc_groups": PAIRWISE_BETWEEN_COLUMNS,
        "bootstrap_ci": ["layer", *([group] if group else []), *CI_COLUMNS],
    }
    # A table no slice could fill is still written with its header, so readers of the CSV need no special case.
    tables = {name: _concat(frames, columns[name] + BOOK_COLUMNS) for name, frames in collected.items()}
    tables["units"] = units
    tables["skipped"] = pd.DataFrame(skipped, columns=[*SELECT_COLUMNS, "test", "reason"])
    tables["probe_counts"] = probe_counts(data, group)
    tables["trivial_sites"] = trivial_sites(data)
    tables["module_ci"] = module_ci(data, dv=dv, group=group, n_boot=n_boot, seed=seed)
    return {name: tables[name] for name in TABLE_FILES}


def probe_counts(data: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """Per group and overall (``all``): ``n_probes``, ``n_rows``, ``n_undefined`` (rows with undefined recovery),
    ``n_probes_undefined`` (probes with any), ``n_trivial`` (rows flagged trivial)."""
    def count(part: pd.DataFrame, label: str) -> dict[str, Any]:
        undefined = part[~part["recovery_defined"].astype(bool)]
        return {
            "group": label,
            "n_probes": part["probe_id"].nunique(),
            "n_rows": len(part),
            "n_undefined": len(undefined),
            "n_probes_undefined": undefined["probe_id"].nunique(),
            "n_trivial": int(part["trivial"].astype(bool).sum()),
        }

    rows = []
    if group:
        for g, part in data.groupby(group, observed=True, sort=True):
            rows.append(count(part, str(g)))
    rows.append(count(data, "all"))
    out = pd.DataFrame(rows)
    return out.rename(columns={"group": group or "group"})


def trivial_sites(data: pd.DataFrame) -> pd.DataFrame:
    """Sites flagged ``trivial``: ``site``, ``site_kind``, ``metric``, ``n_rows``, ``mean_recovery``."""
    triv = data[data["trivial"].astype(bool)]
    if triv.empty:
        return pd.DataFrame(columns=["site", "site_kind", "metric", "n_rows", "mean_recovery"])
    return (
        triv.groupby(["site", "site_kind", "metric"], observed=True)
        .agg(n_rows=("recovery", "size"), mean_recovery=("recovery", "mean"))
        .reset_index()
    )


def module_ci(data: pd.DataFrame, *, dv: str = "recovery", group: str | None = None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Bootstrap CI of mean ``dv`` per site (trivial and out-of-stack sites included), per metric slice, in network
    order, with a ``trivial`` column; the data of the per-module bar plot."""
    frames = []
    cols = [c for c in ("metric", "operation", "direction", "positions") if c in data.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, part in data.groupby(cols, observed=True, sort=True):
            if part["site"].nunique() > MAX_BAR_SITES:
                continue
            sel = dict(zip(cols, key if isinstance(key, tuple) else (key,)))
            try:
                table = bootstrap_ci(part, dv, within="site", between=group, n_boot=n_boot, seed=seed,
                                     include_trivial=True, vary=("site_kind",), **sel)
            except ClapError:
                continue
            order = _figures.site_order(part)
            table["site"] = pd.Categorical(table["site"], order, ordered=True)
            table = table.sort_values(["site"] + ([group] if group else [])).reset_index(drop=True)
            table["site"] = table["site"].astype(str)
            triv = set(part.loc[part["trivial"].astype(bool), "site"])
            table.insert(1, "trivial", table["site"].isin(triv))
            frames.append(table)
    return _concat(frames, ["site", "trivial", *([group] if group else []), *CI_COLUMNS, *BOOK_COLUMNS])


def make_figures(
    data: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    fig_dir: Path,
    *,
    dv: str = "recovery",
    group: str | None = None,
    site_kinds: Sequence[str] | None = None,
    dpi: int = 200,
) -> list[FigureFile]:
    """Draw and save the figures of :mod:`analyses.figures` for every slice; returns what was written."""
    made: list[FigureFile] = []

    def save(fig: Any, name: str, title: str, caption: str, unit: dict[str, Any]) -> None:
        paths = _figures.save_figure(fig, fig_dir / name, dpi=dpi)
        made.append(FigureFile(name, title, caption, unit, paths))

    units = tables["units"]
    if units.empty and tables["module_ci"].empty:
        return made
    outer = [c for c in ("metric", "operation", "direction", "positions") if c in units.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, block in (units.groupby(outer, sort=True) if len(units) else []):
            outer_sel = dict(zip(outer, key if isinstance(key, tuple) else (key,)))
            tag = _slug(outer_sel)
            kinds = block["site_kind"].tolist()
            if len(kinds) >= 2:
                fig = _figures.heatmap_layer_site_kind(data, dv, group, **outer_sel)
                save(fig, f"layer_site_kind_{tag}", f"Mean {dv} by layer and site kind ({_label(outer_sel)})",
                     "Mean over probes of each probe's mean over positions; colour centred on 0 (no recovery).", outer_sel)
            for kind in kinds:
                sel = {**outer_sel, "site_kind": kind}
                ktag = _slug(sel)
                ci = tables["bootstrap_ci"]
                ci = ci[_match(ci, sel)] if len(ci) else ci
                if len(ci):
                    fig = _figures.line_by_layer(ci, group, dv=dv, title=f"{dv} by layer ({_label(sel)})")
                    save(fig, f"line_{ktag}", f"{dv} by layer ({_label(sel)})",
                         f"Mean over probes with {int(ci['ci'].iloc[0] * 100)} % percentile-bootstrap bands "
                         f"({int(ci['n_boot'].iloc[0])} resamples of probes); one line per {group or 'study'}.", sel)
                rows = data[_match(data, sel)]
                if kind == "head" and "head" in rows.columns and rows["head"].nunique() >= 2:
                    fig = _figures.heatmap_layer_head(data, dv, group, **sel)
                    save(fig, f"layer_head_{ktag}", f"Mean {dv} by layer and head ({_label(sel)})",
                         "Mean over probes of each probe's mean over positions, per attention head "
                         "(the head's output before the output projection).", sel)
                # a position axis needs several positions within a probe ("last" differs between probes only)
                per_probe_positions = rows.groupby("probe_id")["position"].nunique() if len(rows) else None
                if per_probe_positions is not None and per_probe_positions.max() >= 2:
                    fig = _figures.heatmap_layer_position(data, dv, group, **sel)
                    save(fig, f"layer_position_{ktag}", f"Mean {dv} by layer and position ({_label(sel)})",
                         "Mean over probes at each token position (label: most common token, * where probes differ; "
                         "[index] in the unpadded prompt).", sel)
    mod = tables["module_ci"]
    if len(mod):
        cols = [c for c in ("metric", "operation", "direction", "positions") if c in mod.columns]
        for key, block in mod.groupby(cols, sort=True, dropna=False):
            sel = dict(zip(cols, key if isinstance(key, tuple) else (key,)))
            if block["site"].nunique() < 2:
                continue
            triv = block.loc[block["trivial"], "site"].unique().tolist()
            fig = _figures.bar_by_module(block, group, dv=dv, trivial_sites=triv, title=f"{dv} per module ({_label(sel)})")
            save(fig, f"modules_{_slug(sel)}", f"{dv} per module ({_label(sel)})",
                 "Mean over probes with percentile-bootstrap 95 % intervals; hatched bars reproduce the source run by construction (recovery 1 when denoising, 0 when noising).", sel)
    return made


def _resolve_group(group: str | None, meta: dict[str, Any], data: pd.DataFrame) -> str | None:
    if group is None:
        names = meta.get("group_columns") or []
        return names[0] if names else None
    if group not in data.columns:
        raise ClapError(f"group column {group!r} not in the results; group columns in run.json: {', '.join(meta.get('group_columns') or []) or 'none'}")
    return group


def _restrict(data: pd.DataFrame, column: str, values: Sequence[str] | None) -> pd.DataFrame:
    if not values:
        return data
    present = set(data[column])
    unknown = [v for v in values if v not in present]
    if unknown:
        raise ClapError(f"no rows with {column} {', '.join(unknown)}; the results hold {', '.join(sorted(map(str, present)))}")
    return data[data[column].isin(list(values))]


def _match(frame: pd.DataFrame, sel: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for k, v in sel.items():
        if k in frame.columns:
            mask &= frame[k] == v
    return mask


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def _slug(sel: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(v) for v in sel.values())).strip("-")


def _label(sel: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items())
