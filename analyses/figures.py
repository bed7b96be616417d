"""Publication figures of patching results: where in the network, and at which tokens, the answer comes back.

Figures are built on :class:`matplotlib.figure.Figure` objects directly (no pyplot state, so nothing depends on
the interactive backend and nothing leaks between figures; the Agg canvas renders them), drawn with seaborn, and
saved as PNG (200 dpi or more) and SVG by :func:`save_figure`. Recovery maps use a colour-blind-safe diverging
palette (ColorBrewer RdBu) centred on 0, so "no recovery" is white whatever the range, and negative recovery
(patching pushed the answer further away) is visibly different from positive. Lines use seaborn's "colorblind"
palette plus distinct markers and dash patterns, so groups stay apart in greyscale too.

Figures are sized for the report's column: :data:`COLUMN_WIDTH_IN` inches wide, and the HTML report shows them at
exactly that width, so a font of 9 pt in the figure is 9 pt on the page (nothing is scaled down to fit). Panels of
several groups are stacked vertically for the same reason. Cells that were not measured are hatched grey, never
the white of "0".

Every function takes the tidy results and the selection keywords of :func:`analyses.select.select_rows`; values
are reduced per probe first (mean over the rows of one probe in one cell) and then averaged over probes, so a
probe with more rows does not weigh more.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analyses.select import select_rows
from clap.contract import SITE_KINDS, atomic_write

DIVERGING_CMAP = "RdBu_r"
LINE_PALETTE = "colorblind"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", "-.", ":")

#: Width of the report's figure column; figures are drawn at this width and shown at it (see the module docstring).
COLUMN_WIDTH_IN = 6.5
#: The smallest font used anywhere in a figure.
MIN_FONT_PT = 9.0
#: Face of cells that were not measured (hatched), distinct from every colour of the diverging map.
MISSING_FACE = "0.78"
MISSING_HATCH = "////"

STYLE = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 11,
    "hatch.color": "0.55",
    "svg.fonttype": "path",
}


@contextlib.contextmanager
def house_style() -> Iterator[None]:
    """The house style, and silence for seaborn's internal use of soon-deprecated matplotlib calls."""
    import matplotlib as mpl

    with mpl.rc_context(STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield


def new_figure(height: float, nrows: int = 1, *, sharex: bool = False,
                width: float = COLUMN_WIDTH_IN) -> tuple[Figure, list[Any]]:
    """A figure of the report's column width with ``nrows`` panels stacked vertically."""
    with house_style():
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, 1, squeeze=False, sharex=sharex)[:, 0].tolist()
    return fig, axes


def _title_chars(fig: Figure, fontsize: float | None = None) -> int:
    """How many characters of a title fit on one line of ``fig`` (an average character is ~0.6 em wide; a margin
    is kept), so a wrapped title never runs past the figure's right edge."""
    size = fontsize or float(STYLE["figure.titlesize"])
    return max(20, int(fig.get_figwidth() * 72 * 0.92 / (0.55 * size)))


