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
from analyses.select import SELECT_COLUMNS, slice_rows


def _p(p: float) -> str:
    return f"p = {fmt(float(p))}" if p >= 1e-4 else "p < 0.0001"


def _layers(values: list[Any], one: str = "layer", many: str = "layers") -> str:
    values = [int(v) if float(v).is_integer() else v for v in values]
    if len(values) == 1:
        return f"{one} {values[0]}"
    return f"{many} " + ", ".join(map(str, values[:-1])) + f" and {values[-1]}"


def _by_group(table: pd.DataFrame, group: str | None) -> list[tuple[Any, pd.DataFrame]]:
    """The table's rows per ``group`` value (sorted), or all rows under ``None`` when there are no groups."""
    if group and group in table:
        return [(g, table[table[group] == g]) for g in sorted(table[group].unique(), key=str)]
    return [(None, table)]


def _who(group: str | None, g: Any, everyone: str = "all probes") -> str:
    """How a sentence names the probes it is about."""
    return f"`{group}` = {g}" if g is not None else everyone


def _ci_words(row: Any, level: int) -> str:
    """``95 % CI [a, b]``, or that there is none (one probe: no interval)."""
    if pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return f"no {level} % CI ({'one probe' if row.get('n') == 1 else 'no interval'})"
    return f"{level} % CI [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def _interval_findings(ci: pd.DataFrame, group: str | None, dv: str) -> list[str]:
    """Per group: the layer of the highest mean and the layers whose interval excludes 0. A group without an
    interval (one probe) is said to have none, never that its intervals include 0."""
    if not len(ci):
        return []
    out = []
    level = int(round(float(ci["ci"].iloc[0]) * 100)) if "ci" in ci else 95
    for g, part in _by_group(ci, group):
        best = part.loc[part["mean"].idxmax()]
        sentence = (f"{_who(group, g)}: {dv} is highest at layer {fmt(best['layer'])} (mean {fmt(best['mean'])}, "
                    f"{_ci_words(best, level)}, n = {fmt(best['n'])})")
        with_ci = part[part["ci_low"].notna() & part["ci_high"].notna()]
        without = part[~part.index.isin(with_ci.index)].sort_values("layer")["layer"].tolist()
        if with_ci.empty:
            most = int(part["n"].max()) if "n" in part and part["n"].notna().any() else 0
            out.append(sentence + f"; no {level} % interval at any layer ({most} probe(s): an interval needs at "
                                  "least 2), so nothing can be said about 0.")
            continue
        above = with_ci[with_ci["ci_low"] > 0].sort_values("layer")["layer"].tolist()
        below = with_ci[with_ci["ci_high"] < 0].sort_values("layer")["layer"].tolist()
        if above:
            sentence += f"; its {level} % CI lies above 0 at {_layers(above)}"
        else:
            sentence += (f"; no evidence of {dv} above 0 at any layer (every {level} % CI includes 0 or lies below"
                         + (" where there is one" if without else "") + ")")
        if below:
            sentence += f"; below 0 at {_layers(below)}"
        if without:
            sentence += f"; no interval at {_layers(without)} (fewer than 2 probes)"
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
        if p.loc[part.index].isna().all():
            out.append(f"{who}: no one-sample test could run (an interval and a test need at least 2 probes).")
            continue
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
    stat = (f"repeated-measures ANOVA, F({fmt(r['ddof1'])}, {fmt(r['ddof2'])}) = {fmt(r['F'])}, "
            f"Greenhouse-Geisser {_p(p)}, np2 = {fmt(r['np2'])}")
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
        stat = f"mixed ANOVA, F({fmt(r['ddof1'])}, {fmt(r['ddof2'])}) = {fmt(r['F'])}, {_p(r['p_unc'])}"
        out.append(f"Mean {dv} differs between the `{group}` groups ({stat})." if r["p_unc"] < alpha
                   else f"No evidence that mean {dv} differs between the `{group}` groups ({stat}).")
    if "Interaction" in rows.index:
        r = rows.loc["Interaction"]
        p = r["p_GG_corr"] if pd.notna(r.get("p_GG_corr")) else r["p_unc"]
        stat = f"layer x `{group}` interaction, F({fmt(r['ddof1'])}, {fmt(r['ddof2'])}) = {fmt(r['F'])}, {_p(p)}"
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
                detail = "; ".join(f"layer {fmt(r.level)}: diff {fmt(abs(r.diff))}, {_p(r.p_corr)}"
                                   for r in rows.sort_values("level").itertuples())
                layers = _layers(rows.sort_values("level")["level"].tolist())
                out.append(f"`{group}` = {more} recovers more than {less} at {layers} "
                           f"(Welch t, Holm-corrected: {detail}).")
    return out


