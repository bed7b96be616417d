"""Tests of whether patching recovers the answer differently across layers and between probe groups.

Every function takes the tidy results (or any frame with the ``dv``, ``within``, ``subject`` and ``between``
columns), reduces them with :func:`analyses.select.prepare` (selection, exclusion of trivial and undefined rows,
position rule, missing-cell policy: read that module's docstring) and returns a pandas DataFrame, in the style of
pingouin, whose computations it relies on. Keyword names are the same everywhere: ``dv="recovery"``,
``within="layer"``, ``subject="probe_id"``, ``between="knowledge_type"``; the selection keywords (``metric``,
``site_kind``, ``operation``, ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``) are passed
on to :func:`~analyses.select.prepare`.

Every table ends with the same book-keeping columns, so tables from several slices can be concatenated and still
be read on their own:

``dv``, ``metric``, ``site_kind``, ``operation``, ``direction``, ``positions``
    the dependent variable and the slice tested (NA where the input has no such column).
``n_subjects``
    probes that entered the test (complete after the missing-cell policy).
``n_levels``
    levels of ``within`` tested.
``n_dropped``
    probes removed as incomplete.
``n_undefined``
    rows excluded because ``dv`` was undefined (e.g. recovery with a zero denominator, or infinite).
``reduction``
    how each probe's rows in one level became one value (positions, heads; :mod:`analyses.reductions`).

Too little data is an error, not a table of NaNs: a :class:`~clap.errors.ClapError` says what is missing. So is a
test whose error variance is zero relative to the data (e.g. every probe's profile is the same up to a constant):
the F ratio or t would be a division by rounding noise (F = 3e32), not evidence.

Effect sizes come with confidence intervals: partial eta squared (``np2_ci_low``, ``np2_ci_high``) by inverting
the noncentral F distribution for its noncentrality ``lambda`` (Steiger 2004) and converting with
``np2 = lambda / (lambda + ddof1 + ddof2 + 1)`` (uncorrected degrees of freedom); Hedges' g (``hedges_ci_low``,
``hedges_ci_high``) with :func:`pingouin.compute_esci`'s normal-approximation standard error and t critical value.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from analyses.select import Prepared, prepare
from clap.errors import ClapError


def _require_statistic(table: pd.DataFrame, column: str, test: str, prep: Prepared) -> None:
    """pingouin drops the statistic (or returns NaN) when the data have no variance, e.g. patching a token the two
    prompts share gives exactly 0 for every probe: say so instead of failing on a missing column."""
    values = pd.to_numeric(table[column], errors="coerce") if column in table else pd.Series([np.nan])
    if values.isna().all():
        raise ClapError(
            f"the {test} is undefined for {prep.dv}: the values do not vary (e.g. every probe recovers exactly the "
            f"same at every level), so there is no error variance to test against"
        )


#: Residual RMS below this fraction of the data's largest magnitude counts as no error variance (rounding noise).
RELATIVE_TOLERANCE = 1e-9


def _no_variance(residuals: np.ndarray, values: np.ndarray) -> bool:
    """True when the residuals are rounding noise relative to the data scale (both may be exactly 0)."""
    residuals = np.asarray(residuals, float)
    scale = float(np.max(np.abs(values))) if np.size(values) else 0.0
    rms = float(np.sqrt(np.mean(residuals**2))) if residuals.size else 0.0
    return rms <= RELATIVE_TOLERANCE * scale or rms == 0.0


def _require_error_variance(prep: Prepared, test: str, between: str | None = None) -> None:
    """Refuse a test whose error term is zero: the F ratio would divide by rounding noise."""
    wide = prep.data.pivot(index=prep.subject, columns=prep.within, values=prep.dv)
    x = wide.to_numpy(float)
    if between:
        groups = prep.data.drop_duplicates(prep.subject).set_index(prep.subject)[between].reindex(wide.index)
        cell = wide.groupby(groups.to_numpy()).transform("mean").to_numpy(float)
        resid = x - x.mean(axis=1, keepdims=True) - cell + cell.mean(axis=1, keepdims=True)
    else:
        resid = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + x.mean()
    if _no_variance(resid, x):
        raise ClapError(
            f"the {test} is undefined for {prep.dv}{_where(prep)}: no error variance: the values do not vary "
            f"beyond a constant per {prep.subject} (the {prep.within} x {prep.subject} residuals are zero relative to "
            "the data), so an F ratio would divide by rounding noise"
        )


def _where(prep: Prepared) -> str:
    parts = [f"{k}={v}" for k, v in prep.selection.items() if v is not None]
    return f" ({', '.join(parts)})" if parts else ""


def np2_ci(F: float, ddof1: float, ddof2: float, ci: float = 0.95) -> tuple[float, float]:
    """Confidence interval of partial eta squared by inverting the noncentral F for its noncentrality.

    The bounds ``lambda_L``, ``lambda_U`` solve ``ncf.cdf(F, ddof1, ddof2, lambda) = (1 + ci) / 2`` and
    ``(1 - ci) / 2`` (a bound is 0 when even ``lambda = 0`` is beyond it) and are converted with
    ``lambda / (lambda + ddof1 + ddof2 + 1)``.
    """
    from scipy import optimize
    from scipy import stats as sps

    if not np.isfinite(F) or F < 0:
        return np.nan, np.nan

    def bound(target: float) -> float:
        f = lambda lam: sps.ncf.cdf(F, ddof1, ddof2, lam) - target  # noqa: E731 - decreasing in lam
        if f(0.0) <= 0:
            return 0.0
        hi = max(10.0, 2 * F * ddof1)
        while f(hi) > 0:
            hi *= 2
        return float(optimize.brentq(f, 0.0, hi, xtol=1e-10))

    n = ddof1 + ddof2 + 1
    lo, up = bound((1 + ci) / 2), bound((1 - ci) / 2)
    return lo / (lo + n), up / (up + n)


def hedges_ci(g: np.ndarray, nx: np.ndarray, ny: np.ndarray | None = None, paired: bool = False,
              ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Confidence interval of Hedges' g by :func:`pingouin.compute_esci` (``ny=None``: one-sample)."""
    with _quiet_pingouin() as pg:
        g = np.atleast_1d(np.asarray(g, float))
        nx = np.broadcast_to(np.asarray(nx), g.shape)
        ny_ = np.broadcast_to(np.asarray(1 if ny is None else ny), g.shape)
        out = [pg.compute_esci(float(v), nx=int(a), ny=int(b), paired=paired, eftype="hedges", confidence=ci,
                               decimals=12)
               if np.isfinite(v) and a > 1 else (np.nan, np.nan) for v, a, b in zip(g, nx, ny_, strict=True)]
    arr = np.asarray(out, float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


@contextlib.contextmanager
def _quiet_pingouin() -> Iterator[Any]:
    """pingouin 0.7 calls pandas APIs that warn about their own deprecation; those warnings are not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        import pingouin as pg

        yield pg


def _annotate(table: pd.DataFrame, prep: Prepared) -> pd.DataFrame:
    table = table.reset_index(drop=True)
    for key, value in prep.summary().items():
        table[key] = value
    return table


RM_COLUMNS = [
    "Source", "SS", "SS_error", "ddof1", "ddof2", "MS", "MS_error", "F", "p_unc", "eps", "ddof1_GG", "ddof2_GG",
    "p_GG_corr", "np2", "np2_ci_low", "np2_ci_high", "sphericity", "W_spher", "p_spher",
]


def rm_anova(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    **select: Any,
) -> pd.DataFrame:
    """One-way repeated-measures ANOVA of ``dv`` across ``within``, probes as subjects, with sphericity checks.

    Layers are measured on the same probes, so a between-subjects ANOVA would treat correlated values as
    independent; this one removes probe-to-probe variation. Its F test assumes sphericity (equal variances of all
    pairwise layer differences), which layer profiles often violate (neighbouring layers correlate more than distant
    ones), so Mauchly's test and the Greenhouse-Geisser corrected p are always reported: read ``p_GG_corr`` when
    ``sphericity`` is False.

    Returns one row with columns:

    ``Source`` (the ``within`` name), ``SS`` / ``SS_error`` (sums of squares of the effect and of the
    effect x subject error), ``ddof1`` / ``ddof2`` (degrees of freedom k-1 and (k-1)(n-1)), ``MS`` / ``MS_error``,
    ``F``, ``p_unc`` (uncorrected p), ``eps`` (Greenhouse-Geisser epsilon, 1 for two levels), ``ddof1_GG`` /
    ``ddof2_GG`` (degrees of freedom times ``eps``), ``p_GG_corr`` (p on the corrected degrees of freedom),
    ``np2`` (partial eta squared SS / (SS + SS_error)) and its 95 % interval ``np2_ci_low`` / ``np2_ci_high``
    (module docstring), ``sphericity`` (Mauchly's test not significant at 0.05;
    True for two levels, NA when Mauchly's test is undefined because there are fewer probes than levels),
    ``W_spher`` / ``p_spher`` (Mauchly's W and its p; NA when undefined or for two levels), then the
    book-keeping columns of the module docstring.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within`` and ``subject``
        columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The repeated factor.
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        One row, the columns listed above.

    Raises
    ------
    clap.errors.ClapError
        Ambiguous or empty selection, too few complete probes or levels, or no error variance.

    Examples
    --------
    >>> from analyses import rm_anova
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> aov = rm_anova(data, site_kind="mlp_out")
    >>> aov[["Source", "ddof1", "ddof2", "F", "np2"]].round(3)
      Source  ddof1  ddof2      F    np2
    0  layer      3     21  9.396  0.573
    >>> bool(aov["p_GG_corr"].iloc[0] < 0.01)
    True
    """
    prep = prepare(data, dv, within, subject, **select)
    _require_error_variance(prep, "repeated-measures ANOVA")
    with _quiet_pingouin() as pg:
        detailed = pg.rm_anova(prep.data, dv=dv, within=within, subject=subject, detailed=True, correction=True,
                               effsize="np2")
    _require_statistic(detailed, "F", "repeated-measures ANOVA", prep)
    effect, error = detailed.iloc[0], detailed.iloc[1]
    k, n = len(prep.levels), prep.n_subjects
    eps = float(effect["eps"]) if "eps" in detailed and pd.notna(effect.get("eps")) else 1.0
    ddof1, ddof2 = int(effect["DF"]), int(error["DF"])
    row: dict[str, Any] = {
        "Source": within,
        "SS": float(effect["SS"]),
        "SS_error": float(error["SS"]),
        "ddof1": ddof1,
        "ddof2": ddof2,
        "MS": float(effect["MS"]),
        "MS_error": float(error["MS"]),
        "F": float(effect["F"]),
        "p_unc": float(effect["p_unc"]),
        "eps": eps,
        "ddof1_GG": ddof1 * eps,
        "ddof2_GG": ddof2 * eps,
        "p_GG_corr": float(effect["p_GG_corr"]) if "p_GG_corr" in detailed else float(effect["p_unc"]),
        "np2": float(effect["np2"]),
    }
    row["np2_ci_low"], row["np2_ci_high"] = np2_ci(row["F"], ddof1, ddof2)
    row.update(_sphericity(effect, k, n))
    return _annotate(pd.DataFrame([row], columns=RM_COLUMNS), prep)


def _sphericity(effect: pd.Series, k: int, n: int) -> dict[str, Any]:
    """Mauchly's test as pingouin reports it, except where it is undefined (then NA, not a misleading 0 or 1)."""
    if k == 2:
        return {"sphericity": True, "W_spher": np.nan, "p_spher": np.nan}
    if n < k or "W_spher" not in effect:  # the (k-1)x(k-1) covariance of contrasts is singular
        return {"sphericity": pd.NA, "W_spher": np.nan, "p_spher": np.nan}
    return {"sphericity": bool(effect["sphericity"]), "W_spher": float(effect["W_spher"]),
            "p_spher": float(effect["p_spher"])}


FRIEDMAN_COLUMNS = ["Source", "Q", "ddof1", "p_unc", "W"]


def friedman(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    **select: Any,
) -> pd.DataFrame:
    """Friedman's rank test of ``dv`` across ``within``: the non-parametric alternative to :func:`rm_anova`.

    Recoveries are bounded, often skewed and pile up at 0 and 1; ranks within each probe make no assumption about
    their distribution. Returns one row with columns ``Source``, ``Q`` (Friedman chi-square, corrected for ties),
    ``ddof1`` (k-1), ``p_unc`` (chi-square p), ``W`` (Kendall's coefficient of concordance, an effect size in
    [0, 1]), then the book-keeping columns.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within`` and ``subject``
        columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The repeated factor.
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        One row, the columns listed above.

    Examples
    --------
    >>> from analyses import friedman
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> friedman(data, site_kind="mlp_out")[["Source", "Q", "ddof1", "p_unc", "W"]].round(3)
      Source      Q  ddof1  p_unc      W
    0  layer  15.15      3  0.002  0.631
    """
    prep = prepare(data, dv, within, subject, **select)
    with _quiet_pingouin() as pg:
        res = pg.friedman(prep.data, dv=dv, within=within, subject=subject, method="chisq")
    _require_statistic(res, "Q", "Friedman test", prep)
    r = res.iloc[0]
    row = {"Source": within, "Q": float(r["Q"]), "ddof1": int(r["ddof1"]), "p_unc": float(r["p_unc"]),
           "W": float(r["W"])}
    return _annotate(pd.DataFrame([row], columns=FRIEDMAN_COLUMNS), prep)


MIXED_COLUMNS = [
    "Source", "SS", "ddof1", "ddof2", "MS", "F", "p_unc", "eps", "p_GG_corr", "np2", "np2_ci_low", "np2_ci_high",
    "sphericity", "W_spher", "p_spher", "ss_type",
]


def mixed_anova(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    between: str = "knowledge_type",
    subject: str = "probe_id",
    ss_type: int = 2,
    **select: Any,
) -> pd.DataFrame:
    """Mixed ANOVA: ``within`` (repeated over probes) x ``between`` (a probe's group), interaction included.

    The interaction row answers the question a group contrast is usually about: do the groups (e.g. definitional
    vs associative knowledge) depend on *different layers*, not merely recover more overall. Returns three rows,
    ``Source`` = the ``between`` name, the ``within`` name and ``Interaction``, with columns ``SS``, ``ddof1``,
    ``ddof2``, ``MS``, ``F``, ``p_unc``, ``eps`` (Greenhouse-Geisser epsilon; NA for the between row),
    ``p_GG_corr`` (NA for the between row, which needs no correction), ``np2`` (partial eta squared),
    ``sphericity``, ``W_spher``, ``p_spher`` (Mauchly's test on the within factor; NA where undefined), then the
    book-keeping columns. Each group needs at least 2 complete probes.

    Sums of squares with unbalanced groups (``ss_type``, recorded in the ``ss_type`` column): pingouin computes
    the within main effect from *weighted* marginal means (each layer's mean over all probes, so a larger group
    weighs more), which is Type II here (``ss_type=2``, the default; with complete within data it equals Type I).
    ``ss_type=3`` uses the *unweighted* mean of the group means at each layer (the hypothesis "the layer profile
    averaged over groups is flat", independent of group sizes): each probe's values are projected on k-1 orthonormal
    layer contrasts, each contrast score is regressed on the group with sum-to-zero coding (statsmodels OLS), and
    the Type III sums of squares of the intercept (the layer effect) and of the group (the interaction) are summed
    over contrasts. The between effect (a single factor on the probes' means) and the interaction are the same for
    both types; only the layer row changes, and for balanced groups nothing does.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within``, ``subject``
        and ``between`` columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The repeated factor.
    between : str, default "knowledge_type"
        A probe's group label (constant per ``subject``).
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    ss_type : {2, 3}, default 2
        Sums of squares of the within effect with unbalanced groups (see above).
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        Three rows (between, within, interaction), the columns listed above.

    Examples
    --------
    >>> from analyses import mixed_anova
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> aov = mixed_anova(data, between="knowledge_type", site_kind="mlp_out")
    >>> aov[["Source", "ddof1", "ddof2", "F", "np2"]].round(3)
               Source  ddof1  ddof2      F    np2
    0  knowledge_type      1      6  0.421  0.066
    1           layer      3     18  9.141  0.604
    2     Interaction      3     18  0.810  0.119
    """
    if ss_type not in (2, 3):
        raise ClapError(f"ss_type={ss_type!r}: expected 2 (pingouin, weighted means) or 3 (unweighted means)")
    prep = prepare(data, dv, within, subject, between=between, **select)
    _require_error_variance(prep, "mixed ANOVA", between=between)
    with _quiet_pingouin() as pg:
        res = pg.mixed_anova(prep.data, dv=dv, within=within, between=between, subject=subject, correction=True,
                             effsize="np2")
    _require_statistic(res, "F", "mixed ANOVA", prep)
    if ss_type == 3:
        res = _type3_within(res, prep, between)
    k = len(prep.levels)
    # Mauchly's test uses the pooled within-group covariance, of rank n - g: undefined below k - 1.
    n_eff = prep.n_subjects - prep.data[between].nunique() + 1
    rows = []
    for i, r in res.iterrows():
        is_between = i == 0
        row = {
            "Source": r["Source"],
            "SS": float(r["SS"]),
            "ddof1": int(r["DF1"]),
            "ddof2": int(r["DF2"]),
            "MS": float(r["MS"]),
            "F": float(r["F"]),
            "p_unc": float(r["p_unc"]),
            "np2": float(r["np2"]),
        }
        if is_between:
            row.update(eps=np.nan, p_GG_corr=np.nan, sphericity=pd.NA, W_spher=np.nan, p_spher=np.nan)
        else:
            eps = float(r["eps"]) if "eps" in r and pd.notna(r["eps"]) else 1.0
            p_gg = float(r["p_GG_corr"]) if "p_GG_corr" in r and pd.notna(r["p_GG_corr"]) else float(r["p_unc"])
            row.update(eps=eps, p_GG_corr=p_gg, **_sphericity(r, k, n_eff))
        row["np2_ci_low"], row["np2_ci_high"] = np2_ci(row["F"], row["ddof1"], row["ddof2"])
        row["ss_type"] = ss_type
        rows.append(row)
    return _annotate(pd.DataFrame(rows, columns=MIXED_COLUMNS), prep)


def _type3_within(res: pd.DataFrame, prep: Prepared, between: str) -> pd.DataFrame:
    """Replace the within row of pingouin's mixed ANOVA by its Type III (unweighted-means) version."""
    import statsmodels.formula.api as smf
    from scipy import linalg
    from scipy import stats as sps
    from statsmodels.stats.anova import anova_lm

    wide = prep.data.pivot(index=prep.subject, columns=prep.within, values=prep.dv).sort_index(axis=1)
    groups = prep.data.drop_duplicates(prep.subject).set_index(prep.subject)[between].reindex(wide.index)
    k = wide.shape[1]
    contrasts = linalg.null_space(np.ones((1, k)))  # k x (k-1), orthonormal, orthogonal to the constant
    scores = wide.to_numpy(float) @ contrasts
    ss_within = ss_inter = ss_error = 0.0
    for c in range(scores.shape[1]):
        frame = pd.DataFrame({"y": scores[:, c], "g": groups.astype(str).to_numpy()})
        table = anova_lm(smf.ols("y ~ C(g, Sum)", data=frame).fit(), typ=3)
        ss_within += float(table.loc["Intercept", "sum_sq"])
        ss_inter += float(table.loc["C(g, Sum)", "sum_sq"])
        ss_error += float(table.loc["Residual", "sum_sq"])
    res = res.copy()
    w = res.index[res["Source"] == prep.within][0]
    df1, df2 = float(res.loc[w, "DF1"]), float(res.loc[w, "DF2"])
    F = (ss_within / df1) / (ss_error / df2)
    eps = float(res.loc[w, "eps"]) if "eps" in res and pd.notna(res.loc[w, "eps"]) else 1.0
    res.loc[w, ["SS", "MS", "F"]] = [ss_within, ss_within / df1, F]
    res.loc[w, "p_unc"] = float(sps.f.sf(F, df1, df2))
    if "p_GG_corr" in res:
        res.loc[w, "p_GG_corr"] = float(sps.f.sf(F, df1 * eps, df2 * eps))
    res.loc[w, "np2"] = ss_within / (ss_within + ss_error)
    return res


PAIRWISE_WITHIN_COLUMNS = [
    "Contrast", "A", "B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr", "p_adjust", "hedges",
    "hedges_ci_low", "hedges_ci_high", "n", "note",
]


def pairwise_within(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    padjust: str = "holm",
    **select: Any,
) -> pd.DataFrame:
    """Paired t-tests between every pair of ``within`` levels, corrected together for multiple comparisons.

    After an ANOVA says layers differ, this says which: all k(k-1)/2 pairs, Holm-corrected (``padjust``, any
    method of :func:`pingouin.multicomp`), which controls the family-wise error without Bonferroni's loss of power.

    Columns: ``Contrast`` (the ``within`` name), ``A``, ``B`` (the two levels, A < B), ``mean_A``, ``mean_B``,
    ``diff`` (mean_A - mean_B), ``T`` (paired t), ``dof`` (n-1), ``p_unc``, ``p_corr`` (adjusted over all pairs),
    ``p_adjust`` (the method), ``hedges`` (Hedges' g of A vs B: Cohen's d_av, the mean difference over the root
    mean of the two variances, times the small-sample factor 1 - 3/(4(2n)-9)) with ``hedges_ci_low`` /
    ``hedges_ci_high``, ``n`` (pairs), ``note`` (why a pair's test is undefined: its differences do not vary, so
    T would divide by rounding noise; ``T`` and the p-values are then NaN and the pair leaves the correction
    family), then the book-keeping columns.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within`` and ``subject``
        columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The repeated factor whose levels are compared pairwise.
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    padjust : str, default "holm"
        Multiple-comparison correction, any method of :func:`pingouin.multicomp`.
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per pair of levels, the columns listed above.

    Examples
    --------
    >>> from analyses import pairwise_within
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> pw = pairwise_within(data, site_kind="mlp_out")
    >>> pw[["A", "B", "diff", "T", "p_corr"]].round(3)
       A  B   diff      T  p_corr
    0  0  1 -0.202 -2.070   0.154
    1  0  2 -0.387 -4.174   0.021
    2  0  3 -0.002 -0.023   0.982
    3  1  2 -0.185 -2.887   0.094
    4  1  3  0.200  2.668   0.096
    5  2  3  0.385  5.292   0.007
    """
    prep = prepare(data, dv, within, subject, **select)
    with _quiet_pingouin() as pg:
        res = pg.pairwise_tests(prep.data, dv=dv, within=within, subject=subject, padjust=padjust, effsize="hedges")
    _require_statistic(res, "T", "pairwise tests", prep)
    means = prep.data.groupby(within)[dv].mean()
    out = pd.DataFrame(
        {
            "Contrast": within,
            "A": res["A"].to_numpy(),
            "B": res["B"].to_numpy(),
            "mean_A": means.loc[res["A"]].to_numpy(),
            "mean_B": means.loc[res["B"]].to_numpy(),
            "T": res["T"].astype(float).to_numpy(),
            "dof": res["dof"].astype(float).to_numpy(),
            "p_unc": res["p_unc"].astype(float).to_numpy(),
            "p_corr": (res["p_corr"] if "p_corr" in res else res["p_unc"]).astype(float).to_numpy(),
            "p_adjust": padjust,
            "hedges": res["hedges"].astype(float).to_numpy(),
            "n": prep.n_subjects,
        }
    )
    out["diff"] = out["mean_A"] - out["mean_B"]
    wide = prep.data.pivot(index=subject, columns=within, values=dv)
    scale = wide.to_numpy(float)
    note = []
    for a, b in zip(out["A"], out["B"], strict=True):
        d = (wide[a] - wide[b]).to_numpy(float)
        note.append("undefined: the paired differences do not vary" if _no_variance(d - d.mean(), scale) else "")
    out["note"] = note
    bad = out["note"] != ""
    if bad.any():
        out.loc[bad, ["T", "p_unc", "p_corr", "hedges"]] = np.nan
        with _quiet_pingouin() as pg:
            out["p_corr"] = pg.multicomp(out["p_unc"].to_numpy(float), method=padjust)[1]
    out["hedges_ci_low"], out["hedges_ci_high"] = hedges_ci(out["hedges"].to_numpy(float), prep.n_subjects,
                                                            prep.n_subjects, paired=True)
    return _annotate(out[PAIRWISE_WITHIN_COLUMNS], prep)


PAIRWISE_BETWEEN_COLUMNS = [
    "level", "Contrast", "A", "B", "n_A", "n_B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr",
    "p_adjust", "hedges", "hedges_ci_low", "hedges_ci_high", "note",
]


def pairwise_between(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    between: str = "knowledge_type",
    subject: str = "probe_id",
    padjust: str = "holm",
    **select: Any,
) -> pd.DataFrame:
    """Welch t-tests between every pair of groups at each level of ``within`` ("at which layers do they differ?").

    Groups hold different probes, so the tests are unpaired; Welch's version does not assume equal variances or
    sizes. All tests (levels x group pairs) form one family for the ``padjust`` correction (Holm by default).

    Columns: ``level`` (the ``within`` value), ``Contrast`` (the ``between`` name), ``A``, ``B`` (group labels,
    sorted), ``n_A``, ``n_B``, ``mean_A``, ``mean_B``, ``diff`` (mean_A - mean_B), ``T`` (Welch t), ``dof``
    (Welch-Satterthwaite), ``p_unc``, ``p_corr``, ``p_adjust``, ``hedges`` (Hedges' g with the pooled SD and the
    factor 1 - 3/(4(n_A+n_B)-9)) with ``hedges_ci_low`` / ``hedges_ci_high``, ``note`` (why a test is undefined:
    neither group's values vary; its T and p are then NaN), then the book-keeping columns.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within``, ``subject``
        and ``between`` columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        The factor at each of whose levels the groups are compared.
    between : str, default "knowledge_type"
        A probe's group label (constant per ``subject``).
    subject : str, default "probe_id"
        The unit measured at every level of ``within``.
    padjust : str, default "holm"
        Multiple-comparison correction over all tests, any method of :func:`pingouin.multicomp`.
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per level and pair of groups, the columns listed above.

    Examples
    --------
    >>> from analyses import pairwise_between
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> pb = pairwise_between(data, site_kind="mlp_out")
    >>> pb[["level", "A", "B", "diff", "T", "p_corr"]].round(3)
       level            A             B   diff      T  p_corr
    0      0  associative  definitional  0.063  0.525   1.000
    1      1  associative  definitional -0.011 -0.083   1.000
    2      2  associative  definitional -0.199 -1.804   0.556
    3      3  associative  definitional -0.063 -0.378   1.000
    """
    prep = prepare(data, dv, within, subject, between=between, **select)
    groups = sorted(prep.data[between].unique().tolist(), key=str)
    rows = []
    with _quiet_pingouin() as pg:
        for level in prep.levels:
            at = prep.data[prep.data[within] == level]
            for a, b in itertools.combinations(groups, 2):
                x = at.loc[at[between] == a, dv].to_numpy(float)
                y = at.loc[at[between] == b, dv].to_numpy(float)
                if _no_variance(np.concatenate([x - x.mean(), y - y.mean()]), np.concatenate([x, y])):
                    rows.append({"level": level, "Contrast": between, "A": a, "B": b, "n_A": len(x), "n_B": len(y),
                                 "mean_A": x.mean(), "mean_B": y.mean(), "diff": x.mean() - y.mean(), "T": np.nan,
                                 "dof": np.nan, "p_unc": np.nan, "hedges": np.nan,
                                 "note": "undefined: the values do not vary within either group"})
                    continue
                t = pg.ttest(x, y, paired=False, correction=True)
                rows.append(
                    {
                        "level": level,
                        "Contrast": between,
                        "A": a,
                        "B": b,
                        "n_A": len(x),
                        "n_B": len(y),
                        "mean_A": x.mean(),
                        "mean_B": y.mean(),
                        "diff": x.mean() - y.mean(),
                        "T": float(t["T"].iloc[0]),
                        "dof": float(t["dof"].iloc[0]),
                        "p_unc": float(t["p_val"].iloc[0]) if "p_val" in t else float(t["p-val"].iloc[0]),
                        "hedges": float(pg.compute_effsize(x, y, paired=False, eftype="hedges")),
                        "note": "",
                    }
                )
        out = pd.DataFrame(rows)
        _, out["p_corr"] = pg.multicomp(out["p_unc"].to_numpy(float), method=padjust)
    out["p_adjust"] = padjust
    out["hedges_ci_low"], out["hedges_ci_high"] = hedges_ci(out["hedges"].to_numpy(float), out["n_A"].to_numpy(),
                                                            out["n_B"].to_numpy())
    return _annotate(out[PAIRWISE_BETWEEN_COLUMNS], prep)


ONE_SAMPLE_COLUMNS = [
    "n", "mean", "sd", "ci_low", "ci_high", "popmean", "T", "dof", "p_unc", "p_holm", "p_fdr_bh", "hedges",
    "hedges_ci_low", "hedges_ci_high", "note",
]


def one_sample(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    subject: str = "probe_id",
    between: str | None = None,
    popmean: float = 0.0,
    ci: float = 0.95,
    missing: str = "keep",
    **select: Any,
) -> pd.DataFrame:
    """Which layers recover at all? A one-sample t-test of ``dv`` against ``popmean`` (0: no recovery) per level.

    The omnibus ANOVA says layers *differ*; it does not say which recover anything. Each level (and each
    ``between`` group) is tested on its own probes, and the p-values of one group's levels form one family,
    corrected by Holm (family-wise error) and by Benjamini-Hochberg (false discovery rate), both with
    :func:`pingouin.multicomp`. Descriptive by nature, so ``missing="keep"`` lets every probe with a value count.

    Columns: ``within`` (and ``between``), ``n``, ``mean``, ``sd``, ``ci_low`` / ``ci_high`` (t interval of the
    mean), ``popmean``, ``T``, ``dof`` (n-1), ``p_unc``, ``p_holm``, ``p_fdr_bh``, ``hedges`` (Hedges' g: the
    mean difference over the SD times 1 - 3/(4(n-1)-1)) with ``hedges_ci_low`` / ``hedges_ci_high``, ``note``
    (why a test is undefined: fewer than 2 probes, or values that do not vary), then the book-keeping columns.

    Parameters
    ----------
    data : pandas.DataFrame
        The tidy results (:func:`analyses.load_results`) or any frame with the ``dv``, ``within`` and ``subject``
        columns.
    dv : str, default "recovery"
        The dependent variable.
    within : str, default "layer"
        One test per level of this column.
    subject : str, default "probe_id"
        The unit of observation.
    between : str, optional
        A group column: one test per level and group, one correction family per group.
    popmean : float, default 0.0
        The value tested against (0: no recovery).
    ci : float, default 0.95
        Level of the t interval of the mean and of the Hedges' g interval.
    missing : str, default "keep"
        Missing-cell policy of :func:`analyses.select.prepare`.
    **select
        Selection keywords passed on to :func:`analyses.select.prepare` (``metric``, ``site_kind``, ``operation``,
        ``direction``, ``positions``, ``agg``, ``missing``, ``include_trivial``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per level (and group), the columns listed above.

    Examples
    --------
    >>> from analyses.stats import one_sample
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> res = one_sample(data, site_kind="mlp_out")
    >>> res[["layer", "n", "mean", "T", "p_holm"]].round(3)
       layer  n   mean      T  p_holm
    0      0  8  0.190  3.359   0.024
    1      1  8  0.392  6.521   0.001
    2      2  8  0.577  9.117   0.000
    3      3  8  0.193  2.461   0.043
    """
    from analyses.bootstrap import t_interval

    prep = prepare(data, dv, within, subject, between=between, missing=missing,
                   min_subjects=2, min_per_group=1, min_groups=1, min_levels=1, **select)
    keys = [within] + ([between] if between else [])
    rows = []
    with _quiet_pingouin() as pg:
        for key, cell in prep.data.groupby(keys, sort=True):
            x = cell[dv].to_numpy(float)
            key = key if isinstance(key, tuple) else (key,)
            row: dict[str, Any] = dict(zip(keys, key, strict=True))
            row.update(n=len(x), mean=x.mean(), sd=x.std(ddof=1) if len(x) > 1 else np.nan, popmean=popmean,
                       T=np.nan, dof=len(x) - 1, p_unc=np.nan, hedges=np.nan, ci_low=np.nan, ci_high=np.nan, note="")
            if len(x) < 2:
                row["note"] = "undefined: fewer than 2 probes"
            elif _no_variance(x - x.mean(), np.append(x, popmean)):
                row["note"] = "undefined: the values do not vary"
            else:
                t = pg.ttest(x, popmean)
                low, high = t_interval(x, ci)
                row.update(T=float(t["T"].iloc[0]), p_unc=float(t["p_val"].iloc[0]), ci_low=float(low),
                           ci_high=float(high), hedges=float(pg.compute_effsize(x, popmean, eftype="hedges")))
            rows.append(row)
        out = pd.DataFrame(rows)
        out["p_holm"] = np.nan
        out["p_fdr_bh"] = np.nan
        families = out.groupby(between, sort=False).groups.values() if between else [out.index]
        for idx in families:
            p = out.loc[idx, "p_unc"].to_numpy(float)
            out.loc[idx, "p_holm"] = pg.multicomp(p, method="holm")[1]
            out.loc[idx, "p_fdr_bh"] = pg.multicomp(p, method="fdr_bh")[1]
    out["hedges_ci_low"], out["hedges_ci_high"] = hedges_ci(out["hedges"].to_numpy(float), out["n"].to_numpy(), ci=ci)
    return _annotate(out[keys + ONE_SAMPLE_COLUMNS], prep)