def _legend_columns(groups: Sequence[Any], width: float = COLUMN_WIDTH_IN) -> int:
    """Legend columns that fit the figure's width: long group names get fewer columns, never a legend wider than
    the figure (a marker and gaps take ~4 em per entry)."""
    longest = max((len(str(g)) for g in groups), default=1)
    per_entry_in = (longest * 0.6 + 4.0) * MIN_FONT_PT / 72
    return max(1, min(len(groups), 4, int(width * 0.95 // per_entry_in)))


def wrap_title(title: str, width: int = 72) -> str:
    """Long titles on several lines: the figure keeps the column width, so a long line would be cut off."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def _per_probe(rows: pd.DataFrame, keys: Sequence[str], dv: str, subject: str) -> pd.DataFrame:
    """Mean per probe and cell, then the mean over probes: each probe counts once per cell."""
    per = rows.groupby([subject, *keys], observed=True)[dv].mean().reset_index()
    return per.groupby(list(keys), observed=True)[dv].agg(["mean", "count"]).reset_index()


def colour_limit(values: np.ndarray) -> float:
    """The half-range of a diverging colour scale centred on 0: the largest finite |value| (at least 1e-3)."""
    finite = np.abs(values[np.isfinite(values)])
    return float(max(finite.max(), 1e-3)) if finite.size else 1.0


def group_values(rows: pd.DataFrame, group: str | None) -> list[Any]:
    """The panels of a per-group figure: ``group``'s values in ``rows`` (sorted as text), or ``[None]`` without."""
    return sorted(rows[group].unique().tolist(), key=str) if group else [None]


def align_positions(rows: pd.DataFrame, align: str = "auto", subject: str = "probe_id") -> tuple[pd.Series, str]:
    """The position axis of a heatmap: token indices, aligned so that one row means one role across probes.

    ``align="start"`` keeps the engine's index (token index in the unpadded prompt); ``"end"`` counts from each
    probe's last patched position (-1 is the last token, where the answer is read), which lines prompts of
    different lengths up by their role; ``"auto"`` (default) takes ``"start"`` when every probe has the same
    positions, else ``"end"``. Returns the aligned positions and the alignment used.
    """
    pos = rows["position"].astype("Int64")
    if align == "auto":
        spans = rows.assign(_p=pos).groupby(subject)["_p"].agg(["min", "max", "nunique"])
        align = "start" if len(spans.drop_duplicates()) <= 1 else "end"
    if align == "end":
        last = rows.assign(_p=pos).groupby(subject)["_p"].transform("max")
        pos = pos - last - 1
    elif align != "start":
        raise ValueError(f"align must be 'auto', 'start' or 'end', got {align!r}")
    return pos, align


def position_labels(rows: pd.DataFrame, align: str = "start",
                    subject: str = "probe_id") -> tuple[pd.Series, dict[int, str]]:
    """The aligned position axis (see :func:`align_positions`) and a label per position: ``token [index]``.

    The label shows the most common token at that index among ``rows``, marked ``*`` when probes disagree; call it
    on one group's rows to label that group's panel with its own tokens.
    """
    pos, _ = align_positions(rows, align, subject)
    return pos, token_labels(rows, pos)


def token_labels(rows: pd.DataFrame, pos: pd.Series) -> dict[int, str]:
    """Each aligned position's label: its most common token, ``*`` where probes differ, and ``[position]``."""
    labels: dict[int, str] = {}
    tokens = rows["token"].astype(object).where(rows["token"].notna(), "")
    for p, toks in tokens.groupby(np.asarray(pos, dtype=float)):
        counts = toks.value_counts()
        tok = str(counts.index[0])
        shown = tok.strip() or repr(tok)
        labels[int(p)] = f"{shown}{'*' if len(counts) > 1 else ''} [{int(p)}]"
    return labels


def layer_heatmaps(
    rows: pd.DataFrame,
    index: str,
    groups: list[Any],
    group: str | None,
    dv: str,
    subject: str,
    *,
    ylabel: str,
    annotate: bool | None,
    ytick_label: Callable[[Any, Any], str] | None = None,
    row_order: Any = sorted,
    title: str,
) -> Figure:
    """One heatmap panel per group, stacked vertically: mean over probes (each probe's mean first) of ``dv`` per
    ``index`` (rows, in ``row_order``) and layer (columns), on one symmetric colour scale centred on 0 shared by all
    panels (one colour bar). Every panel has the same rows and columns; a cell a group did not measure is hatched
    grey. ``ytick_label(group, value)`` labels a group's rows (its own tokens). Where the number of probes differs
    between cells of a panel, rows carry their ``n`` and cells below their row's ``n`` are marked ``n=k``."""
    import seaborn as sns

    means, counts = {}, {}
    for g in groups:
        part = rows if g is None else rows[rows[group] == g]
        per = _per_probe(part, [index, "layer"], dv, subject)
        means[g] = per.pivot(index=index, columns="layer", values="mean")
        counts[g] = per.pivot(index=index, columns="layer", values="count")
    row_values = row_order(pd.Index(sorted(set().union(*(t.index for t in means.values())), key=_sort_key)))
    layers = sorted(set().union(*(t.columns for t in means.values())), key=_sort_key)
    for g in groups:
        means[g] = means[g].reindex(index=row_values, columns=layers)
        counts[g] = counts[g].reindex(index=row_values, columns=layers)
    vmax = colour_limit(np.concatenate([t.to_numpy(float).ravel() for t in means.values()]))
    n_rows, n_layers = len(row_values), len(layers)
    if annotate is None:
        annotate = n_layers <= 16 and n_rows <= 16
    row_h = 0.3 if n_rows <= 16 else 0.16
    fig, axes = new_figure(0.5 + len(groups) * (0.75 + row_h * n_rows), nrows=len(groups))
    with house_style():
        mesh = None
        for g, ax in zip(groups, axes, strict=True):
            t, n = means[g], counts[g]
            varies = n.stack().nunique() > 1
            row_n = n.max(axis=1)
            text = None
            if annotate or varies:
                text = np.full(t.shape, "", dtype=object)
                for i in range(n_rows):
                    for j in range(n_layers):
                        if pd.isna(t.iat[i, j]):
                            continue
                        value = f"{t.iat[i, j]:.2f}" if annotate else ""
                        marker = f"n={int(n.iat[i, j])}" if varies and n.iat[i, j] < row_n.iat[i] else ""
                        text[i, j] = "\n".join(x for x in (value, marker) if x)
            labels = [ytick_label(g, v) if ytick_label else str(v) for v in t.index]
            if varies:
                labels = [f"{lab} n={int(k)}" if pd.notna(k) else lab for lab, k in zip(labels, row_n, strict=True)]
            sns.heatmap(
                t, ax=ax, mask=t.isna(), cmap=DIVERGING_CMAP, center=0.0, vmin=-vmax, vmax=vmax,
                annot=text if text is not None else False, fmt="", annot_kws={"fontsize": MIN_FONT_PT},
                linewidths=0.3, linecolor="white", cbar=False, yticklabels=labels if n_rows <= 40 else "auto",
                xticklabels=[str(v) for v in t.columns],
            )
            _thin_layer_labels(ax, list(t.columns))
            ax.set_facecolor(MISSING_FACE)
            ax.patch.set_hatch(MISSING_HATCH)
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="y", rotation=0)
            ax.tick_params(axis="x", rotation=0)
            ax.set_title(f"{group} = {g}" if g is not None else "all probes", loc="left")
            mesh = ax.collections[0]
        shrink = min(1.0, 3.0 / (0.75 + row_h * n_rows * len(groups))) if len(groups) > 2 else 1.0
        fig.colorbar(mesh, ax=axes, label=f"mean {dv}", shrink=shrink)
        fig.suptitle(wrap_title(title, _title_chars(fig)), fontsize=STYLE["figure.titlesize"])
    return fig


def _thin_layer_labels(ax: Any, layers: list[Any], max_labels: int = 16) -> None:
    """On a heatmap's layer axis (one column per layer), keep the labels of :func:`layer_tick_values`' layers
    only: 30 two-digit labels at column width run together ("10111213...")."""
    keep = set(layer_tick_values([v for v in layers if isinstance(v, (int, float, np.integer, np.floating))],
                                 max_labels)) if len(layers) > max_labels else None
    if keep is None:
        return
    positions = [i + 0.5 for i, v in enumerate(layers) if float(v) in keep]
    ax.set_xticks(positions, [str(v) for v in layers if float(v) in keep])


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float, np.integer, np.floating)) else (1, 0.0, str(value))


