"""Which figures an analysis draws, and where they go: the per-slice figures of :mod:`analyses.figures`, the study's
own figures (the group contrast per layer, the per-module bars) and the localization profiles'
(:mod:`analyses.localization_figures`), each saved as PNG and SVG with its title and caption (:class:`FigureFile`).

:func:`draw_figures` draws them all for :func:`analyses.pipeline.analyze`; a figure that cannot be drawn for a slice
(e.g. every value undefined) is left out and returned as a ``skipped`` entry with its reason, so one bad slice never
costs the others their figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analyses import figures as _figures
from analyses.formatting import selection_words, slug
from analyses.localization_figures import localization_figures
from analyses.select import SELECT_COLUMNS, AnalysisWarning, slice_mask
from clap.errors import ClapError

#: the columns whose values make one figure's slice (its panels are the site kinds, groups, heads or positions)
OUTER = ("metric", "operation", "direction", "positions")


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


def make_figures(
    data: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    fig_dir: Path,
    *,
    dv: str = "recovery",
    group: str | None = None,
    site_kinds: Sequence[str] | None = None,
    dpi: int = 200,
    skipped: list[dict[str, Any]] | None = None,
) -> list[FigureFile]:
    """Draw and save the figures of :mod:`analyses.figures` for every slice; returns what was written.

    A figure that cannot be drawn for a slice (e.g. every value undefined) is left out and, when ``skipped`` is
    given, recorded there (``test`` = ``figure:<function>``) with its reason; the other figures are still drawn."""
    sink = FigureSink(fig_dir, dpi, skipped)
    units = tables["units"]
    if units.empty and tables["module_ci"].empty:
        return sink.made
    outer = [c for c in OUTER if c in units.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, block in (units.groupby(outer, sort=True) if len(units) else []):
            outer_sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
            kinds = block["site_kind"].tolist()
            if len(kinds) >= 2:
                fig = sink.draw(_figures.heatmap_layer_site_kind, data, dv, group, **outer_sel)
                sink.save(fig, f"layer_site_kind_{slug(outer_sel)}",
                          f"Mean {dv} by layer and site kind ({selection_words(outer_sel)})",
                          "Mean over probes of each probe's mean over positions; colour centred on 0 (no recovery).",
                          outer_sel)
            for kind in kinds:
                _site_kind_figures(sink, data, tables["bootstrap_ci"], {**outer_sel, "site_kind": kind}, dv, group)
    _module_figures(sink, tables["module_ci"], dv, group)
    return sink.made


@dataclass
class FigureSink:
    """Draws and saves figures, keeping one list of what was written and what was not.

    A figure that cannot be drawn for a slice is recorded in ``skipped`` (when given) instead of failing the run;
    a figure whose name is in ``keep`` is not saved again (the caller already holds it).
    """

    fig_dir: Path
    dpi: int
    skipped: list[dict[str, Any]] | None
    made: list[FigureFile] = field(default_factory=list)
    keep: set[str] = field(default_factory=set)

    def draw(self, func: Callable[..., Any], *args: Any, unit: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)``, or ``None`` (and a ``skipped`` entry) if it raises a :class:`ClapError`."""
        try:
            return func(*args, **kwargs)
        except ClapError as exc:
            where = unit if unit is not None else kwargs
            if self.skipped is not None:
                self.skipped.append({**{c: where[c] for c in SELECT_COLUMNS if c in where},
                                     "test": f"figure:{func.__name__}", "reason": str(exc)})
            return None

    def save(self, fig: Any, name: str, title: str, caption: str, unit: dict[str, Any]) -> None:
        """Save a drawn figure under ``name`` and list it (nothing for a figure that could not be drawn)."""
        if fig is None or name in self.keep:
            return
        paths = _figures.save_figure(fig, self.fig_dir / name, dpi=self.dpi)
        self.made.append(FigureFile(name, title, caption, unit, paths))


def _site_kind_figures(sink: FigureSink, data: pd.DataFrame, bootstrap: pd.DataFrame, sel: dict[str, Any], dv: str,
                       group: str | None) -> None:
    """The figures of one site kind in one slice: line by layer, and layer x head or x position where they vary."""
    ktag = slug(sel)
    ci = bootstrap[slice_mask(bootstrap, sel)] if len(bootstrap) else bootstrap
    if len(ci):
        title = f"{dv} by layer ({selection_words(sel)})"
        fig = sink.draw(_figures.line_by_layer, ci, group, dv=dv, unit=sel, title=title)
        sink.save(fig, f"line_{ktag}", title,
                  f"Mean over probes ({ci['reduction'].iloc[0]}) with {int(ci['ci'].iloc[0] * 100)} % "
                  f"{interval_words(ci)} bands; one line per {group or 'study'}.", sel)
    rows = data[slice_mask(data, sel)]
    if sel["site_kind"] == "head" and "head" in rows.columns and rows["head"].nunique() >= 2:
        fig = sink.draw(_figures.heatmap_layer_head, data, dv, group, **sel)
        sink.save(fig, f"layer_head_{ktag}", f"Mean {dv} by layer and head ({selection_words(sel)})",
                  "Mean over probes of each probe's mean over positions, per attention head "
                  "(the head's output before the output projection).", sel)
    # a position axis needs several positions within a probe ("last" differs between probes only)
    per_probe_positions = rows.groupby("probe_id")["position"].nunique() if len(rows) else None
    if per_probe_positions is not None and per_probe_positions.max() >= 2:
        fig = sink.draw(_figures.heatmap_layer_position, data, dv, group, **sel)
        sink.save(fig, f"layer_position_{ktag}", f"Mean {dv} by layer and position ({selection_words(sel)})",
                  "Mean over probes at each token position (label: most common token, * where probes differ; "
                  "[index] in the unpadded prompt).", sel)


