"""Figures of the localization profiles (:mod:`analyses.localization`): every probe's profile, and each measure by
group with its interval.

The profile map shows what the measures summarise, so a reader can check them by eye: one row per probe, its
signed share of the total |contribution| per layer (the diverging map of :mod:`analyses.figures`, white = 0),
rows grouped by the group label and ordered within a group by centre of mass (a black dot on each row), so a
localized group shows as a narrow diagonal band and a distributed one as a wide smear. The measure plot puts each
probe's value (dots) beside its group's mean and 95 % t interval, per site kind, one panel per measure.

Drawn in the house style of :mod:`analyses.figures` (the report's column width, fonts of at least 9 pt, no
pyplot state) and saved by :func:`analyses.figures.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses.figures import (
    COLUMN_WIDTH_IN,
    DIVERGING_CMAP,
    LINE_PALETTE,
    MARKERS,
    STYLE,
    house_style,
    new_figure,
    save_figure,
    wrap_title,
)
from analyses.formatting import selection_words, slug
from analyses.localization import MEASURE_WORDS, MEASURES
from analyses.select import slice_mask
from clap.contract import SITE_KINDS

#: the outer slice a figure covers (its panels are the site kinds)
OUTER = ("metric", "operation", "direction", "positions")


def profile_map(contrib: pd.DataFrame, measures: pd.DataFrame, group: str | None = None, *,
                subject: str = "probe_id", title: str | None = None) -> Figure:
    """Every subject's profile in one slice and its site kinds: a heatmap per site kind (stacked), rows = subjects
    grouped by ``group`` and ordered by centre of mass, columns = layers, colour = signed share of the subject's
    total |contribution|; a dot marks each row's centre of mass.

    ``contrib`` is :func:`analyses.localization.contributions` output (several site kinds allowed), ``measures``
    the matching :func:`analyses.localization.localization_measures` table."""
    import seaborn as sns

    kinds = _kinds(contrib)
    sizes = [contrib.loc[contrib["site_kind"] == k, subject].nunique() for k in kinds]
    row_h = 0.16 if max(sizes) <= 16 else 0.075
    fig, axes = new_figure(0.7 + sum(0.75 + row_h * n for n in sizes), nrows=len(kinds))
    vmax = float(np.nanmax(np.abs(contrib["share"].to_numpy(float)))) if len(contrib) else 1.0
    vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    with house_style():
        mesh = None
        for ax, kind in zip(axes, kinds, strict=True):
            part = contrib[contrib["site_kind"] == kind]
            m = measures[measures["site_kind"] == kind].set_index(subject)
            order = _row_order(m, group)
            wide = part.pivot(index=subject, columns="layer", values="share").reindex(order)
            sns.heatmap(wide, ax=ax, cmap=DIVERGING_CMAP, center=0.0, vmin=-vmax, vmax=vmax, cbar=False,
                        yticklabels=False, xticklabels=True)
            layers = np.asarray(wide.columns, float)
            com = m["centre_of_mass"].reindex(order).to_numpy(float) * float(part["n_layers"].iloc[0])
            ok = np.isfinite(com)
            ax.scatter(np.interp(com[ok], layers, np.arange(len(layers))) + 0.5, np.arange(len(order))[ok] + 0.5,
                       s=6, color="black", zorder=3, label="centre of mass")
            _group_bands(ax, m.reindex(order), group)
            ax.set_title(f"{kind}: increments of the residual stream" if "increments" in part["basis"].iloc[0]
                         else kind, loc="left")
            ax.set_xlabel("layer")
            ax.tick_params(axis="x", rotation=0)
            _heatmap_layer_ticks(ax, layers)
            mesh = ax.collections[0]
        fig.colorbar(mesh, ax=axes, label="signed share of sum |c|", shrink=min(1.0, 3.0 / max(len(axes), 1) + 0.3))
        fig.suptitle(wrap_title(title or "Localization profiles: each probe's per-layer contributions"),
                     fontsize=STYLE["figure.titlesize"])
    return fig


def _kinds(frame: pd.DataFrame) -> list[str]:
    """Site kinds in network order."""
    return sorted(frame["site_kind"].unique(), key=lambda k: (SITE_KINDS.index(k) if k in SITE_KINDS else 99, k))


def _row_order(measures: pd.DataFrame, group: str | None) -> list[Any]:
    """Subjects by group (sorted), then centre of mass (flat-zero profiles last), then id."""
    keys = measures.assign(_com=measures["centre_of_mass"].fillna(np.inf), _id=measures.index.astype(str))
    by = ([group] if group else []) + ["_com", "_id"]
    return keys.sort_values(by, kind="stable").index.tolist()


def _group_bands(ax: Any, ordered: pd.DataFrame, group: str | None) -> None:
    """Group names on the y axis at each group's middle, with a line between groups."""
    if not group:
        ax.set_ylabel(f"probes ({len(ordered)})")
        return
    labels = ordered[group].astype(str).to_numpy()
    ticks, names = [], []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            ticks.append((start + i) / 2)
            names.append(f"{labels[start]}\n(n = {i - start})")
            if i < len(labels):
                ax.axhline(i, color="black", linewidth=1.2)
            start = i
    ax.set_yticks(ticks)
    ax.set_yticklabels(names, rotation=0)
    ax.set_ylabel("")