def heatmap_layer_position(
    data: pd.DataFrame,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    *,
    align: str = "auto",
    annotate: bool | None = None,
    title: str | None = None,
    **select: Any,
) -> Figure:
    """Mean ``dv`` per layer (x) and token position (y), one panel per ``group`` value, stacked.

    The standard activation-patching picture: which token's activation, at which layer, carries the answer.
    Positions are aligned by role (:func:`align_positions`: from the end when prompts differ in length), and each
    group's rows are labelled with that group's own tokens. Rows whose ``position`` is NA (several positions
    patched together) are left out; raises :class:`~clap.errors.ClapError` if no per-position rows remain.
    Cells are annotated with their value when the grid is small (``annotate=None``) or on request.
    """
    from clap.errors import ClapError

    sel = select_rows(data, dv, **select)
    rows = sel.rows[sel.rows["position"].notna()]
    if rows.empty:
        raise ClapError(f"no per-position rows for {dv}{_where(sel.selection)}: a layer x position heatmap needs "
                        "single-position patches")
    pos, used = align_positions(rows, align, subject)
    rows = rows.assign(_pos=pos.to_numpy())
    groups = group_values(rows, group)
    labels = {g: token_labels(part, part["_pos"])
              for g, part in ((g, rows if g is None else rows[rows[group] == g]) for g in groups)}
    return layer_heatmaps(
        rows, "_pos", groups, group, dv, subject,
        ylabel="token [position from end]" if used == "end" else "token [position]", annotate=annotate,
        ytick_label=lambda g, p: labels[g].get(int(p), f"– [{int(p)}]"),
        title=title or f"Mean {dv} by layer and position{_where(sel.selection, ('site_kind', 'metric'))}",
    )