def unit_findings(tables: Mapping[str, pd.DataFrame], unit: Mapping[str, Any], group: str | None, alpha: float = 0.05,
                  dv: str = "recovery") -> list[str]:
    """Sentences for one slice (``unit``: its :data:`~analyses.select.SELECT_COLUMNS` values)."""
    out = _interval_findings(slice_rows(tables.get("bootstrap_ci"), unit), group, dv)
    out += _one_sample_findings(slice_rows(tables.get("one_sample"), unit), group, alpha)
    out += _layer_effect_findings(slice_rows(tables.get("rm_anova"), unit), dv, alpha)
    if group:
        out += _group_findings(slice_rows(tables.get("mixed_anova"), unit), group, dv, alpha)
    out += _posthoc_findings(slice_rows(tables.get("posthoc_groups"), unit), group, alpha)
    return out


def unit_headline(tables: Mapping[str, pd.DataFrame], unit: Mapping[str, Any], group: str | None,
                  alpha: float = 0.05, dv: str = "recovery") -> list[str]:
    """The headline of one slice: the sentences of :func:`unit_findings` on the layer effect and, with groups, on
    the group difference and the layer x group interaction (the study page shows these, unchanged)."""
    out = _layer_effect_findings(slice_rows(tables.get("rm_anova"), unit), dv, alpha)
    if group:
        out += _group_findings(slice_rows(tables.get("mixed_anova"), unit), group, dv, alpha)
    return out


def comparison_findings(differences: pd.DataFrame, anova: pd.DataFrame, unit: Mapping[str, Any],
                        alpha: float = 0.05, dv: str = "recovery", level: str = "layer",
                        words: tuple[str, str] = ("layer", "layers")) -> list[str]:
    """Sentences for one slice of ``clap compare`` (B - A, paired per probe), from its two tables: the model main
    effect and the layer x model interaction of the repeated-measures ANOVA, and the largest per-layer difference
    with its uncorrected and Holm-corrected p. ``level`` / ``words``: the column the values are paired per and how
    to name it (``depth_bin``, "relative depth bin" when models of different depth are compared)."""
    one, many = words
    out = []
    rows = slice_rows(anova, unit).set_index("Source") if len(slice_rows(anova, unit)) else pd.DataFrame()
    if "model" in rows.index:
        r = rows.loc["model"]
        stat = f"F({fmt(r['ddof1'])}, {fmt(r['ddof2'])}) = {fmt(r['F'])}, {_p(r['p_unc'])}"
        out.append(f"Mean {dv} differs between the models (B - A; {stat})." if r["p_unc"] < alpha
                   else f"No evidence that mean {dv} differs between the models ({stat}).")
    if f"{level} * model" in rows.index:
        r = rows.loc[f"{level} * model"]
        p = r["p_GG_corr"] if pd.notna(r.get("p_GG_corr")) else r["p_unc"]
        stat = f"{one} x model F({fmt(r['ddof1'])}, {fmt(r['ddof2'])}) = {fmt(r['F'])}, {_p(p)}"
        out.append(f"The difference depends on the {one} ({stat})." if p < alpha
                   else f"No evidence that the difference depends on the {one} ({stat}).")
    diff = slice_rows(differences, unit)
    tested = diff[diff["p_unc"].notna()] if len(diff) else diff
    if len(tested):
        top = tested.loc[tested["diff"].abs().idxmax()]
        sig = tested[tested["p_corr"] < alpha].sort_values(level)[level].tolist()
        where = f"{one} {fmt(top[level])}" + (f" {top['depth_range']}" if "depth_range" in top else "")
        largest = f"Largest per-{one} difference" if " " not in one else f"Largest difference per {one}"
        out.append(f"{largest}: {'+' if top['diff'] > 0 else ''}{fmt(top['diff'])} at {where} "
                   f"(95 % CI [{fmt(top['ci_low'])}, {fmt(top['ci_high'])}], {_p(top['p_unc'])} "
                   f"uncorrected, Holm p_corr = {fmt(top['p_corr'])}); "
                   + (f"B - A differs at {_layers(sig, one, many)} after Holm correction." if sig else
                      f"no {one} differs after Holm correction (p_corr < {alpha})."))
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
        interval = (f"CI [{fmt(best['ci_low'])}, {fmt(best['ci_high'])}]"
                    if pd.notna(best["ci_low"]) and pd.notna(best["ci_high"]) else "no interval")
        out.append(f"{who}: the highest mean {dv} of all slices is at {where}, layer {fmt(best['layer'])} "
                   f"(mean {fmt(best['mean'])}, {interval}).")
    return out


