"""Publication figures of patching results: where in the network, and at which tokens, the answer comes back.

Figures are built on :class:`matplotlib.figure.Figure` objects directly (no pyplot state, so nothing depends on
the interactive backend and nothing leaks between figures; the Agg canvas renders them), drawn with seaborn, and
saved as PNG (200 dpi or more) and SVG by :func:`save_figure`. Recovery maps use a colour-blind-safe diverging
palette (ColorBrewer RdBu) centred on 0, so "no recovery" is white whatever the range, and negative recovery
(patching pushed the answer further away) is visibly different from positive. Lines use seaborn's "colorblind"
palette plus distinct markers and dash patterns, so groups stay apart in greyscale too.

Every function takes the tidy results and the selection keywords of :func:`analyses.select.select_rows`; values
are reduced per probe first (mean over the rows of one probe in one cell) and then averaged over probes, so a
probe with more rows does not weigh more.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analyses.select import select_rows

DIVERGING_CMAP = "RdBu_r"
LINE_PALETTE = "colorblind"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", "-.", ":")
SITE_KIND_ORDER = ("embed", "resid_pre", "attn_out", "head", "mlp_out", "resid_post", "block_out", "module", "final_norm", "unembed")

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "svg.fonttype": "path",
}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The house style, and silence for seaborn's internal use of soon-deprecated matplotlib calls."""
    import matplotlib as mpl

    with mpl.rc_context(STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:

    with _style():
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, ncols, squeeze=False)[0].tolist()
    return fig, axes


def _per_probe(rows: pd.DataFrame, keys: Sequence[str], dv: str, subject: str) -> pd.DataFrame:
    """Mean per probe and cell, then the mean over probes: each probe counts once per cell."""
    per = rows.groupby([subject, *keys], observed=True)[dv].mean().reset_index()
    return per.groupby(list(keys), observed=True)[dv].agg(["mean", "count"]).reset_index()


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(max(finite.max(), 1e-3)) if finite.size else 1.0


def _groups(rows: pd.DataFrame, group: str | None) -> list[Any]:
    return sorted(rows[group].unique().tolist(), key=str) if group else [None]


def position_labels(rows: pd.DataFrame, align: str = "start", subject: str = "probe_id") -> tuple[pd.Series, dict[int, str]]:
    """The position axis of a heatmap and a label per position: ``token [index]``.

    ``align="start"`` keeps the engine's index (token index in the unpadded prompt); ``"end"`` counts from each
    probe's last patched position (-1 is the last token), which lines prompts of different lengths up at the answer.
    The label shows the most common token at that index, marked ``*`` when probes disagree.
    """
    pos = rows["position"].astype("Int64")
    if align == "end":
        last = rows.assign(_p=pos).groupby(subject)["_p"].transform("max")
        pos = pos - last - 1
    elif align != "start":
        raise ValueError(f"align must be 'start' or 'end', got {align!r}")
    labels: dict[int, str] = {}
    tokens = rows["token"].astype(object).where(rows["token"].notna(), "")
    for p, toks in tokens.groupby(pos.to_numpy()):
        counts = toks.value_counts()
        tok = str(counts.index[0])
        shown = tok.strip() or repr(tok)
        labels[int(p)] = f"{shown}{'*' if len(counts) > 1 else ''} [{int(p)}]"
    return pos, labels


def _layer_heatmaps(
    rows: pd.DataFrame,
    index: str,
    groups: list[Any],
    group: str | None,
    dv: str,
    subject: str,
    *,
    ylabel: str,
    annotate: bool | None,
    ytick_label: Any = None,
    row_order: Any = sorted,
    inner_yticks: bool = False,
    title: str,
) -> Figure:
    """One heatmap panel per group: mean over probes (each probe's mean first) of ``dv`` per ``index`` (rows, in
    ``row_order``) and layer (columns), on one symmetric colour scale centred on 0 shared by all panels. Panels
    after the first repeat their row labels only with ``inner_yticks``."""
    import seaborn as sns

    tables = {}
    for g in groups:
        part = rows if g is None else rows[rows[group] == g]
        table = _per_probe(part, [index, "layer"], dv, subject).pivot(index=index, columns="layer", values="mean")
        tables[g] = table.loc[row_order(table.index)]
    vmax = _limit(np.concatenate([t.to_numpy(float).ravel() for t in tables.values()]))
    n_rows = max(len(t.index) for t in tables.values())
    n_layers = max(len(t.columns) for t in tables.values())
    if annotate is None:
        annotate = n_rows * n_layers <= 160
    width = min(3.0 + 0.45 * n_layers * len(groups) + (0.8 if annotate else 0), 24)
    fig, axes = _new_figure(width, 1.6 + 0.38 * n_rows, ncols=len(groups))
    with _style():
        for i, (g, ax) in enumerate(zip(groups, axes)):
            t = tables[g]
            sns.heatmap(
                t, ax=ax, cmap=DIVERGING_CMAP, center=0.0, vmin=-vmax, vmax=vmax, annot=annotate, fmt=".2f",
                annot_kws={"fontsize": 8}, linewidths=0.3, linecolor="white",
                cbar=i == len(groups) - 1, cbar_kws={"label": f"mean {dv}"},
                yticklabels=[ytick_label(v) for v in t.index] if ytick_label else "auto",
            )
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel if i == 0 else "")
            if i and not inner_yticks:
                ax.set_yticklabels([])
            ax.tick_params(axis="y", rotation=0)
            ax.set_title(f"{group} = {g}" if g is not None else "all probes")
        fig.suptitle(title)
    return fig