def heatmap_layer_head(
    data: pd.DataFrame,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    *,
    annotate: bool | None = None,
    title: str | None = None,
    **select: Any,
) -> Figure:
    """Mean ``dv`` per layer (x) and attention head (y), one panel per ``group`` value.

    The per-head follow-up of a layer sweep: which individual heads carry the recovered share (the seed study's
    proposed next check). Each probe's rows in a (layer, head) cell (e.g. several positions) are averaged first.
    Raises :class:`~clap.errors.ClapError` when the selection holds no head sites.
    """
    from clap.errors import ClapError

    sel = select_rows(data, dv, **{**select, "site_kind": select.get("site_kind") or "head"})
    rows = sel.rows[sel.rows["head"].notna()] if "head" in sel.rows.columns else sel.rows.iloc[0:0]
    if rows.empty:
        raise ClapError(f"no per-head rows for {dv}{_where(sel.selection)}: patch sites such as layers[*].heads[*]")
    rows = rows.assign(head=rows["head"].astype(int), layer=rows["layer"].astype(int))
    return layer_heatmaps(
        rows, "head", group_values(rows, group), group, dv, subject, ylabel="head", annotate=annotate,
        title=title or f"Mean {dv} by layer and head{_where(sel.selection, ('metric',))}",
    )


def heatmap_layer_site_kind(
    data: pd.DataFrame,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    *,
    annotate: bool | None = None,
    title: str | None = None,
    **select: Any,
) -> Figure:
    """Mean ``dv`` per layer (x) and site kind (y: residual stream, attention, MLP...), one panel per group.

    Puts the components side by side: "is it the MLPs or the attention layers at layer 5 that carry the fact?".
    Positions (and heads) are averaged per probe first, by the rule of :mod:`analyses.select`.
    """
    select.pop("site_kind", None)
    sel = select_rows(data, dv, vary=("site_kind",), **select)
    rows = sel.rows

    def kind_order(kinds: pd.Index) -> list[str]:
        return [k for k in SITE_KINDS if k in kinds] + sorted(k for k in kinds if k not in SITE_KINDS)

    return layer_heatmaps(
        rows, "site_kind", group_values(rows, group), group, dv, subject, ylabel="site kind", annotate=annotate,
        row_order=kind_order, title=title or f"Mean {dv} by layer and site kind{_where(sel.selection, ('metric',))}",
    )


