"""Findings in words, written from the very tables the report shows, so the text can never contradict them.

For each tested slice: where each group recovers most (mean and bootstrap CI from ``bootstrap_ci``), at which
layers its interval lies above 0, whether recovery differs across layers (``rm_anova``), whether the groups differ
(``mixed_anova`` and ``posthoc_groups``), and, where present, the one-sample tests per layer. Where a test finds
nothing the sentence says "no evidence", never "no effect".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from analyses.formatting import fmt, row_p_values
from analyses.select import SELECT_COLUMNS


def _n(v: Any) -> str:
    return fmt(v)


def _p(p: float) -> str:
    return f"p = {_n(float(p))}" if p >= 1e-4 else "p < 0.0001"


def _layers(values: list[Any]) -> str:
    values = [int(v) if float(v).is_integer() else v for v in values]
    if len(values) == 1:
        return f"layer {values[0]}"
    return "layers " + ", ".join(map(str, values[:-1])) + f" and {values[-1]}"


def _in(table: pd.DataFrame | None, unit: Mapping[str, Any]) -> pd.DataFrame:
    if table is None or not len(table):
        return pd.DataFrame()
    mask = pd.Series(True, index=table.index)
    for k, v in unit.items():
        if k in table.columns:
            mask &= table[k] == v
    return table[mask]


def _by_group(table: pd.DataFrame, group: str | None) -> list[tuple[Any, pd.DataFrame]]:
    """The table's rows per ``group`` value (sorted), or all rows under ``None`` when there are no groups."""
    if group and group in table:
        return [(g, table[table[group] == g]) for g in sorted(table[group].unique(), key=str)]
    return [(None, table)]


def _who(group: str | None, g: Any, everyone: str = "all probes") -> str:
    """How a sentence names the probes it is about."""
    return f"`{group}` = {g}" if g is not None else everyone


def _interval_findings(ci: pd.DataFrame, group: str | None, dv: str) -> list[str]:
    """Per group: the layer of the highest mean and the layers whose bootstrap CI excludes 0."""
    if not len(ci):
        return []
    out = []
    level = int(round(float(ci["ci"].iloc[0]) * 100)) if "ci" in ci else 95
    for g, part in _by_group(ci, group):
        best = part.loc[part["mean"].idxmax()]
        sentence = (f"{_who(group, g)}: {dv} is highest at layer {_n(best['layer'])} (mean {_n(best['mean'])}, "
                    f"{level} % CI [{_n(best['ci_low'])}, {_n(best['ci_high'])}], n = {_n(best['n'])})")
        above = part[part["ci_low"] > 0].sort_values("layer")["layer"].tolist()
        below = part[part["ci_high"] < 0].sort_values("layer")["layer"].tolist()
        if above:
            sentence += f"; its {level} % CI lies above 0 at {_layers(above)}"
        else:
            sentence += f"; no evidence of {dv} above 0 at any layer (every {level} % CI includes 0 or lies below)"
        if below:
            sentence += f"; below 0 at {_layers(below)}"
        out.append(sentence + ".")
    return out


def _one_sample_findings(one: pd.DataFrame, group: str | None, alpha: float) -> list[str]:
    """Per group: the layers where the one-sample test against 0 is significant (with the report's p column)."""
    if not len(one) or "layer" not in one.columns:
        return []
    p, label = row_p_values(one)
    if p is None:
        return []
    out = []
    for g, part in _by_group(one, group):
        who = _who(group, g)
        hits = part[p.loc[part.index] < alpha].sort_values("layer")["layer"].tolist()
        out.append(f"{who}: one-sample tests against 0 ({label} < {alpha}) are significant at {_layers(hits)}."
                   if hits else f"{who}: no evidence from the one-sample tests ({label} < {alpha}) at any layer.")
    return out


def _layer_effect_findings(rm: pd.DataFrame, dv: str, alpha: float) -> list[str]:
    """Whether ``dv`` differs across layers (repeated-measures ANOVA, Greenhouse-Geisser corrected)."""
    if not len(rm):
        return []
    r = rm.iloc[0]
    p = r["p_GG_corr"] if pd.notna(r.get("p_GG_corr")) else r["p_unc"]
    stat = (f"repeated-measures ANOVA, F({_n(r['ddof1'])}, {_n(r['ddof2'])}) = {_n(r['F'])}, "
            f"Greenhouse-Geisser {_p(p)}, np2 = {_n(r['np2'])}")
    return [f"{dv.capitalize()} differs across layers ({stat})." if p < alpha
            else f"No evidence that {dv} differs across layers ({stat})."]