def localization_findings(tables: Mapping[str, pd.DataFrame], group: str | None, alpha: float = 0.05) -> list[str]:
    """Per profiled slice: is one group more localized than the other here? Answered from ``localization_tests``
    (the concentration measures of :data:`analyses.localization.LOCALIZING`, Holm-corrected permutation p-values):
    yes with the numbers when every measure that differs points the same way, "mixed" when they disagree, and
    "the data cannot tell" when none differs. Without groups: each slice's mean effective layers and centre of mass
    (``localization_groups``)."""
    from analyses.localization import LOCALIZING, MEASURE_WORDS

    tests, summary = tables.get("localization_tests"), tables.get("localization_groups")
    source = tests if group and tests is not None and len(tests) else summary
    if source is None or not len(source):
        return []
    keys = [c for c in SELECT_COLUMNS if c in source.columns]
    varying = [c for c in keys if c == "site_kind" or source[c].nunique() > 1]
    out = []
    for key, part in source.groupby(keys, sort=True, dropna=False):
        sel = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        where = str(sel.get("site_kind")) + "".join(f", {k} {sel[k]}" for k in varying if k != "site_kind")
        if source is summary:
            pr = part[part["measure"] == "eff_layers_pr"].iloc[0]
            com = part[part["measure"] == "centre_of_mass"].iloc[0]
            out.append(f"{where}: {fmt(pr['mean'])} effective layers on average (participation ratio, 95 % CI "
                       f"[{fmt(pr['ci_low'])}, {fmt(pr['ci_high'])}], n = {fmt(pr['n'])}), centre of mass at "
                       f"{fmt(com['mean'])} of the depth.")
            continue
        for (a, b), pair in part.groupby(["A", "B"], sort=True):
            rows = pair.set_index("measure")
            out.append(f"{where}: {_localization_verdict(rows, group, a, b, alpha, LOCALIZING, MEASURE_WORDS)} "
                       + _localization_numbers(rows, a, b, MEASURE_WORDS))
    return out


def _localization_verdict(rows: pd.DataFrame, group: str, a: Any, b: Any, alpha: float,
                          localizing: Mapping[str, int], words: Mapping[str, str]) -> str:
    """The answer to "is one group more localized than the other?" from the Holm-corrected permutation tests."""
    present = [m for m in localizing if m in rows.index]
    sig = [m for m in present if pd.notna(rows.loc[m, "p_perm_holm"]) and rows.loc[m, "p_perm_holm"] < alpha]
    if not sig:
        return (f"the data cannot tell whether `{group}` = {a} or {b} is more localized (no measure of "
                f"concentration differs at Holm-corrected permutation p < {alpha}).")
    winners = {rows.loc[m, "more_localized"] for m in sig}
    named = ", ".join(words.get(m, m) for m in sig)
    if len(winners) == 1:
        win = winners.pop()
        lose = b if win == a else a
        return (f"`{group}` = {win} is more localized than {lose} here (Holm-corrected permutation p < {alpha}: "
                f"{named}).")
    return f"mixed: the measures of concentration that differ ({named}) point to different groups."


def _localization_numbers(rows: pd.DataFrame, a: Any, b: Any, words: Mapping[str, str]) -> str:
    """The numbers behind the verdict: each concentration measure and the centre of mass, A vs B."""
    parts = []
    for m in ("eff_layers_pr", "peak_share", "window_width", "centre_of_mass"):
        if m not in rows.index:
            continue
        r = rows.loc[m]
        text = f"{words[m]} {fmt(r['mean_A'])} vs {fmt(r['mean_B'])}"
        if pd.notna(r["p_perm"]):
            text += (f" (difference {fmt(r['diff'])}, 95 % CI [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}], permutation "
                     f"{_p(r['p_perm'])}, Holm {_p(r['p_perm_holm'])})")
        parts.append(text)
    n = rows.iloc[0]
    return f"{a} (n = {fmt(n['n_A'])}) vs {b} (n = {fmt(n['n_B'])}): " + "; ".join(parts) + "."