def _heatmap_layer_ticks(ax: Any, layers: np.ndarray, max_ticks: int = 12) -> None:
    """Layer labels on a heatmap's categorical axis (cells at 0.5, 1.5, ...), thinned to ``max_ticks``."""
    step = int(np.ceil(len(layers) / max_ticks)) or 1
    idx = np.arange(0, len(layers), step)
    ax.set_xticks(idx + 0.5)
    ax.set_xticklabels([str(int(v)) for v in layers[idx]])


def measures_by_group(measures: pd.DataFrame, groups_table: pd.DataFrame, group: str | None = None, *,
                      measure_names: Sequence[str] = MEASURES, title: str | None = None) -> Figure:
    """Each measure by site kind and group: every subject's value (dots) and the group's mean with its 95 % t
    interval (error bar), one panel per measure (two columns at the report's width).

    ``measures`` is the per-subject table (:func:`analyses.localization.localization_measures`), ``groups_table`` the
    matching :func:`analyses.localization.summarize_localization` output."""
    import seaborn as sns

    kinds = _kinds(measures)
    groups = sorted(measures[group].dropna().unique(), key=str) if group else [None]
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    n_rows = int(np.ceil(len(measure_names) / 2))
    with house_style():
        fig = Figure(figsize=(COLUMN_WIDTH_IN, 0.9 + 1.75 * n_rows), layout="constrained")
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        axes = fig.subplots(n_rows, 2, squeeze=False).ravel().tolist()
        width = 0.7 / len(groups)
        for ax, name in zip(axes, measure_names, strict=False):
            for i, g in enumerate(groups):
                offset = (i - (len(groups) - 1) / 2) * width
                mine = measures if g is None else measures[measures[group] == g]
                summary = groups_table[groups_table["measure"] == name]
                if g is not None:
                    summary = summary[summary[group] == g]
                for k, kind in enumerate(kinds):
                    y = mine.loc[mine["site_kind"] == kind, name].to_numpy(float)
                    y = y[np.isfinite(y)]
                    jitter = np.linspace(-width * 0.3, width * 0.3, len(y)) if len(y) > 1 else np.zeros(len(y))
                    ax.scatter(k + offset + jitter, y, s=7, color=colours[i], alpha=0.35, linewidths=0)
                    row = summary[summary["site_kind"] == kind]
                    if len(row):
                        r = row.iloc[0]
                        err = np.array([[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]], float)
                        ax.errorbar(k + offset, r["mean"], yerr=np.where(np.isfinite(err), err, 0.0),
                                    color=colours[i], marker=MARKERS[i % len(MARKERS)], markersize=4, capsize=2.5,
                                    linewidth=1.4, label=str(g) if (g is not None and k == 0) else None)
            ax.set_xticks(range(len(kinds)))
            ax.set_xticklabels(kinds)
            ax.set_xlim(-0.6, len(kinds) - 0.4)
            ax.set_title(MEASURE_WORDS.get(name, name), loc="left")
            ax.grid(axis="y", alpha=0.3)
        for ax in axes[len(measure_names):]:
            ax.set_visible(False)
        if group:
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, title=group, frameon=False, ncols=min(len(groups), 4),
                       loc="outside lower center")
        fig.suptitle(wrap_title(title or "Localization measures: each probe (dots), group mean with 95 % t interval"),
                     fontsize=STYLE["figure.titlesize"])
    return fig


def localization_figures(tables: dict[str, pd.DataFrame], fig_dir: str | Path, *, group: str | None = None,
                         subject: str = "probe_id", dpi: int = 200) -> list[tuple[str, str, str, dict[str, Any],
                                                                                    list[Path]]]:
    """Draw and save both figures for every outer slice (metric, operation, direction, positions) of the
    localization tables; returns ``(name, title, caption, unit, paths)`` per figure (names start with
    ``localization_``, so the report can place them in their own section)."""
    contrib, measures, summary = (tables.get(k, pd.DataFrame()) for k in
                                  ("localization_contributions", "localization", "localization_groups"))
    if not len(measures):
        return []
    outer = [c for c in OUTER if c in measures.columns]
    made = []
    for key, block in measures.groupby(outer, sort=True, dropna=False):
        sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
        words, tag = selection_words(sel), slug(sel)
        cpart = contrib[slice_mask(contrib, sel)]
        fig = profile_map(cpart, block, group, subject=subject,
                          title=f"Localization profiles ({words})")
        title = f"Localization profiles ({words})"
        caption = ("One row per probe: its per-layer contribution as a signed share of its total |contribution| "
                   "(red adds to recovery, blue takes away), rows grouped"
                   + (f" by {group}" if group else "") + " and ordered by centre of mass (black dot). Residual-"
                   "stream panels show layer-to-layer increments, not the cumulative stream.")
        made.append((f"localization_profiles_{tag}", title, caption, dict(sel),
                     save_figure(fig, Path(fig_dir) / f"localization_profiles_{tag}", dpi=dpi)))
        spart = summary[slice_mask(summary, sel)]
        fig = measures_by_group(block, spart, group, title=f"Localization measures ({words})")
        caption = ("Each probe's value (dots) and the mean with its 95 % t interval per site kind"
                   + (f" and {group}" if group else "") + "; fewer effective layers, a larger peak share and a "
                   "narrower window mean more localized; centre of mass and peak in relative depth "
                   "(layer / n_layers).")
        made.append((f"localization_measures_{tag}", f"Localization measures ({words})", caption, dict(sel),
                     save_figure(fig, Path(fig_dir) / f"localization_measures_{tag}", dpi=dpi)))
    return made

