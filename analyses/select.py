"""From the tidy results to the table a test needs: one value per probe and layer.

A results table mixes metrics, site kinds, operations, directions, position selections and individual positions.
A test across layers is only meaningful on one slice of it, with one number per probe and layer. This module makes
that reduction explicit and identical for every statistic, figure and report:

1. **Selection.** Rows are restricted to one value of each of :data:`SELECT_COLUMNS` (``metric``, ``site_kind``,
   ``operation``, ``direction``, ``positions``). When a column holds several values and none was chosen, a
   :class:`~clap.errors.ClapError` lists them: silently pooling logit differences with probabilities, or denoising
   with noising, would make the test meaningless.
2. **Sites outside the stack** (``layer`` is NA, e.g. ``lm_head``) are dropped when testing across layers.
3. **Trivial rows** (``trivial`` is True: sites that recover 100 % by construction) are excluded unless
   ``include_trivial=True``; they would manufacture a layer effect. They are counted.
4. **Undefined values** (``recovery_defined`` is False for the recovery column, or a NaN or infinite ``dv``) are
   excluded and counted; they are never treated as 0 or 1.
5. **Reduction.** The remaining rows of one probe and one level of ``within`` (for ``layer``: every position,
   and every head of that layer) are reduced to one value by the rule of :mod:`analyses.reductions`: heads are
   summed (the layer's total; never averaged), then one position is chosen (default: the last token; or ``max``,
   ``sum``, the subject's tokens, a fixed index). The mean over positions is not offered: recovery is roughly
   conserved across positions, so it is about 1 / prompt length at every layer and erases the layer effect. The
   rule is named in every table (``reduction``). The legacy ``agg=`` keyword applies one pandas aggregation to
   all of a cell's rows instead (it is named too). With ``subject`` other than ``probe_id`` (e.g. the clean
   prompt), each probe is reduced first and the probes of one subject are then averaged.
6. **Missing cells** (a probe lacking a level after steps 1-5) follow ``missing``: ``"drop_subjects"`` (default)
   removes such probes (listwise deletion, as repeated-measures ANOVA requires complete subjects) with an
   :class:`AnalysisWarning` naming them; ``"drop_levels"`` instead removes the levels some probe lacks;
   ``"error"`` refuses; ``"keep"`` leaves the gaps (only for descriptive summaries such as bootstrap intervals,
   where each layer's mean simply uses the probes it has). The counts travel with the result (``n_dropped``), so
   reports can state them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from analyses.reductions import reduce_cells
from clap.errors import ClapError

#: Columns on which a test must be restricted to a single value.
SELECT_COLUMNS = ("metric", "site_kind", "operation", "direction", "positions")

Agg = Literal["mean", "median", "max", "min", "sum"]
MissingPolicy = Literal["drop_subjects", "drop_levels", "error", "keep"]
AGGS = ("mean", "median", "max", "min", "sum")
MISSING_POLICIES = ("drop_subjects", "drop_levels", "error", "keep")


class AnalysisWarning(UserWarning):
    """Something was left out of a test (incomplete probes, undefined recoveries); the counts are in the result."""


@dataclass
class Selected:
    """Rows that survived steps 1-4, with what was removed and why."""

    rows: pd.DataFrame
    selection: dict[str, Any]
    n_rows_in: int
    n_outside_stack: int = 0
    n_trivial: int = 0
    n_undefined: int = 0


@dataclass
class Prepared:
    """One value of ``dv`` per subject and level of ``within`` (and the subject's ``between`` label)."""

    data: pd.DataFrame
    dv: str
    within: str
    subject: str
    between: str | None
    selection: dict[str, Any]
    levels: list[Any]
    n_subjects: int
    n_undefined: int
    n_trivial: int
    dropped_subjects: list[Any] = field(default_factory=list)
    dropped_levels: list[Any] = field(default_factory=list)
    reduction: str = ""

    def summary(self) -> dict[str, Any]:
        """Book-keeping columns appended to every statistics table (documented in :mod:`analyses.stats`)."""
        out: dict[str, Any] = {"dv": self.dv}
        for col in SELECT_COLUMNS:
            out[col] = self.selection.get(col, pd.NA)
        out.update(
            n_subjects=self.n_subjects,
            n_levels=len(self.levels),
            n_dropped=len(self.dropped_subjects),
            n_undefined=self.n_undefined,
            reduction=self.reduction,
        )
        return out


def select_rows(
    data: pd.DataFrame,
    dv: str = "recovery",
    *,
    metric: str | None = None,
    site_kind: str | None = None,
    operation: str | None = None,
    direction: str | None = None,
    positions: str | None = None,
    include_trivial: bool = False,
    require_layer: bool = True,
    vary: Iterable[str] = (),
) -> Selected:
    """Steps 1-4 of the module rule: restrict, drop out-of-stack, trivial and undefined rows, count each.

    Columns named in ``vary`` may keep several values (figures that put site kinds side by side use it).
    ``require_layer=False`` keeps sites whose ``layer`` is NA (per-module bar plots).

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results.
    dv : str, default "recovery"
        The dependent variable; rows where it is undefined are dropped and counted.
    metric, site_kind, operation, direction, positions : str, optional
        The value to keep of each :data:`SELECT_COLUMNS` column; required where the column holds several values.
    include_trivial : bool, default False
        Keep rows flagged ``trivial``.
    require_layer : bool, default True
        Drop rows whose ``layer`` is NA.
    vary : iterable of str
        :data:`SELECT_COLUMNS` allowed to keep several values.

    Returns
    -------
    Selected
        ``rows`` (the surviving rows), ``selection`` (the value of each selection column) and the counts
        ``n_rows_in``, ``n_outside_stack``, ``n_trivial``, ``n_undefined``.

    Raises
    ------
    clap.errors.ClapError
        A missing column, a value not in the results, or a column with several values and none chosen.

    Examples
    --------
    >>> from analyses import select_rows
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> sel = select_rows(data, site_kind="mlp_out")
    >>> len(sel.rows), sel.n_outside_stack, sel.n_trivial, sel.n_undefined
    (192, 0, 0, 0)
    >>> sel.selection["metric"], sel.selection["site_kind"]
    ('logit_diff', 'mlp_out')
    """
    _require_columns(data, [dv])
    chosen = {"metric": metric, "site_kind": site_kind, "operation": operation, "direction": direction,
              "positions": positions}
    vary = set(vary)
    rows = data
    selection: dict[str, Any] = {}
    for col in SELECT_COLUMNS:
        if col not in rows.columns:
            continue
        value = chosen[col]
        present = sorted(rows[col].dropna().unique().tolist(), key=str)
        if value is not None:
            if value not in present:
                raise ClapError(
                    f"no rows with {col} == {value!r}; the results hold {col} values: "
                    f"{', '.join(map(str, present)) or 'none'}"
                )
            rows = rows[rows[col] == value]
            selection[col] = value
        elif col in vary:
            continue
        elif len(present) > 1:
            raise ClapError(
                f"the results hold several {col} values ({', '.join(map(str, present))}); "
                f"choose one with {col}=... (a test pools rows of one {col} only)"
            )
        elif present:
            selection[col] = present[0]
    n_in = len(rows)
    n_outside = 0
    if require_layer and "layer" in rows.columns:
        outside = rows["layer"].isna()
        n_outside = int(outside.sum())
        rows = rows[~outside]
    n_trivial = 0
    if not include_trivial and "trivial" in rows.columns:
        triv = rows["trivial"].astype(bool)
        n_trivial = int(triv.sum())
        rows = rows[~triv]
    values = pd.to_numeric(rows[dv], errors="coerce").astype(float)
    undefined = ~np.isfinite(values.to_numpy())
    undefined = pd.Series(undefined, index=rows.index)
    if dv == "recovery" and "recovery_defined" in rows.columns:
        undefined = undefined | ~rows["recovery_defined"].astype(bool)
    n_undefined = int(undefined.sum())
    rows = rows[~undefined]
    return Selected(rows, selection, n_in, n_outside, n_trivial, n_undefined)


def prepare(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    between: str | None = None,
    *,
    metric: str | None = None,
    site_kind: str | None = None,
    operation: str | None = None,
    direction: str | None = None,
    positions: str | None = None,
    agg: Agg | None = None,
    position_reduction: str | int = "last",
    head_reduction: str = "sum",
    subject_field: str = "subject",
    missing: MissingPolicy = "drop_subjects",
    include_trivial: bool = False,
    min_subjects: int = 2,
    min_per_group: int = 2,
    min_groups: int = 2,
    min_levels: int = 2,
    vary: Iterable[str] = (),
) -> Prepared:
    """Apply the whole module rule and check there is enough left for a test.

    Raises :class:`~clap.errors.ClapError` when a column is missing, a selection is ambiguous or empty, fewer than
    ``min_subjects`` complete probes (or fewer than ``min_levels`` levels) remain, or, with ``between``, fewer than
    ``min_groups`` groups or a group with fewer than ``min_per_group`` probes remains. Columns in ``vary`` may
    keep several values (for descriptive summaries across site kinds; never for a test).

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results, or any frame with the ``dv``, ``within`` and ``subject`` (and ``between``) columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The repeated factor.
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    between : str, optional
        A group column, constant per subject.
    metric, site_kind, operation, direction, positions : str, optional
        Step 1, the selection (:func:`select_rows`).
    agg : {"mean", "median", "max", "min", "sum"}, optional
        Legacy: one pandas aggregation over all of a cell's rows instead of the reduction rules.
    position_reduction : str or int, default "last"
        Which position stands for a probe at one level (:mod:`analyses.reductions`).
    head_reduction : str, default "sum"
        How the heads of one layer are combined.
    subject_field : str, default "subject"
        Where a probe's subject tokens are recorded (for ``position_reduction="subject"``).
    missing : {"drop_subjects", "drop_levels", "error", "keep"}, default "drop_subjects"
        Step 6, the missing-cell policy.
    include_trivial : bool, default False
        Keep rows flagged ``trivial``.
    min_subjects, min_per_group, min_groups, min_levels : int
        What a test needs; fewer is a :class:`~clap.errors.ClapError`.
    vary : iterable of str
        :data:`SELECT_COLUMNS` allowed to keep several values.

    Returns
    -------
    Prepared
        ``data`` (one row per subject and level: ``subject``, ``within``, ``dv`` and ``between``), ``levels``,
        ``n_subjects``, what was dropped and the ``reduction`` label; :meth:`Prepared.summary` gives the
        book-keeping columns.

    Examples
    --------
    >>> from analyses import prepare
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> prep = prepare(data, site_kind="mlp_out")
    >>> prep.data.shape, prep.levels, prep.n_subjects, prep.reduction
    ((32, 3), [0, 1, 2, 3], 8, 'last position')
    >>> prep.data.head(3).round(3)
      probe_id  layer  recovery
    0     p000      0     0.139
    1     p000      1     0.478
    2     p000      2     0.710
    """
    if agg is not None and agg not in AGGS:
        raise ClapError(f"agg={agg!r} is not a known position rule; expected one of {', '.join(AGGS)}")
    if missing not in MISSING_POLICIES:
        raise ClapError(f"missing={missing!r} is not a known policy; expected one of {', '.join(MISSING_POLICIES)}")
    needed = [dv, within, subject] + ([between] if between else [])
    _require_columns(data, needed)
    sel = select_rows(
        data,
        dv,
        metric=metric,
        site_kind=site_kind,
        operation=operation,
        direction=direction,
        positions=positions,
        include_trivial=include_trivial,
        require_layer=(within == "layer"),
        vary=vary,
    )
    rows = sel.rows[sel.rows[within].notna()]
    where = _describe(sel.selection)
    if within == "layer":
        _check_one_module_role(rows, where)
    if rows.empty:
        raise ClapError(
            f"no usable rows for {dv}{where}: {sel.n_rows_in} selected, {sel.n_outside_stack} outside the layer stack, "
            f"{sel.n_trivial} trivial, {sel.n_undefined} undefined"
        )
    if between:
        _check_constant_per_subject(rows, subject, between)
    keys = [subject, within] + ([between] if between else [])
    cells, label = _cells(rows, dv, keys, subject, agg, where, position_reduction=position_reduction,
                          head_reduction=head_reduction, subject_field=subject_field)
    cells[within] = _plain(cells[within])
    cells, dropped_subjects, dropped_levels = _apply_missing_policy(cells, dv, within, subject, missing, where)
    if sel.n_undefined:
        warnings.warn(f"excluded {sel.n_undefined} rows with undefined {dv}{where}", AnalysisWarning, stacklevel=3)

    subjects = cells[subject].unique().tolist()
    levels = sorted(cells[within].unique().tolist())
    if len(subjects) < min_subjects:
        who = f" (only {subjects[0]!r})" if len(subjects) == 1 else ""
        raise ClapError(
            f"{len(subjects)} complete {subject}{'' if len(subjects) == 1 else 's'}{who} for {dv}{where}: a test "
            f"across {within} needs at least {min_subjects} probes with a value at every {within}"
            + (f" ({len(dropped_subjects)} incomplete dropped)" if dropped_subjects else "")
            + (f"; {sel.n_undefined} rows had undefined {dv}" if sel.n_undefined else "")
        )
    if len(levels) < min_levels:
        raise ClapError(f"only {len(levels)} {within} value(s) left for {dv}{where}: a test across {within} "
                        f"needs at least {min_levels}")
    if between:
        _check_groups(cells, subject, between, where, min_groups=min_groups, min_per_group=min_per_group)
    cells = cells.reset_index(drop=True)
    return Prepared(
        data=cells,
        dv=dv,
        within=within,
        subject=subject,
        between=between,
        selection=sel.selection,
        levels=levels,
        n_subjects=len(subjects),
        n_undefined=sel.n_undefined,
        n_trivial=sel.n_trivial,
        dropped_subjects=dropped_subjects,
        dropped_levels=dropped_levels,
        reduction=label,
    )


def _check_one_module_role(rows: pd.DataFrame, where: str) -> None:
    """Refuse raw module sites of several roles: their layer indices are not one layer effect."""
    if "module" not in rows.columns or "site_kind" not in rows.columns:
        return
    raw = rows.loc[rows["site_kind"] == "module", "module"].dropna()
    roles = sorted(set(raw.str.replace(r"\.\d+(?=\.|$)", ".*", n=1, regex=True)))
    if len(roles) > 1:
        raise ClapError(
            f"raw module sites of different roles ({', '.join(roles[:4])}{' ...' if len(roles) > 4 else ''}) "
            f"cannot be tested as one layer effect{where}; analyse one role at a time (e.g. restrict the data "
            f"to rows whose module matches one of them)"
        )


def _check_constant_per_subject(rows: pd.DataFrame, subject: str, between: str) -> None:
    """Refuse a ``between`` label that changes within a subject: a subject belongs to exactly one group."""
    labels = rows.groupby(subject, observed=True)[between].nunique()
    mixed = labels[labels > 1]
    if len(mixed):
        raise ClapError(
            f"column {between!r} must be constant per {subject}; {subject} {mixed.index[0]!r} has "
            f"{int(mixed.iloc[0])} different labels"
        )


def _cells(
    rows: pd.DataFrame,
    dv: str,
    keys: list[str],
    subject: str,
    agg: Agg | None,
    where: str,
    **reduction: Any,
) -> tuple[pd.DataFrame, str]:
    """One value per (subject, level[, group]) cell and a label saying how positions and heads were reduced.

    ``agg`` pools every position and head; otherwise :func:`reduce_cells` applies the named rules per probe and
    several probes of one subject (e.g. one clean prompt) are averaged.
    """
    if agg is not None:
        cells = rows.groupby(keys, observed=True, sort=True)[dv].agg(agg).reset_index()
        return cells, f"{agg} over positions and heads"
    per_probe = list(dict.fromkeys(["probe_id", *keys])) if "probe_id" in rows.columns else keys
    cells, label = reduce_cells(rows, dv, per_probe, where=where, **reduction)
    if per_probe != keys:  # several probes per subject (e.g. one clean prompt): average them
        cells = cells.groupby(keys, observed=True, sort=True)[dv].mean().reset_index()
        label += f"; probes averaged per {subject}"
    if cells.empty:
        raise ClapError(f"no values left for {dv}{where} after the reduction ({label})")
    return cells, label


def _apply_missing_policy(
    cells: pd.DataFrame, dv: str, within: str, subject: str, missing: MissingPolicy, where: str
) -> tuple[pd.DataFrame, list[Any], list[Any]]:
    """Make the design complete as ``missing`` says: drop incomplete subjects or levels, refuse, or keep gaps.

    Returns the cells and the dropped subjects and levels; a drop is announced with an :class:`AnalysisWarning`
    (one stack level deeper than :func:`prepare`'s own warnings, so all of them point at the same caller).
    """
    wide = cells.pivot(index=subject, columns=within, values=dv)
    if missing == "keep" or not wide.isna().any().any():
        return cells, [], []
    n_all = len(wide)
    incomplete = wide.index[wide.isna().any(axis=1)].tolist()
    gaps = {s: [lvl for lvl in wide.columns if pd.isna(wide.loc[s, lvl])] for s in incomplete}
    detail = "; ".join(f"{s}: {within} {', '.join(map(str, g))}" for s, g in list(gaps.items())[:5])
    if len(gaps) > 5:
        detail += f"; and {len(gaps) - 5} more"
    if missing == "error":
        raise ClapError(f"{len(incomplete)} of {n_all} {subject}s lack some {within} values{where} ({detail}); "
                        "choose missing='drop_subjects' or 'drop_levels'")
    if missing == "drop_subjects":
        warnings.warn(
            f"dropped {len(incomplete)} of {n_all} {subject}s lacking some {within} values{where} ({detail})",
            AnalysisWarning,
            stacklevel=4,
        )
        return cells[~cells[subject].isin(incomplete)], incomplete, []
    dropped_levels = [lvl for lvl in wide.columns if wide[lvl].isna().any()]
    warnings.warn(
        f"dropped {within} {', '.join(map(str, dropped_levels))}{where}: some {subject}s lack them ({detail})",
        AnalysisWarning,
        stacklevel=4,
    )
    return cells[~cells[within].isin(dropped_levels)], [], dropped_levels


def _check_groups(cells: pd.DataFrame, subject: str, between: str, where: str, *, min_groups: int,
                  min_per_group: int) -> None:
    """Refuse a group comparison with too few groups, or a group with too few complete subjects."""
    sizes = cells.drop_duplicates(subject)[between].value_counts()
    if len(sizes) < min_groups:
        raise ClapError(f"only one {between} group ({', '.join(map(str, sizes.index))}) left{where}: "
                        "comparing groups needs at least 2")
    small = sizes[sizes < min_per_group]
    if len(small):
        raise ClapError(
            f"{between} group(s) {', '.join(f'{g!r} ({n} probes)' for g, n in small.items())}{where}: "
            f"comparing groups needs at least {min_per_group} complete probes per group"
        )


def analysis_units(data: pd.DataFrame, within: str = "layer", include_trivial: bool = False) -> pd.DataFrame:
    """The slices a study can be tested on: one row per combination of :data:`SELECT_COLUMNS` values.

    Columns: the :data:`SELECT_COLUMNS` present in ``data``, ``n_rows`` (non-trivial rows inside the stack),
    ``n_levels`` (distinct ``within`` values). Only slices with at least 2 levels are listed.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results.
    within : str, default "layer"
        The factor a test would run across.
    include_trivial : bool, default False
        Count rows flagged ``trivial``.

    Returns
    -------
    pandas.DataFrame
        One row per testable slice; pass its selection columns as keywords to any test of :mod:`analyses.stats`.

    Examples
    --------
    >>> from analyses import analysis_units
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=4, n_layers=3, site_kinds=("attn_out", "mlp_out"), metrics=("logit_diff",))
    >>> analysis_units(data)[["metric", "site_kind", "n_rows", "n_levels"]]
           metric site_kind  n_rows  n_levels
    0  logit_diff  attn_out      72         3
    1  logit_diff   mlp_out      72         3
    """
    rows = data
    if within == "layer" and "layer" in rows.columns:
        rows = rows[rows["layer"].notna()]
    if not include_trivial and "trivial" in rows.columns:
        rows = rows[~rows["trivial"].astype(bool)]
    cols = [c for c in SELECT_COLUMNS if c in rows.columns]
    if rows.empty:
        return pd.DataFrame(columns=cols + ["n_rows", "n_levels"])
    units = rows.groupby(cols, observed=True, dropna=False).agg(
        n_rows=(within, "size"), n_levels=(within, "nunique")
    ).reset_index()
    units = units[units["n_levels"] >= 2].reset_index(drop=True)
    return units


def slice_mask(frame: pd.DataFrame, selection: dict[str, Any]) -> pd.Series:
    """Which rows of ``frame`` belong to ``selection`` (a slice's column values; a missing value matches a missing
    one, and a key the frame has no column for is ignored, so one selection serves tables of different layouts)."""
    mask = pd.Series(True, index=frame.index)
    for k, v in selection.items():
        if k in frame.columns:
            mask &= frame[k].isna() if _missing(v) else frame[k] == v
    return mask


def slice_rows(frame: pd.DataFrame | None, selection: dict[str, Any]) -> pd.DataFrame:
    """The rows of ``frame`` in ``selection`` (:func:`slice_mask`); an empty frame for an empty or absent table."""
    if frame is None or not len(frame):
        return pd.DataFrame() if frame is None else frame
    return frame[slice_mask(frame, selection)]


def concat_or_empty(frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """The non-empty ``frames`` stacked; with none, an empty table with ``columns`` (a table no slice could fill is
    still written with its header, so readers of the CSV need no special case)."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (str, tuple, list)) and bool(pd.isna(value)))


def _require_columns(data: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ClapError(
            f"column(s) {', '.join(missing)} not in the results; available: {', '.join(map(str, data.columns))}"
        )


def _plain(series: pd.Series) -> pd.Series:
    """Nullable integers to plain ``int64`` so that pingouin labels layers 3, not 3.0."""
    if pd.api.types.is_integer_dtype(series) and not series.isna().any():
        return series.astype(np.int64)
    return series


def _describe(selection: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in selection.items() if v is not None]
    return f" ({', '.join(parts)})" if parts else ""