def line_by_layer(
    ci_table: pd.DataFrame,
    group: str | None = None,
    *,
    within: str = "layer",
    dv: str = "recovery",
    title: str | None = None,
) -> Figure:
    """Mean ``dv`` by layer with its bootstrap confidence band, one line per group.

    Takes the output of :func:`analyses.bootstrap.bootstrap_ci` (columns ``within``, optionally ``group``,
    ``mean``, ``ci_low``, ``ci_high``, ``ci``), so the band drawn is exactly the interval in the tables.
    Dotted lines mark 0 (no recovery) and 1 (full recovery).
    """
    import seaborn as sns

    groups = group_values(ci_table, group)
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    fig, (ax,) = new_figure(3.4)
    level = float(ci_table["ci"].iloc[0]) if "ci" in ci_table and len(ci_table) else 0.95
    with house_style():
        for i, g in enumerate(groups):
            part = (ci_table if g is None else ci_table[ci_table[group] == g]).sort_values(within)
            x = part[within].to_numpy(float)
            ax.plot(x, part["mean"], color=colours[i], marker=MARKERS[i % len(MARKERS)],
                    linestyle=DASHES[i % len(DASHES)], label=str(g) if g is not None else "all probes", linewidth=1.8,
                    markersize=5)
            ax.fill_between(x, part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float), color=colours[i],
                            alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="0.4", linestyle=":", linewidth=1)
        ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1)
        ax.set_xlabel(within)
        ax.set_ylabel(f"mean {dv} ({level:.0%} {_ci_words(ci_table)} CI)")
        _layer_ticks(ax, ci_table[within].unique())
        ax.legend(title=group if group else None, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(wrap_title(title or f"{dv} by {within}"))
    return fig


def bar_by_module(
    ci_table: pd.DataFrame,
    group: str | None = None,
    *,
    site: str = "site",
    dv: str = "recovery",
    trivial_sites: Sequence[str] = (),
    title: str | None = None,
) -> Figure:
    """Mean ``dv`` per module (site) as horizontal bars with bootstrap error bars, one bar per group.

    For module-level studies (a handful of named modules rather than a layer sweep). Takes
    :func:`analyses.bootstrap.bootstrap_ci` output computed with ``within="site"``. Sites named in
    ``trivial_sites`` (recover 100 % by construction) are hatched and marked so they are not read as findings.
    The order is that of the table (callers sort by layer).
    """
    import seaborn as sns

    groups = group_values(ci_table, group)
    sites = list(dict.fromkeys(ci_table[site].tolist()))
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    height = 0.8 / len(groups)
    fig, (ax,) = new_figure(1.2 + 0.22 * len(sites) * max(1.0, len(groups) * 0.7))
    with house_style():
        y = np.arange(len(sites))
        for i, g in enumerate(groups):
            part = (ci_table if g is None else ci_table[ci_table[group] == g]).set_index(site).reindex(sites)
            mean = part["mean"].to_numpy(float)
            err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
            err = np.where(np.isfinite(err), err, 0.0)
            offset = (i - (len(groups) - 1) / 2) * height
            bars = ax.barh(y + offset, mean, height=height * 0.95, xerr=err, color=colours[i], ecolor="0.2", capsize=2,
                           label=str(g) if g is not None else "all probes")
            for bar, name in zip(bars, sites, strict=True):
                if name in trivial_sites:
                    bar.set_hatch("//")
                    bar.set_edgecolor("0.3")
        ax.set_yticks(y)
        ax.set_yticklabels([f"{s} (trivial)" if s in trivial_sites else s for s in sites])
        ax.invert_yaxis()
        ax.axvline(0.0, color="0.3", linewidth=1)
        ax.axvline(1.0, color="0.4", linestyle=":", linewidth=1)
        ax.set_xlabel(f"mean {dv} ({_ci_words(ci_table)} CI)")
        if group:
            ax.legend(title=group, frameon=True, framealpha=0.9, loc="best")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(wrap_title(title or f"{dv} per module"))
    return fig


def t_interval(values: np.ndarray, ci: float = 0.95) -> tuple[float, float, float]:
    """Mean and its Student-t interval ``mean ± t(1-(1-ci)/2, n-1) * sd / sqrt(n)``; NaN bounds for one value."""
    from scipy import stats as sps

    x = np.asarray(values, float)
    mean = float(x.mean()) if len(x) else np.nan
    if len(x) < 2:
        return mean, np.nan, np.nan
    half = float(sps.t.ppf(1 - (1 - ci) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def layer_means(
    data: pd.DataFrame,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    *,
    site_kinds: Sequence[str] | None = None,
    ci: float = 0.95,
    agg: str | None = None,
    position_reduction: str | int = "last",
    head_reduction: str = "sum",
    subject_field: str = "subject",
    **select: Any,
) -> pd.DataFrame:
    """Per site kind, layer (and group): ``mean``, t-based ``ci_low`` / ``ci_high``, ``sd``, ``n`` over probes.

    Each probe's rows in a layer are first reduced to one value by the named rule of :mod:`analyses.reductions`
    (``position_reduction``, ``head_reduction``; the same rule the tests use, so figure and tables agree);
    every probe that has a value at a layer counts there (no listwise deletion: these are descriptive). The data
    of :func:`layer_contrast` and :func:`module_bars`.
    """
    from analyses.select import prepare

    kinds = sorted(site_kinds or set(select_rows(data, dv, vary=("site_kind",), **select).rows["site_kind"]),
                   key=lambda k: (SITE_KINDS.index(k) if k in SITE_KINDS else 99, k))
    out = []
    for kind in kinds:
        prep = prepare(data, dv, "layer", subject, between=group, missing="keep", agg=agg, min_subjects=1,
                       position_reduction=position_reduction, head_reduction=head_reduction,
                       subject_field=subject_field,
                       min_per_group=1, min_groups=1, min_levels=1, site_kind=kind, **select)
        cell_keys = ["layer", *([group] if group else [])]
        for key, cell in prep.data.groupby(cell_keys, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            mean, low, high = t_interval(cell[dv].to_numpy(float), ci)
            x = cell[dv].to_numpy(float)
            out.append({"site_kind": kind, **dict(zip(cell_keys, key, strict=True)), "mean": mean, "ci_low": low,
                        "ci_high": high, "sd": float(x.std(ddof=1)) if len(x) > 1 else np.nan, "n": len(x), "ci": ci})
    return pd.DataFrame(out, columns=["site_kind", "layer", *([group] if group else []), "mean", "ci_low", "ci_high",
                                      "sd", "n", "ci"])


def layer_contrast(
    means: pd.DataFrame,
    group: str,
    *,
    groups: Sequence[Any] | None = None,
    dv: str = "recovery",
    differ: pd.DataFrame | None = None,
    title: str | None = None,
) -> Figure:
    """The central contrast: mean ``dv`` per layer for two (or more) groups with t-based CIs, one panel per site
    kind, stacked with a shared layer axis.

    ``means`` is :func:`layer_means` output. ``differ`` (optional; columns ``site_kind``, ``layer``) marks layers
    where a test found the groups different with ``*`` above the panel.
    """
    import seaborn as sns

    if groups is None:
        groups = group_values(means, group)
    kinds = list(dict.fromkeys(means["site_kind"]))
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    fig, axes = new_figure(0.6 + 2.1 * len(kinds), nrows=len(kinds), sharex=True)
    level = float(means["ci"].iloc[0]) if len(means) else 0.95
    with house_style():
        for ax, kind in zip(axes, kinds, strict=True):
            part = means[means["site_kind"] == kind]
            for i, g in enumerate(groups):
                line = part[part[group] == g].sort_values("layer")
                x = line["layer"].to_numpy(float) + (i - (len(groups) - 1) / 2) * 0.12  # dodge: bars stay apart
                ax.errorbar(x, line["mean"], yerr=_yerr(line), color=colours[i], marker=MARKERS[i % len(MARKERS)],
                            linestyle=DASHES[i % len(DASHES)], capsize=2.5, linewidth=1.5, markersize=4, label=str(g))
            ax.axhline(0.0, color="0.4", linestyle=":", linewidth=1)
            if differ is not None and len(differ):
                hits = differ[differ["site_kind"] == kind]["layer"].astype(float).unique()
                for layer in hits:
                    ax.annotate("*", (layer, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                                fontsize=12)
            ax.set_ylabel(f"{dv}\n({kind})")
            ax.grid(axis="y", alpha=0.3)
        _layer_ticks(axes, means["layer"].unique())
        fig.legend(*axes[0].get_legend_handles_labels(), frameon=False, ncols=_legend_columns(groups),
                   loc="outside lower center")
        axes[-1].set_xlabel("layer")
        fig.suptitle(wrap_title(title or f"Mean {dv} per layer by {group} ({level:.0%} t-based CI)", _title_chars(fig)),
                     fontsize=STYLE["figure.titlesize"])
    return fig


def module_bars(
    means: pd.DataFrame,
    group: str | None = None,
    *,
    dv: str = "recovery",
    title: str | None = None,
) -> Figure:
    """The module view: mean ``dv`` per layer as bars for each module kind (e.g. attention and MLP outputs), one
    panel per site kind, bars per group, t-based CIs as error bars.

    ``means`` is :func:`layer_means` output for the kinds to show. One bar per layer (not per site), so deep models
    and head sweeps elsewhere in the run never crowd it out.
    """
    import seaborn as sns

    groups = group_values(means, group)
    kinds = list(dict.fromkeys(means["site_kind"]))
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    width = 0.8 / len(groups)
    fig, axes = new_figure(0.6 + 1.9 * len(kinds), nrows=len(kinds), sharex=True)
    with house_style():
        for ax, kind in zip(axes, kinds, strict=True):
            part = means[means["site_kind"] == kind]
            for i, g in enumerate(groups):
                bars = (part if g is None else part[part[group] == g]).sort_values("layer")
                x = bars["layer"].to_numpy(float) + (i - (len(groups) - 1) / 2) * width
                ax.bar(x, bars["mean"], width=width * 0.95, yerr=_yerr(bars), color=colours[i], ecolor="0.2",
                       capsize=1.5, label=str(g) if g is not None else "all probes")
            ax.axhline(0.0, color="0.3", linewidth=0.8)
            ax.set_ylabel(f"{dv}\n({kind})")
            ax.set_title(kind, loc="left")
            ax.grid(axis="y", alpha=0.3)
        _layer_ticks(axes, means["layer"].unique())
        if group:
            fig.legend(*axes[0].get_legend_handles_labels(), frameon=False, ncols=_legend_columns(groups),
                       loc="outside lower center")
        axes[-1].set_xlabel("layer")
        level = float(means["ci"].iloc[0]) if len(means) else 0.95
        by_group = f" by {group}" if group else ""
        fig.suptitle(wrap_title(title or f"Mean {dv} per module and layer{by_group} ({level:.0%} t-based CI)",
                           _title_chars(fig)), fontsize=STYLE["figure.titlesize"])
    return fig


def _yerr(part: pd.DataFrame) -> np.ndarray:
    mean = part["mean"].to_numpy(float)
    err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
    return np.where(np.isfinite(err), err, 0.0)


def layer_tick_values(levels: Any, max_ticks: int = 12) -> list[float]:
    """The layers to label on an axis: all of them when there are at most ``max_ticks``, else the multiples of the
    smallest step of 1, 2, 4, 5, 10, 20, 25, 50, ... that needs at most ``max_ticks`` labels (9 pt labels never
    collide at column width). From the union of every panel's layers, so panels that share an axis label it alike."""
    import math

    values = np.unique(np.asarray([v for v in np.asarray(levels, float) if np.isfinite(v)], float))
    if len(values) <= max_ticks:
        return values.tolist()
    lo, hi = float(values.min()), float(values.max())
    steps = [1, 2, 4, 5] + [m * 10 ** e for e in range(1, 7) for m in (1, 2, 2.5, 5)]
    for step in steps:
        ticks = np.arange(math.ceil(lo / step) * step, hi + 1e-9, step)
        if len(ticks) <= max_ticks:
            return ticks.tolist()
    return [lo, hi]


def _layer_ticks(axes: Any, levels: Any, max_ticks: int = 12) -> None:
    """Label the layer axis of ``axes`` (one axis or several that share it) with :func:`layer_tick_values`, on every
    panel: a panel whose own layers start later (heads of the upper layers only) still shows the shared scale."""
    ticks = layer_tick_values(levels, max_ticks)
    labels = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in ticks]
    for ax in (axes if isinstance(axes, (list, tuple)) else [axes]):
        ax.set_xticks(ticks, labels)
        ax.tick_params(axis="x", labelbottom=True)


def site_order(data: pd.DataFrame, site: str = "site") -> list[str]:
    """Sites in network order: by layer, then site kind in forward order (attention before MLP), then name;
    sites outside the layer stack (embedding first, final norm and unembedding last) around them."""
    first = data.drop_duplicates(site)
    kind_rank = {k: i for i, k in enumerate(SITE_KINDS)}

    def key(row: Any) -> tuple:
        kind = row["site_kind"]
        layer = row["layer"]
        if pd.isna(layer):
            band = -1 if kind == "embed" else 1
            return (band, 0, kind_rank.get(kind, len(kind_rank)), str(row[site]))
        return (0, int(layer), kind_rank.get(kind, len(kind_rank)), str(row[site]))

    return [r[site] for _, r in sorted(first.iterrows(), key=lambda item: key(item[1]))]


def save_figure(fig: Figure, stem: str | Path, dpi: int = 200, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``stem.png`` (at ``dpi``, at least 200) and ``stem.svg``; returns the paths written."""
    if dpi < 200:
        raise ValueError(f"dpi must be at least 200 for publication figures, got {dpi}")

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with house_style():
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            # no tight bounding box: the file keeps the drawn width, so the report can show it at that size
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, facecolor="white",
                                                                metadata=_metadata(fmt)))
            paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    """Drop the creation date from SVG files so reruns on the same data give identical files."""
    return {"Date": None} if fmt == "svg" else {}


def _where(selection: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    items = [(k, v) for k, v in selection.items() if keys is None or k in keys]
    return f" ({', '.join(f'{k}={v}' for k, v in items)})" if items else ""


def _ci_words(table: pd.DataFrame) -> str:
    """How the table's intervals were made (its ``method`` column), for axis labels that must not misname them."""
    methods = set(table["method"].dropna().astype(str)) if "method" in table.columns else set()
    words = {"t": "t", "bca": "BCa bootstrap", "percentile": "percentile bootstrap"}
    return " / ".join(words.get(m, m) for m in sorted(methods)) or "bootstrap"
