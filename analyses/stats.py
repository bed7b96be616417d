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
    rows excluded because ``dv`` was undefined (e.g. recovery with a zero denominator).

Too little data is an error, not a table of NaNs: a :class:`~clap.errors.ClapError` says what is missing.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Any, Iterator

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
    "p_GG_corr", "np2", "sphericity", "W_spher", "p_spher",
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
    ``np2`` (partial eta squared SS / (SS + SS_error)), ``sphericity`` (Mauchly's test not significant at 0.05;
    True for two levels, NA when Mauchly's test is undefined because there are fewer probes than levels),
    ``W_spher`` / ``p_spher`` (Mauchly's W and its p; NA when undefined or for two levels), then the
    book-keeping columns of the module docstring.
    """
    prep = prepare(data, dv, within, subject, **select)
    with _quiet_pingouin() as pg:
        detailed = pg.rm_anova(prep.data, dv=dv, within=within, subject=subject, detailed=True, correction=True, effsize="np2")
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
    row.update(_sphericity(effect, k, n))
    return _annotate(pd.DataFrame([row], columns=RM_COLUMNS), prep)


def _sphericity(effect: pd.Series, k: int, n: int) -> dict[str, Any]:
    """Mauchly's test as pingouin reports it, except where it is undefined (then NA, not a misleading 0 or 1)."""
    if k == 2:
        return {"sphericity": True, "W_spher": np.nan, "p_spher": np.nan}
    if n < k or "W_spher" not in effect:  # the (k-1)x(k-1) covariance of contrasts is singular
        return {"sphericity": pd.NA, "W_spher": np.nan, "p_spher": np.nan}
    return {"sphericity": bool(effect["sphericity"]), "W_spher": float(effect["W_spher"]), "p_spher": float(effect["p_spher"])}


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
    """
    prep = prepare(data, dv, within, subject, **select)
    with _quiet_pingouin() as pg:
        res = pg.friedman(prep.data, dv=dv, within=within, subject=subject, method="chisq")
    _require_statistic(res, "Q", "Friedman test", prep)
    r = res.iloc[0]
    row = {"Source": within, "Q": float(r["Q"]), "ddof1": int(r["ddof1"]), "p_unc": float(r["p_unc"]), "W": float(r["W"])}
    return _annotate(pd.DataFrame([row], columns=FRIEDMAN_COLUMNS), prep)


MIXED_COLUMNS = [
    "Source", "SS", "ddof1", "ddof2", "MS", "F", "p_unc", "eps", "p_GG_corr", "np2", "sphericity", "W_spher", "p_spher",
]


def mixed_anova(
    data: pd.DataFrame,
    dv: str = "recovery",
    within: str = "layer",
    between: str = "knowledge_type",
    subject: str = "probe_id",
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
    """
    prep = prepare(data, dv, within, subject, between=between, **select)
    with _quiet_pingouin() as pg:
        res = pg.mixed_anova(prep.data, dv=dv, within=within, between=between, subject=subject, correction=True, effsize="np2")
    _require_statistic(res, "F", "mixed ANOVA", prep)
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
        rows.append(row)
    return _annotate(pd.DataFrame(rows, columns=MIXED_COLUMNS), prep)


PAIRWISE_WITHIN_COLUMNS = [
    "Contrast", "A", "B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr", "p_adjust", "hedges", "n",
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
    mean of the two variances, times the small-sample factor 1 - 3/(4(2n)-9)), ``n`` (pairs), then the
    book-keeping columns.
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
            "p_corr": res["p_corr"].astype(float).to_numpy() if "p_corr" in res else res["p_unc"].astype(float).to_numpy(),
            "p_adjust": padjust,
            "hedges": res["hedges"].astype(float).to_numpy(),
            "n": prep.n_subjects,
        }
    )
    out["diff"] = out["mean_A"] - out["mean_B"]
    return _annotate(out[PAIRWISE_WITHIN_COLUMNS], prep)


PAIRWISE_BETWEEN_COLUMNS = [
    "level", "Contrast", "A", "B", "n_A", "n_B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr",
    "p_adjust", "hedges",
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
    factor 1 - 3/(4(n_A+n_B)-9)), then the book-keeping columns.
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
                    }
                )
        out = pd.DataFrame(rows)
        _, out["p_corr"] = pg.multicomp(out["p_unc"].to_numpy(), method=padjust)
    out["p_adjust"] = padjust
    return _annotate(out[PAIRWISE_BETWEEN_COLUMNS], prep)