def heatmap_layer_position(
    data: pd.DataFrame,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    *,
    align: str = "start",
    annotate: bool | None = None,
    title: str | None = None,
    **select: Any,
) -> Figure:
    """Mean ``dv`` per layer (x) and token position (y, labelled with tokens), one panel per ``group`` value.

    The standard activation-patching picture: which token's activation, at which layer, carries the answer.
    Rows whose ``position`` is NA (several positions patched together) are left out; raises
    :class:`~clap.errors.ClapError` if no per-position rows remain. Cells are annotated with their value when the
    grid is small (``annotate=None``) or on request.
    """
    from clap.errors import ClapError

    sel = select_rows(data, dv, **select)
    rows = sel.rows[sel.rows["position"].notna()]
    if rows.empty:
        raise ClapError(f"no per-position rows for {dv}{_where(sel.selection)}: a layer x position heatmap needs single-position patches")
    pos, labels = position_labels(rows, align, subject)
    rows = rows.assign(_pos=pos.to_numpy())
    return _layer_heatmaps(
        rows, "_pos", _groups(rows, group), group, dv, subject, ylabel="token [position]", annotate=annotate,
        ytick_label=lambda p: labels[int(p)],
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
    return _layer_heatmaps(
        rows, "head", _groups(rows, group), group, dv, subject, ylabel="head", annotate=annotate, inner_yticks=True,
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
        return [k for k in SITE_KIND_ORDER if k in kinds] + sorted(k for k in kinds if k not in SITE_KIND_ORDER)

    return _layer_heatmaps(
        rows, "site_kind", _groups(rows, group), group, dv, subject, ylabel="site kind", annotate=annotate,
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

    groups = _groups(ci_table, group)
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    fig, (ax,) = _new_figure(6.4, 4.0)
    level = float(ci_table["ci"].iloc[0]) if "ci" in ci_table and len(ci_table) else 0.95
    with _style():
        for i, g in enumerate(groups):
            part = (ci_table if g is None else ci_table[ci_table[group] == g]).sort_values(within)
            x = part[within].to_numpy(float)
            ax.plot(x, part["mean"], color=colours[i], marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)],
                    label=str(g) if g is not None else "all probes", linewidth=1.8, markersize=5)
            ax.fill_between(x, part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float), color=colours[i], alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="0.4", linestyle=":", linewidth=1)
        ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1)
        ax.set_xlabel(within)
        ax.set_ylabel(f"mean {dv} ({level:.0%} bootstrap CI)")
        levels = np.sort(ci_table[within].unique())
        if len(levels) <= 30:
            ax.set_xticks(levels.astype(float))
            ax.set_xticklabels([str(v) for v in levels])
        ax.legend(title=group if group else None, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title or f"{dv} by {within}")
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

    groups = _groups(ci_table, group)
    sites = list(dict.fromkeys(ci_table[site].tolist()))
    colours = sns.color_palette(LINE_PALETTE, max(len(groups), 1))
    height = 0.8 / len(groups)
    fig, (ax,) = _new_figure(7.0, 1.4 + 0.32 * len(sites) * max(1, len(groups) * 0.7))
    with _style():
        y = np.arange(len(sites))
        for i, g in enumerate(groups):
            part = (ci_table if g is None else ci_table[ci_table[group] == g]).set_index(site).reindex(sites)
            mean = part["mean"].to_numpy(float)
            err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
            err = np.where(np.isfinite(err), err, 0.0)
            offset = (i - (len(groups) - 1) / 2) * height
            bars = ax.barh(y + offset, mean, height=height * 0.95, xerr=err, color=colours[i], ecolor="0.2", capsize=2,
                           label=str(g) if g is not None else "all probes")
            for bar, name in zip(bars, sites):
                if name in trivial_sites:
                    bar.set_hatch("//")
                    bar.set_edgecolor("0.3")
        ax.set_yticks(y)
        ax.set_yticklabels([f"{s} (trivial)" if s in trivial_sites else s for s in sites])
        ax.invert_yaxis()
        ax.axvline(0.0, color="0.3", linewidth=1)
        ax.axvline(1.0, color="0.4", linestyle=":", linewidth=1)
        ax.set_xlabel(f"mean {dv} (bootstrap CI)")
        if group:
            ax.legend(title=group, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title or f"{dv} per module")
    return fig


def site_order(data: pd.DataFrame, site: str = "site") -> list[str]:
    """Sites in network order: by layer, then site kind in forward order (attention before MLP), then name;
    sites outside the layer stack (embedding first, final norm and unembedding last) around them."""
    first = data.drop_duplicates(site)
    kind_rank = {k: i for i, k in enumerate(SITE_KIND_ORDER)}

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
    with _style():
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white", metadata=_metadata(fmt))
            paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    """Drop the creation date from SVG files so reruns on the same data give identical files."""
    return {"Date": None} if fmt == "svg" else {}


def _where(selection: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    items = [(k, v) for k, v in selection.items() if keys is None or k in keys]
    return f" ({', '.join(f'{k}={v}' for k, v in items)})" if items else ""
