"""Findings in words, written from the very tables the report shows, so the text can never contradict them.

For each tested slice: where each group recovers most (mean and bootstrap CI from ``bootstrap_ci``), at which
layers its interval lies above 0, whether recovery differs across layers (``rm_anova``), whether the groups differ
(``mixed_anova`` and ``posthoc_groups``), and, where present, the one-sample tests per layer. Where a test finds
nothing the sentence says "no evidence", never "no effect".
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from analyses.select import SELECT_COLUMNS


def _n(v: Any) -> str:
    from analyses.report import _fmt

    return _fmt(v)


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


def unit_findings(tables: Mapping[str, pd.DataFrame], unit: Mapping[str, Any], group: str | None, alpha: float = 0.05,
                  dv: str = "recovery") -> list[str]:
    """Sentences for one slice (``unit``: its :data:`~analyses.select.SELECT_COLUMNS` values)."""
    out: list[str] = []
    ci = _in(tables.get("bootstrap_ci"), unit)
    if len(ci):
        level = int(round(float(ci["ci"].iloc[0]) * 100)) if "ci" in ci else 95
        parts = [(g, ci[ci[group] == g]) for g in sorted(ci[group].unique(), key=str)] if group and group in ci else [(None, ci)]
        for g, part in parts:
            who = f"`{group}` = {g}" if g is not None else "all probes"
            best = part.loc[part["mean"].idxmax()]
            sentence = (f"{who}: {dv} is highest at layer {_n(best['layer'])} (mean {_n(best['mean'])}, {level} % CI "
                        f"[{_n(best['ci_low'])}, {_n(best['ci_high'])}], n = {_n(best['n'])})")
            above = part[part["ci_low"] > 0].sort_values("layer")["layer"].tolist()
            below = part[part["ci_high"] < 0].sort_values("layer")["layer"].tolist()
            if above:
                sentence += f"; its {level} % CI lies above 0 at {_layers(above)}"
            else:
                sentence += f"; no evidence of {dv} above 0 at any layer (every {level} % CI includes 0 or lies below)"
            if below:
                sentence += f"; below 0 at {_layers(below)}"
            out.append(sentence + ".")
    one = _in(tables.get("one_sample"), unit)
    if len(one) and "layer" in one.columns:
        from analyses.report import row_p_values

        p, label = row_p_values(one)
        if p is not None:
            parts = [(g, one[one[group] == g]) for g in sorted(one[group].unique(), key=str)] if group and group in one else [(None, one)]
            for g, part in parts:
                who = f"`{group}` = {g}" if g is not None else "all probes"
                hits = part[p.loc[part.index] < alpha].sort_values("layer")["layer"].tolist()
                out.append(f"{who}: one-sample tests against 0 ({label} < {alpha}) are significant at {_layers(hits)}."
                           if hits else f"{who}: no evidence from the one-sample tests ({label} < {alpha}) at any layer.")
    rm = _in(tables.get("rm_anova"), unit)
    if len(rm):
        r = rm.iloc[0]
        p = r["p_GG_corr"] if pd.notna(r.get("p_GG_corr")) else r["p_unc"]
        stat = f"repeated-measures ANOVA, F({_n(r['ddof1'])}, {_n(r['ddof2'])}) = {_n(r['F'])}, Greenhouse-Geisser {_p(p)}, np2 = {_n(r['np2'])}"
        out.append(f"{dv.capitalize()} differs across layers ({stat})." if p < alpha
                   else f"No evidence that {dv} differs across layers ({stat}).")
    mixed = _in(tables.get("mixed_anova"), unit)
    if len(mixed) and group:
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
    post = _in(tables.get("posthoc_groups"), unit)
    if len(post):
        sig = post[post["p_corr"] < alpha]
        if not len(sig):
            out.append(f"No evidence of a group difference at any single layer (Welch t-tests, Holm-corrected p_corr < {alpha}).")
        for (a, b), pair in sig.groupby(["A", "B"], sort=True):
            for more, less, rows in ((a, b, pair[pair["diff"] > 0]), (b, a, pair[pair["diff"] < 0])):
                if len(rows):
                    detail = "; ".join(f"layer {_n(r.level)}: diff {_n(abs(r.diff))}, {_p(r.p_corr)}"
                                       for r in rows.sort_values("level").itertuples())
                    out.append(f"`{group}` = {more} recovers more than {less} at {_layers(rows.sort_values('level')['level'].tolist())} "
                               f"(Welch t, Holm-corrected: {detail}).")
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
    parts = [(g, ci[ci[group] == g]) for g in sorted(ci[group].unique(), key=str)] if group and group in ci else [(None, ci)]
    for g, part in parts:
        best = part.loc[part["mean"].idxmax()]
        where = ", ".join(f"{k} {best[k]}" for k in keys)
        who = f"`{group}` = {g}" if g is not None else "All probes"
        out.append(f"{who}: the highest mean {dv} of all slices is at {where}, layer {_n(best['layer'])} "
                   f"(mean {_n(best['mean'])}, CI [{_n(best['ci_low'])}, {_n(best['ci_high'])}]).")
    return out