def _group_findings(mixed: pd.DataFrame, group: str, dv: str, alpha: float) -> list[str]:
    """Whether the groups differ in mean and in layer profile (mixed ANOVA main effect and interaction)."""
    if not len(mixed):
        return []
    out = []
    rows = mixed.set_index("Source")
    if group in rows.index:
        r = rows.loc[group]
        stat = f"mixed ANOVA, F({_n(r['ddof1'])}, {_n(r['ddof2'])}) = {_n(r['F'])}, {_p(r['p_unc'])}"
        out.append(f"Mean {dv} differs between the `{group}` groups ({stat})." if r["p_unc"] < alpha
                   else f"No evidence that mean {dv} differs between the `{group}` groups ({stat}).")
    if "Interaction" in rows.index:
        r = rows.loc["Interaction"]
        p = r["p_GG_corr"] if pd.notna(r.get("p_GG_corr")) else r["p_unc"]
        stat = f"layer x `{group}` interaction, F({_n(r['ddof1'])}, {_n(r['ddof2'])}) = {_n(r['F'])}, {_p(p)}"
        out.append(f"The groups' layer profiles differ ({stat})." if p < alpha
                   else f"No evidence that the groups' layer profiles differ ({stat}).")
    return out


def _posthoc_findings(post: pd.DataFrame, group: str | None, alpha: float) -> list[str]:
    """Per pair of groups: the layers where one recovers more (Welch t-tests, Holm-corrected)."""
    if not len(post):
        return []
    out = []
    sig = post[post["p_corr"] < alpha]
    if not len(sig):
        out.append("No evidence of a group difference at any single layer "
                   f"(Welch t-tests, Holm-corrected p_corr < {alpha}).")
    for (a, b), pair in sig.groupby(["A", "B"], sort=True):
        for more, less, rows in ((a, b, pair[pair["diff"] > 0]), (b, a, pair[pair["diff"] < 0])):
            if len(rows):
                detail = "; ".join(f"layer {_n(r.level)}: diff {_n(abs(r.diff))}, {_p(r.p_corr)}"
                                   for r in rows.sort_values("level").itertuples())
                layers = _layers(rows.sort_values("level")["level"].tolist())
                out.append(f"`{group}` = {more} recovers more than {less} at {layers} "
                           f"(Welch t, Holm-corrected: {detail}).")
    return out


def unit_findings(tables: Mapping[str, pd.DataFrame], unit: Mapping[str, Any], group: str | None, alpha: float = 0.05,
                  dv: str = "recovery") -> list[str]:
    """Sentences for one slice (``unit``: its :data:`~analyses.select.SELECT_COLUMNS` values)."""
    out = _interval_findings(_in(tables.get("bootstrap_ci"), unit), group, dv)
    out += _one_sample_findings(_in(tables.get("one_sample"), unit), group, alpha)
    out += _layer_effect_findings(_in(tables.get("rm_anova"), unit), dv, alpha)
    if group:
        out += _group_findings(_in(tables.get("mixed_anova"), unit), group, dv, alpha)
    out += _posthoc_findings(_in(tables.get("posthoc_groups"), unit), group, alpha)
    return out


def overall_findings(tables: Mapping[str, pd.DataFrame], group: str | None, dv: str = "recovery") -> list[str]:
    """Across slices: for each group, the slice and layer with the highest mean (from ``bootstrap_ci``)."""
    ci = tables.get("bootstrap_ci")
    if ci is None or not len(ci):
        return []
    keys = [c for c in SELECT_COLUMNS if c in ci.columns and ci[c].nunique() > 1]
    if not keys:
        return []
    out = []
    for g, part in _by_group(ci, group):
        best = part.loc[part["mean"].idxmax()]
        where = ", ".join(f"{k} {best[k]}" for k in keys)
        who = _who(group, g, everyone="All probes")
        out.append(f"{who}: the highest mean {dv} of all slices is at {where}, layer {_n(best['layer'])} "
                   f"(mean {_n(best['mean'])}, CI [{_n(best['ci_low'])}, {_n(best['ci_high'])}]).")
    return out
