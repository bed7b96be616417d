"""Localization profiles: is a probe's answer carried by one layer or spread over many, and do groups differ?

A significant layer effect (or a layer x group interaction) says the recovery *profiles* differ, not that one is
concentrated and the other spread out. This module measures concentration directly, per probe, from the profile of
**per-layer contributions** ``c[l]``, and compares groups of probes on those measures.

Contributions (never a cumulative quantity)
    A per-layer contribution must be what layer ``l`` itself adds, so that the profile's shape says where the work
    is done. Site kinds and the contribution taken from each:

    * ``attn_out``, ``mlp_out``: the recovery of patching that layer's output alone, measured from the unpatched
      target run (``recovery`` when denoising; ``recovery - 1`` when noising, where the unpatched clean run has
      recovery 1). Heads (``head``) are summed per layer first (the layer's total; never averaged), so a head slice
      gives a profile over the layers whose heads were patched.
    * ``resid_pre``, ``resid_post``, ``block_out``: the residual stream is **cumulative**. At the last token the
      residual stream's recovery rises to 1 by construction (the final state *is* the clean run's), so a profile of
      its values would call every upper layer important. It is converted to **increments**: block ``b``
      contributes ``r(after b) - r(before b)`` (``resid_pre`` at layer ``l`` is the state before block ``l``,
      ``resid_post`` / ``block_out`` the state after it). The state after the last block is known by construction
      (1 when denoising, 0 when noising) when the analysed position is the prompt's last token, the operation
      ``replace`` and the run not cross-model; it then closes the last block's increment (``closed``), else that
      block is left out. Increments need one token position per probe (the analysed position: the last token, an
      index, the last subject token) and consecutive layers; other reductions (max or sum over positions) are
      refused with the reason recorded.
    * other kinds (raw ``module`` sites, the embedding, the unembedding) are refused: whether a raw module's output
      is a layer's own contribution or the cumulative stream cannot be told from its name.

    Rows of windows of several layers (``window`` > 1) are left out: a window is not one layer's contribution.

Measures (of ``a = |c|``, ``p = a / sum(a)``; signs only in ``negative_share``)
    ``eff_layers_pr``       participation ratio ``sum(a)^2 / sum(a^2)``: 1 for a single layer, n for n equal layers
    ``eff_layers_entropy``  ``exp(-sum p log p)``, the exponential of the Shannon entropy (also 1 ... n)
    ``peak_layer``, ``peak_share``  the layer of the largest ``a`` (the first of ties) and its share ``p``
    ``peak_depth``          ``peak_layer / n_layers``
    ``window_width``        the narrowest run of contiguous layers whose ``a`` hold at least 80 % of the total
                            (``window_start``, ``window_end``, ``window_share``; of equally narrow windows the one
                            holding most, then the first)
    ``centre_of_mass``      ``sum(p * layer) / n_layers``: relative depth, so models of different depth compare
    ``negative_share``      ``sum(a[c < 0]) / sum(a)``: how much of the profile pushes away from the answer
    A profile whose contributions are all 0 has no shape: its measures are NaN (``note`` says so).

Group comparison (:func:`compare_localization`)
    For every pair of groups (any probe label; ``knowledge_type`` by default) and every measure: the difference of
    means ``A - B`` with its 95 % Welch t interval, a two-sided permutation test of that difference
    (:func:`scipy.stats.permutation_test`: exact when the distinct relabellings number at most ``n_resamples``,
    else ``n_resamples`` seeded random relabellings), the Hodges-Lehmann shift (median of all ``a_i - b_j``) and the
    Mann-Whitney U test (:func:`scipy.stats.mannwhitneyu`). The permutation and Mann-Whitney p-values are Holm-
    corrected across the measures of one slice and pair (:func:`pingouin.multicomp`). Probes excluded by the
    validity rules never reach this module (:func:`analyses.pipeline.analyze` drops them first).

Every function takes a DataFrame and returns one, in the style of :mod:`analyses.stats`; tables end with the slice
columns (``metric``, ``site_kind``, ...), ``dv``, ``reduction`` (how a probe's rows of one layer became one value,
:mod:`analyses.reductions`) and ``basis`` (how contributions were formed).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.bootstrap import t_interval
from analyses.select import SELECT_COLUMNS, AnalysisWarning, prepare
from clap.errors import ClapError

#: Share of the total |contribution| the narrowest window must hold.
COVERAGE = 0.8
#: The measures compared between groups (one Holm family per slice and pair of groups).
MEASURES = ("eff_layers_pr", "eff_layers_entropy", "peak_share", "window_width", "centre_of_mass", "peak_depth",
            "negative_share")
#: The measures of concentration and the sign that means "more localized": fewer effective layers, a larger peak
#: share, a narrower window. Centre of mass, peak depth and the negative share say where and which way, not how much.
LOCALIZING = {"eff_layers_pr": -1, "eff_layers_entropy": -1, "peak_share": 1, "window_width": -1}
#: Words for the measures, in tables' captions and the findings.
MEASURE_WORDS = {
    "eff_layers_pr": "effective layers (participation ratio)",
    "eff_layers_entropy": "effective layers (exp entropy)",
    "peak_share": "peak share",
    "window_width": f"narrowest {int(COVERAGE * 100)} % window (layers)",
    "centre_of_mass": "centre of mass (relative depth)",
    "peak_depth": "peak (relative depth)",
    "negative_share": "negative share",
}
COMPONENT_KINDS = ("attn_out", "mlp_out", "head")
#: residual-stream kinds and whether their layer ``l`` is the state before (0) or after (1) block ``l``
RESID_KINDS = {"resid_pre": 0, "resid_post": 1, "block_out": 1}
#: permutation resamples (scipy's default); fewer distinct relabellings than this are enumerated exactly
N_RESAMPLES = 9999

TABLE_FILES = {
    "localization_contributions": "localization_contributions.csv",
    "localization": "localization.csv",
    "localization_groups": "localization_groups.csv",
    "localization_tests": "localization_tests.csv",
}

PROFILE_COLUMNS = ["n_profile_layers", "first_layer", "last_layer", "total_abs", "net", "eff_layers_pr",
                   "eff_layers_entropy", "peak_layer", "peak_share", "peak_depth", "window_start", "window_end",
                   "window_width", "window_share", "centre_of_mass", "negative_share"]
BOOK_COLUMNS = ["dv", *SELECT_COLUMNS, "n_layers", "reduction", "basis"]
TEST_COLUMNS = ["measure", "A", "B", "n_A", "n_B", "mean_A", "mean_B", "diff", "ci_low", "ci_high", "p_perm",
                "perm_exact", "p_perm_holm", "hl_shift", "U", "p_mwu", "p_mwu_holm", "cles", "more_localized", "note"]
GROUP_COLUMNS = ["measure", "n", "mean", "sd", "ci_low", "ci_high", "median"]

#: position reductions that leave one token per probe (residual increments need it); first part of the label
_SINGLE_POSITION = ("last position", "single position (as patched)", "last subject token")
#: position selections whose "last position" is the prompt's last token (where the final state is known)
_WHOLE_PROMPT = ("last", "each", "all")


def profile_measures(contribution: Sequence[float], layers: Sequence[int] | None = None, *,
                     n_layers: int | None = None, coverage: float = COVERAGE) -> dict[str, float]:
    """The localization measures of one profile (see the module docstring for each).

    Parameters
    ----------
    contribution : sequence of float
        The per-layer contributions ``c`` (signed).
    layers : sequence of int, optional
        Their layers (default ``0 .. len - 1``); need not start at 0 (e.g. heads of the upper layers only).
    n_layers : int, optional
        The model's depth, for the relative measures (default ``max(layers) + 1``).
    coverage : float, default 0.8
        The share of the total |contribution| the narrowest window must hold.

    Returns
    -------
    dict
        :data:`PROFILE_COLUMNS` (NaN measures for a profile of zeros).

    Examples
    --------
    >>> m = profile_measures([0.0, 0.6, -0.2, 0.2, 0.0])
    >>> {k: round(m[k], 4) for k in ("eff_layers_pr", "peak_layer", "window_width", "centre_of_mass",
    ...                               "negative_share")}
    {'eff_layers_pr': 2.2727, 'peak_layer': 1, 'window_width': 2, 'centre_of_mass': 0.32, 'negative_share': 0.2}
    """
    c = np.asarray(contribution, dtype=float)
    lay = np.arange(len(c)) if layers is None else np.asarray(layers, dtype=float)
    if len(lay) != len(c):
        raise ClapError(f"profile_measures: {len(c)} contributions for {len(lay)} layers")
    if not len(c) or not np.isfinite(c).all():
        raise ClapError("profile_measures needs a non-empty profile of finite contributions")
    if not 0 < coverage <= 1:
        raise ClapError(f"coverage must be in (0, 1], got {coverage}")
    order = np.argsort(lay, kind="stable")
    c, lay = c[order], lay[order]
    depth = float(n_layers) if n_layers else float(lay.max() + 1)
    a = np.abs(c)
    total = float(a.sum())
    out: dict[str, float] = {"n_profile_layers": len(c), "first_layer": int(lay[0]), "last_layer": int(lay[-1]),
                             "total_abs": total, "net": float(c.sum())}
    if total == 0:
        return {**out, **{k: np.nan for k in PROFILE_COLUMNS if k not in out}}
    p = a / total
    nz = p[p > 0]
    peak = int(np.argmax(a))
    start, end, share = _narrowest_window(p, lay, coverage)
    out.update(
        eff_layers_pr=total**2 / float((a**2).sum()),
        eff_layers_entropy=float(np.exp(-(nz * np.log(nz)).sum())),
        peak_layer=int(lay[peak]),
        peak_share=float(p[peak]),
        peak_depth=float(lay[peak] / depth),
        window_start=int(start),
        window_end=int(end),
        window_width=int(end - start + 1),
        window_share=share,
        centre_of_mass=float((p * lay).sum() / depth),
        negative_share=float(p[c < 0].sum()),
    )
    return out


def _narrowest_window(p: np.ndarray, layers: np.ndarray, coverage: float) -> tuple[float, float, float]:
    """The narrowest run of layers ``[start, end]`` whose shares sum to at least ``coverage`` (a relative rounding
    tolerance of 1e-9, so 0.6 + 0.2 counts as 0.8); of equally narrow runs the one holding most, then the first."""
    cum = np.concatenate([[0.0], np.cumsum(p)])
    best: tuple[float, float, float, float] | None = None  # (width, -share, start, end)
    for i in range(len(p)):
        for j in range(i, len(p)):
            share = float(cum[j + 1] - cum[i])
            if share >= coverage * (1 - 1e-9):
                key = (layers[j] - layers[i] + 1, -share, layers[i], layers[j])
                if best is None or key < best:
                    best = key
                break  # a longer run from i is wider
    assert best is not None  # the whole profile holds 100 %
    return best[2], best[3], -best[1]


def contributions(
    data: pd.DataFrame,
    dv: str = "recovery",
    subject: str = "probe_id",
    between: str | None = None,
    *,
    n_layers: int | None = None,
    cross_model: bool = False,
    position_reduction: str | int = "last",
    subject_field: str = "subject",
    agg: str | None = None,
    missing: str = "drop_subjects",
    **select: Any,
) -> pd.DataFrame:
    """Per subject and layer of one slice: the contribution ``c`` of that layer (see the module docstring).

    ``select`` chooses the slice (``metric``, ``site_kind``, ``operation``, ``direction``, ``positions``) as in
    :func:`analyses.select.prepare`, which reduces each probe's rows of one layer to one value by the named rule
    (heads summed per layer); ``cross_model`` (a run patching another model's activations) disables the residual
    stream's closure. Columns: ``subject``, ``between``, ``layer`` (the block a contribution belongs to),
    ``rel_depth`` (``layer / n_layers``), ``contribution``, ``share`` (``c / sum |c|`` of the subject), then
    :data:`BOOK_COLUMNS`.

    Raises
    ------
    clap.errors.ClapError
        A site kind with no per-layer contribution, a residual slice reduced over several positions or with gaps
        between its layers, ``dv`` other than recovery, or too little data (:func:`analyses.select.prepare`).
    """
    kind = select.get("site_kind")
    if dv != "recovery":
        raise ClapError(f"localization profiles are defined on recovery (each layer's share of the logit difference "
                        f"restored), not {dv!r}")
    if kind not in COMPONENT_KINDS and kind not in RESID_KINDS:
        raise ClapError(f"site kind {kind!r} has no per-layer contribution: localization profiles use attn_out, "
                        "mlp_out, heads (summed per layer) and the residual stream's increments (resid_pre, "
                        "resid_post, block_out); a raw module's output may be cumulative")
    if kind == "head" and agg is not None:
        raise ClapError(f"the legacy aggregation agg={agg!r} pools a layer's heads by {agg}; a head profile needs "
                        "each layer's total (heads summed): use the position rules instead of agg")
    if "window" in data.columns:
        data = data[data["window"].fillna(1).astype(int) == 1]
    missing = "drop_subjects" if missing == "keep" else missing
    prep = prepare(data, dv, "layer", subject, between=between, agg=agg, position_reduction=position_reduction,
                   head_reduction="sum", subject_field=subject_field, missing=missing, min_subjects=1,
                   min_per_group=1, min_groups=1, min_levels=2, **select)
    sel = {c: prep.selection.get(c, select.get(c)) for c in SELECT_COLUMNS}
    direction = sel.get("direction")
    if direction not in ("denoising", "noising", None):
        raise ClapError(f"direction {direction!r}: contributions are measured from the unpatched target run of a "
                        "denoising or noising study")
    depth = int(n_layers) if n_layers else int(max(prep.levels)) + 1
    values = prep.data.pivot(index=subject, columns="layer", values=dv).sort_index(axis=1)
    layers = np.asarray(values.columns, dtype=int)
    if kind in RESID_KINDS:
        contrib, layers, basis = _increments(values.to_numpy(float), layers, kind, prep.reduction, sel, depth,
                                             closure=not cross_model)
    else:
        baseline = 1.0 if direction == "noising" else 0.0
        contrib = values.to_numpy(float) - baseline
        basis = f"{kind} recovery" + (" - 1 (drop from the clean run)" if baseline else "")
        if kind == "head":
            basis += ", heads summed per layer"
    out = pd.DataFrame(contrib, index=values.index, columns=layers).stack().rename("contribution").reset_index()
    out.columns = [subject, "layer", "contribution"]
    if between:
        labels = prep.data.drop_duplicates(subject).set_index(subject)[between]
        out.insert(1, between, out[subject].map(labels))
    out["rel_depth"] = out["layer"] / depth
    total = out.groupby(subject)["contribution"].transform(lambda c: c.abs().sum())
    out["share"] = np.where(total > 0, out["contribution"] / total.where(total > 0, 1.0), np.nan)
    book = {"dv": dv, **sel, "n_layers": depth, "reduction": prep.reduction, "basis": basis}
    for k, v in book.items():
        out[k] = v
    return out


def _increments(values: np.ndarray, layers: np.ndarray, kind: str, reduction: str, sel: dict[str, Any],
                depth: int, closure: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Residual-stream values (subjects x layers) -> per-block increments, their blocks and the basis words."""
    position = reduction.split(";")[0].strip()
    if not (position in _SINGLE_POSITION or position.startswith("position ")):
        raise ClapError(f"{kind} is cumulative, so its profile is converted to increments at the analysed position, "
                        f"which needs one token per probe; the reduction here is {position!r} (use "
                        "position_reduction: last, subject_last or a token index)")
    if len(layers) > 1 and (np.diff(layers) != 1).any():
        raise ClapError(f"{kind} at layers {', '.join(map(str, layers))}: increments need consecutive layers "
                        "(a gap would merge several blocks into one contribution)")
    states = layers + RESID_KINDS[kind]  # state s: the residual stream entering block s
    terminal = 1.0 if sel.get("direction", "denoising") == "denoising" else 0.0
    last_token = (position == "last position" or position.startswith("single position")) and \
        sel.get("positions") in _WHOLE_PROMPT
    closes = (closure and last_token and sel.get("operation") == "replace" and states[-1] == depth - 1)
    basis = f"{kind} increments r(after block) - r(before block)"
    if closes:
        values = np.hstack([values, np.full((len(values), 1), terminal)])
        states = np.append(states, depth)
        basis += f"; last block closed by the final state ({terminal:g} by construction)"
    elif RESID_KINDS[kind] == 0 and states[-1] == depth - 1:
        basis += "; last block left out (final state not known by construction here)"
    blocks = states[:-1]
    return np.diff(values, axis=1), blocks, basis


def localization_measures(data: pd.DataFrame, dv: str = "recovery", subject: str = "probe_id",
                          between: str | None = None, *, coverage: float = COVERAGE, **options: Any) -> pd.DataFrame:
    """The localization measures of every subject's profile in one slice (one row per subject).

    ``options`` go to :func:`contributions` (the slice, ``n_layers``, the position rule, ...). Columns:
    ``subject``, ``between``, :data:`PROFILE_COLUMNS`, ``note``, then :data:`BOOK_COLUMNS`.

    Examples
    --------
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=6, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> table = localization_measures(data, between="knowledge_type", site_kind="mlp_out")
    >>> table[["probe_id", "knowledge_type", "eff_layers_pr", "peak_layer", "window_width"]].head(3).round(2)
      probe_id knowledge_type  eff_layers_pr  peak_layer  window_width
    0     p000   definitional           3.92           3             3
    1     p001    associative           4.32           2             4
    2     p002   definitional           4.62           3             4
    """
    contrib = contributions(data, dv, subject, between, **options)
    return measures_from_contributions(contrib, subject, between, coverage=coverage)


def measures_from_contributions(contrib: pd.DataFrame, subject: str = "probe_id", between: str | None = None, *,
                                coverage: float = COVERAGE) -> pd.DataFrame:
    """:func:`localization_measures` from a :func:`contributions` table (a caller holding both computes the
    profiles once)."""
    rows = []
    book = [c for c in BOOK_COLUMNS if c in contrib.columns]
    for key, part in contrib.groupby(subject, sort=True):
        first = part.iloc[0]
        depth = int(first["n_layers"]) if "n_layers" in part else None
        m = profile_measures(part["contribution"].to_numpy(float), part["layer"].to_numpy(int), n_layers=depth,
                             coverage=coverage)
        row = {subject: key, **({between: first[between]} if between else {}), **m,
               "note": "" if m["total_abs"] > 0 else "every contribution is 0: no profile shape"}
        row.update({c: first[c] for c in book})
        rows.append(row)
    columns = [subject, *([between] if between else []), *PROFILE_COLUMNS, "note", *book]
    return pd.DataFrame(rows, columns=columns)


def hodges_lehmann(a: Sequence[float], b: Sequence[float]) -> float:
    """The Hodges-Lehmann shift of ``a`` over ``b``: the median of all ``len(a) * len(b)`` differences
    ``a_i - b_j`` (robust to outlying probes; 0 when the groups are shifted copies with no shift)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.median(np.subtract.outer(a, b))) if len(a) and len(b) else np.nan


def permutation_test(a: Sequence[float], b: Sequence[float], *, n_resamples: int = N_RESAMPLES,
                     seed: int = 0) -> tuple[float, float, bool]:
    """Two-sided permutation test of ``mean(a) - mean(b)``: ``(difference, p, exact)``.

    :func:`scipy.stats.permutation_test` with independent relabelling: exact (every distinct split of the pooled
    values) when there are at most ``n_resamples`` of them, else ``n_resamples`` random splits from
    ``numpy.random.default_rng(seed)``, p = (hits + 1) / (n_resamples + 1). Two-sided p is twice the smaller
    one-sided p (scipy's rule), at most 1.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    exact = math.comb(len(a) + len(b), len(a)) <= n_resamples

    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    res = sps.permutation_test((a, b), diff, permutation_type="independent", vectorized=True,
                               n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.statistic), float(res.pvalue), exact


def compare_localization(measures: pd.DataFrame, between: str, *, measure_names: Sequence[str] = MEASURES,
                         n_resamples: int = N_RESAMPLES, seed: int = 0, ci: float = 0.95,
                         padjust: str = "holm") -> pd.DataFrame:
    """Group comparison of the measures of one slice (a :func:`localization_measures` table): one row per pair of groups
    and measure, :data:`TEST_COLUMNS` then the book-keeping columns.

    ``diff`` is ``mean_A - mean_B`` (groups sorted by name), ``ci_low`` / ``ci_high`` its Welch t interval,
    ``p_perm`` the permutation test (:func:`permutation_test`; ``perm_exact`` whether it enumerated every split),
    ``hl_shift`` the Hodges-Lehmann shift, ``U`` / ``p_mwu`` the Mann-Whitney test of A against B (scipy's exact
    distribution for small samples without ties, else the normal approximation), ``cles`` = U / (n_A n_B) (the
    chance a probe of A scores higher, ties half). ``p_perm_holm`` / ``p_mwu_holm``: ``padjust`` across the
    measures of the pair (:func:`pingouin.multicomp`). ``more_localized`` names the group the difference points to
    for the concentration measures (:data:`LOCALIZING`), whatever its p-value. A measure with fewer than 2 finite
    values in a group, or no variance in either, is left NaN with a ``note``.

    Examples
    --------
    >>> import pandas as pd
    >>> m = pd.DataFrame({"probe_id": list("abcdef"), "g": ["x", "x", "x", "y", "y", "y"],
    ...                   "eff_layers_pr": [1.0, 1.2, 1.1, 2.0, 2.4, 2.2]})
    >>> t = compare_localization(m, "g", measure_names=["eff_layers_pr"])
    >>> t[["A", "B", "diff", "p_perm", "perm_exact", "hl_shift", "U", "more_localized"]].round(3)
       A  B  diff  p_perm  perm_exact  hl_shift    U more_localized
    0  x  y  -1.1     0.1        True      -1.1  0.0              x
    """
    import pingouin as pg

    groups = sorted(measures[between].dropna().unique().tolist(), key=str)
    book = {c: measures[c].iloc[0] for c in BOOK_COLUMNS if c in measures.columns and len(measures)}
    rows = []
    for ga, gb in itertools.combinations(groups, 2):
        pair = [_compare_one(measures, between, ga, gb, name, n_resamples, seed, ci) for name in measure_names]
        for col in ("p_perm", "p_mwu"):
            p = np.array([r[col] for r in pair], float)
            adjusted = np.full(len(p), np.nan)
            finite = np.isfinite(p)
            if finite.any():
                adjusted[finite] = pg.multicomp(p[finite], method=padjust)[1]
            for r, q in zip(pair, adjusted, strict=True):
                r[f"{col}_holm"] = float(q)
        rows += [{**r, **book} for r in pair]
    return pd.DataFrame(rows, columns=[*TEST_COLUMNS, *book])


def _compare_one(measures: pd.DataFrame, between: str, ga: Any, gb: Any, name: str, n_resamples: int, seed: int,
                 ci: float) -> dict[str, Any]:
    """One row of :func:`compare_localization`."""
    a = measures.loc[measures[between] == ga, name].to_numpy(float)
    b = measures.loc[measures[between] == gb, name].to_numpy(float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    row: dict[str, Any] = {"measure": name, "A": ga, "B": gb, "n_A": len(a), "n_B": len(b),
                           "mean_A": float(a.mean()) if len(a) else np.nan,
                           "mean_B": float(b.mean()) if len(b) else np.nan, "perm_exact": pd.NA, "note": ""}
    row["diff"] = row["mean_A"] - row["mean_B"]
    nan = dict.fromkeys(("ci_low", "ci_high", "p_perm", "hl_shift", "U", "p_mwu", "cles"), np.nan)
    if len(a) < 2 or len(b) < 2:
        return {**row, **nan, "more_localized": pd.NA,
                "note": f"fewer than 2 probes with a value in a group ({len(a)} and {len(b)})"}
    if np.ptp(np.concatenate([a, b])) == 0:
        return {**row, **nan, "more_localized": pd.NA, "note": "every probe has the same value: nothing to test"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group without variance: Welch's interval is NaN
        welch = sps.ttest_ind(a, b, equal_var=False).confidence_interval(ci)
    _, p_perm, exact = permutation_test(a, b, n_resamples=n_resamples, seed=seed)
    mwu = sps.mannwhitneyu(a, b, alternative="two-sided")
    row.update(ci_low=float(welch.low), ci_high=float(welch.high), p_perm=p_perm, perm_exact=exact,
               hl_shift=hodges_lehmann(a, b), U=float(mwu.statistic), p_mwu=float(mwu.pvalue),
               cles=float(mwu.statistic) / (len(a) * len(b)))
    sign = LOCALIZING.get(name)
    row["more_localized"] = (pd.NA if sign is None or row["diff"] == 0
                             else (ga if sign * row["diff"] > 0 else gb))
    if not (np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])):
        row["note"] = "no variance within either group: no Welch interval"
    return row


def summarize_localization(measures: pd.DataFrame, between: str | None = None, *,
                           measure_names: Sequence[str] = MEASURES, ci: float = 0.95) -> pd.DataFrame:
    """Per group (or over all subjects) and measure: ``n``, ``mean``, ``sd``, the t interval of the mean
    (``ci_low``, ``ci_high``) and the ``median``; then the book-keeping columns. NaN values (flat-zero profiles)
    are left out of ``n``."""
    book = {c: measures[c].iloc[0] for c in BOOK_COLUMNS if c in measures.columns and len(measures)}
    parts = ([(g, measures[measures[between] == g]) for g in sorted(measures[between].dropna().unique(), key=str)]
             if between else [(None, measures)])
    rows = []
    for g, part in parts:
        for name in measure_names:
            x = part[name].to_numpy(float)
            x = x[np.isfinite(x)]
            low, high = t_interval(x, ci) if len(x) >= 2 else (np.nan, np.nan)
            rows.append({**({between: g} if between else {}), "measure": name, "n": len(x),
                         "mean": float(x.mean()) if len(x) else np.nan,
                         "sd": float(x.std(ddof=1)) if len(x) >= 2 else np.nan,
                         "ci_low": float(low), "ci_high": float(high),
                         "median": float(np.median(x)) if len(x) else np.nan, **book})
    return pd.DataFrame(rows, columns=[*([between] if between else []), *GROUP_COLUMNS, *book])


def localization_tables(
    data: pd.DataFrame,
    units: pd.DataFrame,
    *,
    dv: str = "recovery",
    group: str | None = None,
    subject: str = "probe_id",
    n_layers: int | None = None,
    cross_model: bool = False,
    position_reduction: str | int = "last",
    subject_field: str = "subject",
    agg: str | None = None,
    missing: str = "drop_subjects",
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Every slice of ``units`` (:func:`analyses.select.analysis_units`): the four tables of :data:`TABLE_FILES`
    and the slices that could not be profiled (``test`` = ``localization``, with the reason: e.g. a raw module
    site, whose output may be cumulative), for :func:`analyses.pipeline.analyze`."""
    collected: dict[str, list[pd.DataFrame]] = {k: [] for k in TABLE_FILES}
    skipped: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)  # counts are in the other tables and the caveats
        for unit in units.to_dict("records"):
            sel = {c: unit[c] for c in SELECT_COLUMNS if c in unit}
            try:
                contrib = contributions(data, dv, subject, group, n_layers=n_layers, cross_model=cross_model,
                                        position_reduction=position_reduction, subject_field=subject_field, agg=agg,
                                        missing=missing, **sel)
            except ClapError as exc:
                skipped.append({**sel, "test": "localization", "reason": str(exc)})
                continue
            measures = measures_from_contributions(contrib, subject, group)
            collected["localization_contributions"].append(contrib)
            collected["localization"].append(measures)
            collected["localization_groups"].append(summarize_localization(measures, group))
            if group and measures[group].nunique() >= 2:
                collected["localization_tests"].append(
                    compare_localization(measures, group, n_resamples=n_resamples, seed=seed))
            elif group:
                skipped.append({**sel, "test": "localization_tests",
                                "reason": f"only one {group} group: no group comparison"})
    g = [group] if group else []
    columns = {
        "localization_contributions": [subject, *g, "layer", "contribution", "rel_depth", "share", *BOOK_COLUMNS],
        "localization": [subject, *g, *PROFILE_COLUMNS, "note", *BOOK_COLUMNS],
        "localization_groups": [*g, *GROUP_COLUMNS, *BOOK_COLUMNS],
        "localization_tests": [*TEST_COLUMNS, *BOOK_COLUMNS],
    }
    tables = {name: _concat(frames, columns[name]) for name, frames in collected.items()}
    return tables, skipped


def _concat(frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def localization_methods(tables: dict[str, pd.DataFrame], group: str | None = None) -> list[str]:
    """The Methods sentences of the localization profiles (none when no slice was profiled): what a contribution
    is per site kind (the residual stream converted to increments, said so), the measures, and the tests run."""
    loc = tables.get("localization")
    if loc is None or not len(loc):
        return []
    bases = sorted(set(loc["basis"].dropna()))
    depths = sorted(set(loc["n_layers"].dropna().astype(int)))
    out = [
        "Localization profiles: per probe and slice, one contribution per layer, never a cumulative quantity: "
        + "; ".join(f"`{b}`" for b in bases) + ". The residual stream's recovery at the last token rises to 1 by "
        "construction, so it is converted to layer-to-layer increments (the block between two states) rather than "
        "profiled as it is. Rows of multi-layer windows are left out.",
        "Measures of |contribution| (signs only in the negative share): effective number of layers as the "
        "participation ratio (sum|c|)^2 / sum c^2 and as exp of the entropy of |c| / sum|c|; the peak layer and "
        f"its share of the total; the narrowest contiguous window of layers holding >= {int(COVERAGE * 100)} % of "
        "the total; the centre of mass and the peak in relative depth (layer / n_layers, n_layers = "
        + ", ".join(map(str, depths)) + "); the share of negative contribution. Group means with 95 % t "
        "intervals.",
    ]
    tests = tables.get("localization_tests")
    if group and tests is not None and len(tests):
        exact = tests["perm_exact"].dropna()
        how = ("exact (every split enumerated)" if len(exact) and exact.astype(bool).all() else
               f"{N_RESAMPLES} seeded random relabellings (exact where the splits number fewer)")
        out.append(f"Localization by `{group}`: for each pair of groups and measure, the difference of means with "
                   f"its 95 % Welch t interval and a two-sided permutation test of the difference ({how}; "
                   "scipy.stats.permutation_test), the Hodges-Lehmann shift and the Mann-Whitney U test; "
                   f"p-values Holm-corrected across the {len(MEASURES)} measures of each slice and pair. Fewer "
                   "effective layers, a larger peak share and a narrower window mean more localized.")
    return out