def _module_figures(sink: FigureSink, mod: pd.DataFrame, dv: str, group: str | None) -> None:
    """One bar chart per metric slice of the per-module intervals (slices with at least two modules)."""
    if not len(mod):
        return
    cols = [c for c in OUTER if c in mod.columns]
    for key, block in mod.groupby(cols, sort=True, dropna=False):
        sel = dict(zip(cols, key if isinstance(key, tuple) else (key,), strict=True))
        if block["site"].nunique() < 2:
            continue
        triv = block.loc[block["trivial"], "site"].unique().tolist()
        fig = sink.draw(_figures.bar_by_module, block, group, dv=dv, trivial_sites=triv, unit=sel,
                        title=f"{dv} per module ({selection_words(sel)})")
        sink.save(fig, f"modules_{slug(sel)}", f"{dv} per module ({selection_words(sel)})",
                  f"Mean over probes with 95 % {interval_words(block)} intervals; hatched bars reproduce the source "
                  "run by construction (recovery 1 when denoising, 0 when noising).", sel)


def interval_words(ci: pd.DataFrame) -> str:
    """How an interval table's intervals were made, in a caption's words."""
    method = str(ci["method"].iloc[0]) if len(ci) else "t"
    if method == "t":
        return "t-interval"
    return f"{'BCa' if method == 'bca' else 'percentile'}-bootstrap ({int(ci['n_boot'].iloc[0])} resamples of probes)"


def study_figures(data: pd.DataFrame, tables: Mapping[str, pd.DataFrame], options: Mapping[str, Any], fig_dir: Path,
                  *, dpi: int = 200, keep: set[str] | None = None) -> list[FigureFile]:
    """The figures that answer the study's question, per metric / operation / direction / positions: the group
    contrast per layer (two or more groups, t-based CIs, ``*`` where the Holm-corrected Welch test differs) and
    the module view (attention and MLP outputs per layer). ``options`` are the analysis's resolved options
    (:attr:`analyses.pipeline.Analysis.options`); figures named in ``keep`` are not drawn again."""
    o = options
    group, dv = o.get("group"), o.get("dv", "recovery")
    sink = FigureSink(fig_dir, dpi, None, keep=set(keep or ()))
    units = tables["units"]
    outer = [c for c in OUTER if c in units.columns]
    kinds_wanted = set(o.get("site_kinds") or [])
    a = o.get("analysis") or {}
    head_rule = "sum" if a.get("head_reduction", "sum") == "each" else a.get("head_reduction", "sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, block in (units.groupby(outer, sort=True) if len(units) else []):
            sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
            kinds = [k for k in block["site_kind"] if not kinds_wanted or k in kinds_wanted]
            if not kinds:
                continue
            means = _figures.layer_means(data, dv, group, site_kinds=kinds,
                                         position_reduction=a.get("position_reduction", "last"),
                                         head_reduction=head_rule, subject_field=a.get("subject_field", "subject"),
                                         **sel)
            if group and means[group].nunique() >= 2:
                post = tables["posthoc_groups"]
                differ = post[slice_mask(post, sel) & (post["p_corr"] < o.get("alpha", 0.05))] if len(post) else None
                if differ is not None:
                    differ = differ.rename(columns={"level": "layer"})
                sink.save(_figures.layer_contrast(means, group, dv=dv, differ=differ), f"contrast_{slug(sel)}",
                          f"{dv} per layer by {group} ({selection_words(sel)})",
                          f"Mean over probes (each probe reduced first: {o.get('agg')}) with 95 % t-based intervals, "
                          f"one panel per site kind; * marks layers where the {group} groups differ "
                          "(Welch t, Holm-corrected).", sel)
            modules = means[means["site_kind"].isin(["attn_out", "mlp_out"])]
            if len(modules):
                sink.save(_figures.module_bars(modules, group, dv=dv), f"module_bars_{slug(sel)}",
                          f"{dv} per module and layer ({selection_words(sel)})",
                          "Attention and MLP outputs patched layer by layer: mean over probes with 95 % t-based "
                          "intervals.", sel)
    return sink.made


def draw_figures(data: pd.DataFrame, tables: Mapping[str, pd.DataFrame], options: Mapping[str, Any], fig_dir: Path,
                 *, dpi: int = 200) -> tuple[list[FigureFile], list[dict[str, Any]]]:
    """Every figure of an analysis (:func:`make_figures`, :func:`study_figures`, the localization profiles'), and
    the ``skipped`` entries (``test`` = ``figure:<what>``, ``reason``) of those that could not be drawn."""
    skipped: list[dict[str, Any]] = []
    group, dv = options.get("group"), options.get("dv", "recovery")
    made = make_figures(data, dict(tables), fig_dir, dv=dv, group=group, site_kinds=options.get("site_kinds") or None,
                        dpi=dpi, skipped=skipped)
    try:
        made += study_figures(data, tables, options, fig_dir, dpi=dpi, keep={f.name for f in made})
    except ClapError as exc:
        skipped.append({"test": "figure:study_figures", "reason": str(exc)})
    unit = "clean_prompt" if (options.get("analysis") or {}).get("subject") == "clean_prompt" else "probe_id"
    try:
        made += [FigureFile(*f) for f in localization_figures(dict(tables), fig_dir, group=group, subject=unit,
                                                               dpi=dpi)]
    except ClapError as exc:
        skipped.append({"test": "figure:localization", "reason": str(exc)})
    return made, skipped
