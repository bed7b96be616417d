"""The cross-domain table: does a localization contrast hold in each domain of a study, and where does composed
(two-hop) recall sit relative to its one-hop parts?

A study over several probe sets (``studies/domains.yaml``: epilepsy, encyclopedic, commonsense and compositional
facts) labels each probe with its domain (``topic``) and its knowledge type. The model's own localization analysis
compares knowledge types over all probes pooled; a contrast that holds in one domain and reverses in another would
average away there. This module repeats the localization analysis **within each domain** and lays the domains side
by side. It derives nothing of its own where :mod:`analyses.localization` already has the answer: each domain's
numbers are :func:`analyses.localization.localization_tables` on that domain's probes (the same slices, exclusions,
reductions, permutation tests and Holm families), re-oriented so that the hypothesis' side comes first.

Which label is the domain
    ``analysis: {domain: NAME}`` (any probe label; refused with the labels there are when the probes lack it, or
    when it is the group itself); undeclared, ``topic`` when the probes carry it with at least two values, else no
    cross-domain table (:func:`resolve_domain`). The within-domain groups are the analysis group (``knowledge_type``
    by default).

One long table, ``cross_domain.csv`` (:data:`COLUMNS`), three kinds of rows (``part``):

``localization``
    per domain, slice (metric, site kind, ...) and pair of groups, one row per localization measure: each group's
    mean with its 95 % t interval over probes (:func:`analyses.localization.summarize_localization`), the difference
    ``A - B`` with its Welch interval, the two-sided permutation p and its Holm correction across the measures of
    that domain x slice x pair (:func:`analyses.localization.compare_localization`), the group the difference calls
    more localized, and the **verdict** of the domain x slice x pair in words (:func:`verdict`): "A more
    localized" when every concentration measure (:data:`analyses.localization.LOCALIZING`) with Holm p < alpha
    points to A, "mixed" when they point both ways, "cannot tell" when none does. Pairs are oriented so that
    ``definitional`` and ``one_hop`` come first (:data:`FIRST_GROUPS`): ``diff`` is definitional - associative and
    one_hop - two_hop; other groups keep localization.py's order (sorted by name).
``additivity``
    with the additivity check's per-probe cells (:func:`analyses.additivity.additivity_cells`): per domain, site
    kind and group the mean gap (joint - sum of single layers) with its t interval for every layer jointly
    (``gap_all_layers``: the bottom-up stack of every layer, or a top-m set holding every layer), each top-m set
    (``gap_top{m}``) and the pairs (``interaction_pairs``: a probe's mean pair interaction), the difference of the
    groups with its Welch interval and a permutation p (uncorrected; these are not part of a Holm family).
``composition``
    with each composed probe's parts (``composes``: probe id -> [first hop id, second hop id], read from the probe
    file; :func:`read_compositions`): per domain and slice, each measure of :data:`COMPOSITION_MEASURES` of the
    composed probe against its first hop, its second hop and the mean of both, paired over the compositions whose
    probe and both parts survived the exclusions: means with t intervals, the mean paired difference with its t
    interval, the paired t-test's p and its Holm correction across the measures of one reference. A hop shared by
    several compositions enters each of their pairs.

:func:`attach_domains` is what :func:`analyses.pipeline.analyze` calls: it writes the table and adds a section
(findings, a condensed table per part) to the model's report; :func:`display` is the condensed view the study
report (:mod:`clap.app.study_report`) prints from the CSV.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.bootstrap import t_interval
from analyses.localization import (
    LOCALIZING,
    MEASURE_WORDS,
    MEASURES,
    N_RESAMPLES,
    localization_tables,
    permutation_test,
)
from analyses.select import AGGS, SELECT_COLUMNS
from clap.contract import atomic_write_frame
from clap.errors import ClapError, closest

#: the label that names a probe's domain when none is declared
DEFAULT_DOMAIN = "topic"
#: the file :func:`attach_domains` writes into the analysis folder
CROSS_DOMAIN_FILE = "cross_domain.csv"
#: groups written first in a pair (``diff`` = first - second): the side of the hypothesis "definitional localized,
#: associative distributed", and recall of single facts before their composition
FIRST_GROUPS = ("definitional", "one_hop")
#: where a composed probe sits relative to its parts: depth first, then spread
COMPOSITION_MEASURES = ("centre_of_mass", "peak_depth", "eff_layers_pr", "window_width")
#: the references a composed probe is paired with
REFERENCES = {"first hop": 0, "second hop": 1, "both hops (mean)": None}
VERDICT_CANNOT = "cannot tell"
VERDICT_MIXED = "mixed"

COLUMNS = ["domain_label", "domain", "group_label", *SELECT_COLUMNS, "part", "quantity", "A", "B", "n_A", "mean_A",
           "ci_A_low", "ci_A_high", "n_B", "mean_B", "ci_B_low", "ci_B_high", "diff", "ci_low", "ci_high", "test",
           "p", "p_holm", "more_localized", "verdict", "note", "dv", "reduction", "basis"]


# ------------------------------------------------------------------------------------------------- the label
def resolve_domain(declared: str | None, labels: Mapping[str, Sequence[Any]], group: str | None = None,
                   where: str = "analysis.domain") -> str | None:
    """The domain label: ``declared`` (checked: a probe label, not the group), else ``topic`` when the probes carry
    it with 2+ values and it is not the group, else None (no cross-domain table). ``labels``: label -> its value
    per probe."""
    if declared is None:
        values = {str(v) for v in labels.get(DEFAULT_DOMAIN, ())}
        return DEFAULT_DOMAIN if len(values) >= 2 and group != DEFAULT_DOMAIN else None
    if declared not in labels:
        hint = closest(declared, list(labels))
        raise ClapError(f"{where}: {declared!r} is not a label of the probes, so there are no domains to compare"
                        + (f"; did you mean {hint[0]!r}?" if hint else "")
                        + f" (labels: {', '.join(sorted(labels)) or 'none besides the prompts'})")
    if declared == group:
        raise ClapError(f"{where}: {declared!r} is also the analysis group; the cross-domain table compares the "
                        f"groups within each domain, so the domain must be another label (e.g. analysis: "
                        f"{{group: knowledge_type, domain: {DEFAULT_DOMAIN}}})")
    return declared


# ------------------------------------------------------------------------------------------------- the table
def cross_domain_table(
    data: pd.DataFrame,
    units: pd.DataFrame,
    *,
    domain: str = DEFAULT_DOMAIN,
    group: str = "knowledge_type",
    dv: str = "recovery",
    subject: str = "probe_id",
    n_layers: int | None = None,
    cross_model: bool = False,
    position_reduction: str | int = "last",
    subject_field: str = "subject",
    agg: str | None = None,
    missing: str = "drop_subjects",
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    alpha: float = 0.05,
    additivity: pd.DataFrame | None = None,
    composes: Mapping[str, Sequence[str]] | None = None,
    first: Sequence[str] = FIRST_GROUPS,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The cross-domain table (:data:`COLUMNS`; see the module docstring) and the per-domain slices that could not
    be profiled or compared (``domain``, slice, ``test``, ``reason``).

    ``data``: the analysed rows (after the probe exclusions) with columns ``domain`` and ``group``; ``units``: the
    slices (:func:`analyses.select.analysis_units`); the keywords after ``group`` as for
    :func:`analyses.localization.localization_tables`. ``additivity``: the additivity check's cells (with
    ``metric`` and ``positions`` columns), ``composes``: composed probe id -> its two parts' ids.
    """
    for label, what in ((domain, "domain"), (group, "group")):
        if label not in data.columns:
            raise ClapError(f"cross-domain table: the results have no {what} label {label!r} (labels: "
                            f"{', '.join(c for c in data.columns if c not in _ENGINE_COLUMNS) or 'none'})")
    if domain == group:
        raise ClapError(f"cross-domain table: the domain label {domain!r} is also the group")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    options = dict(dv=dv, group=group, subject=subject, n_layers=n_layers, cross_model=cross_model,
                   position_reduction=position_reduction, subject_field=subject_field, agg=agg, missing=missing,
                   seed=seed, n_resamples=n_resamples)
    for value in sorted(data[domain].dropna().unique(), key=str):
        part = data[data[domain] == value]
        tables, skips = localization_tables(part, units, **options)
        skipped += [{"domain": value, **s} for s in skips]
        found = _localization_rows(tables, group, first, alpha)
        if composes and subject == "probe_id":
            found += _composition_rows(tables["localization"], group, composes)
        rows += [{"domain": value, **r} for r in found]
    if additivity is not None and len(additivity):
        rows += _additivity_rows(additivity, data, domain, group, units, first, n_layers, n_resamples, seed)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=COLUMNS), skipped
    table["domain_label"], table["group_label"] = domain, group
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    order = {"localization": 0, "additivity": 1, "composition": 2}
    references = list(REFERENCES)
    table = table.assign(_part=table["part"].map(order), _q=_quantity_order(table["quantity"]),
                         _b=[f"{references.index(b):03d}" if b in references else str(b) for b in table["B"]])
    keys = ["domain", *[c for c in SELECT_COLUMNS if table[c].notna().any()], "_part", "A", "_b", "_q"]
    table = table.sort_values(keys, kind="stable", key=lambda s: s.astype(str) if s.name != "_q" else s)
    return table[COLUMNS].reset_index(drop=True), skipped


#: the engine's columns (the rest of a results frame are probe labels)
_ENGINE_COLUMNS = frozenset({
    "probe_id", "site", "site_kind", "module", "layer", "head", "position", "positions", "token", "source_token",
    "operation", "direction", "metric", "clean", "corrupted", "patched", "recovery", "recovery_defined", "trivial",
    "n_patched_tokens", "window", "sample", "effect", "token_group", "approximate", "clean_prompt",
})


def _quantity_order(quantity: pd.Series) -> pd.Series:
    names = [*MEASURES, "gap_all_layers"]
    return quantity.map(lambda q: names.index(q) if q in names else len(names) + (0 if str(q).startswith("gap_top")
                                                                                  else 1))


def _orient(a: Any, b: Any, first: Sequence[str]) -> bool:
    """Whether the pair (a, b) (localization.py's order: sorted by name) is to be swapped so that a group of
    ``first`` comes first."""
    def rank(g: Any) -> int:
        return list(first).index(g) if g in first else len(first)

    return rank(b) < rank(a)


def _book(row: Mapping[str, Any]) -> dict[str, Any]:
    return {c: row.get(c) for c in (*SELECT_COLUMNS, "dv", "reduction", "basis") if c in row}


def _localization_rows(tables: dict[str, pd.DataFrame], group: str, first: Sequence[str],
                       alpha: float) -> list[dict[str, Any]]:
    """One domain's localization tests as rows: pairs oriented, each group's mean and t interval beside them, the
    verdict of every slice and pair."""
    tests, summary = tables["localization_tests"], tables["localization_groups"]
    if tests.empty:
        return []
    slice_cols = [c for c in SELECT_COLUMNS if c in tests.columns]
    means = {(*(r[c] for c in slice_cols), r[group], r["measure"]): r
             for r in summary.to_dict("records")}
    out = []
    for key, block in tests.groupby([*slice_cols, "A", "B"], sort=False, dropna=False):
        *sl, a, b = key
        swap = _orient(a, b, first)
        records = []
        for t in block.to_dict("records"):
            ga, gb = (b, a) if swap else (a, b)
            ma, mb = means.get((*sl, ga, t["measure"]), {}), means.get((*sl, gb, t["measure"]), {})
            sign = -1.0 if swap else 1.0
            low, high = (-t["ci_high"], -t["ci_low"]) if swap else (t["ci_low"], t["ci_high"])
            records.append({
                **_book(t), "part": "localization", "quantity": t["measure"], "A": ga, "B": gb,
                "n_A": ma.get("n"), "mean_A": ma.get("mean"), "ci_A_low": ma.get("ci_low"),
                "ci_A_high": ma.get("ci_high"), "n_B": mb.get("n"), "mean_B": mb.get("mean"),
                "ci_B_low": mb.get("ci_low"), "ci_B_high": mb.get("ci_high"), "diff": sign * t["diff"],
                "ci_low": low, "ci_high": high, "p": t["p_perm"], "p_holm": t["p_perm_holm"],
                "test": f"permutation, Holm across {len(block)} measures",
                "more_localized": t["more_localized"], "note": t.get("note") or "",
            })
        words = verdict(pd.DataFrame(records), alpha)
        out += [{**r, "verdict": words} for r in records]
    return out


def verdict(rows: pd.DataFrame, alpha: float = 0.05) -> str:
    """The verdict of one domain x slice x pair, from its rows (``quantity``, ``p_holm``, ``more_localized``):
    the concentration measures (:data:`analyses.localization.LOCALIZING`) with Holm p < ``alpha`` all point to one
    group ("G more localized"), to both ("mixed"), or none is significant ("cannot tell")."""
    concentration = rows[rows["quantity"].isin(list(LOCALIZING))]
    p = pd.to_numeric(concentration["p_holm"], errors="coerce")
    winners = sorted({str(g) for g in concentration.loc[p < alpha, "more_localized"].dropna()})
    if not winners:
        return VERDICT_CANNOT
    return f"{winners[0]} more localized" if len(winners) == 1 else VERDICT_MIXED


def _mean_ci(x: np.ndarray) -> tuple[int, float, float, float]:
    """n, mean and 95 % t interval of the finite values of ``x``."""
    x = x[np.isfinite(x)]
    low, high = t_interval(x) if len(x) >= 2 else (np.nan, np.nan)
    return len(x), float(x.mean()) if len(x) else np.nan, float(low), float(high)


def _composition_rows(measures: pd.DataFrame, group: str, composes: Mapping[str, Sequence[str]]) -> list[dict]:
    """A domain's composed probes against their parts, per slice, reference and measure (paired t)."""
    import pingouin as pg

    if measures.empty or "probe_id" not in measures.columns:
        return []
    slice_cols = [c for c in SELECT_COLUMNS if c in measures.columns]
    out = []
    for _, part in measures.groupby(slice_cols, sort=False, dropna=False):
        by_id = part.set_index(part["probe_id"].astype(str))
        pairs = [(c, list(p)) for c, p in composes.items()
                 if c in by_id.index and len(p) == 2 and all(str(h) in by_id.index for h in p)]
        if not pairs:
            continue
        kinds = sorted({str(by_id.loc[c, group]) for c, _ in pairs})
        book = _book(part.iloc[0].to_dict())
        for reference, hop in REFERENCES.items():
            block = []
            for name in COMPOSITION_MEASURES:
                a = np.array([by_id.loc[c, name] for c, _ in pairs], float)
                b = np.array([by_id.loc[[str(h) for h in hops], name].mean() if hop is None
                              else by_id.loc[str(hops[hop]), name] for _, hops in pairs], float)
                keep = np.isfinite(a) & np.isfinite(b)
                a, b = a[keep], b[keep]
                n_a, mean_a, low_a, high_a = _mean_ci(a)
                n_b, mean_b, low_b, high_b = _mean_ci(b)
                d = a - b
                row = {**book, "part": "composition", "quantity": name, "A": "/".join(kinds), "B": reference,
                       "n_A": n_a, "mean_A": mean_a, "ci_A_low": low_a, "ci_A_high": high_a, "n_B": n_b,
                       "mean_B": mean_b, "ci_B_low": low_b, "ci_B_high": high_b,
                       "diff": float(d.mean()) if len(d) else np.nan, "ci_low": np.nan, "ci_high": np.nan,
                       "p": np.nan, "note": ""}
                if len(d) >= 2 and np.ptp(d) > 0:
                    test = sps.ttest_1samp(d, 0.0)
                    ci = test.confidence_interval(0.95)
                    row.update(ci_low=float(ci.low), ci_high=float(ci.high), p=float(test.pvalue))
                else:
                    row["note"] = ("fewer than 2 pairs" if len(d) < 2 else "every pair differs by the same amount: "
                                   "nothing to test")
                block.append(row)
            p = np.array([r["p"] for r in block], float)
            holm = np.full(len(p), np.nan)
            if np.isfinite(p).any():
                holm[np.isfinite(p)] = pg.multicomp(p[np.isfinite(p)], method="holm")[1]
            for r, q in zip(block, holm, strict=True):
                r.update(p_holm=float(q), test=f"paired t over compositions, Holm across {len(block)} measures")
            out += block
    return out


def _additivity_rows(cells: pd.DataFrame, data: pd.DataFrame, domain: str, group: str, units: pd.DataFrame,
                     first: Sequence[str], n_layers: int | None, n_resamples: int, seed: int) -> list[dict]:
    """Per domain, site kind and pair of groups: the mean additivity gap of each group (t interval) and their
    difference (Welch interval, permutation p, uncorrected)."""
    labels = data.drop_duplicates("probe_id").set_index("probe_id")[[domain, group]]
    cells = cells[cells["probe_id"].astype(str).isin(labels.index.astype(str))]
    if cells.empty:
        return []
    cells = cells.assign(**{c: cells["probe_id"].map(labels[c]) for c in (domain, group)})
    per_probe = _gap_per_probe(cells, n_layers, [domain, group])
    out = []
    for (value, kind, quantity), block in per_probe.groupby([domain, "site_kind", "quantity"], sort=True):
        book = _additivity_slice(units, kind, block)
        groups = sorted(block[group].dropna().unique(), key=str)
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                ga, gb = (b, a) if _orient(a, b, first) else (a, b)
                xa = block.loc[block[group] == ga, "gap"].to_numpy(float)
                xb = block.loc[block[group] == gb, "gap"].to_numpy(float)
                n_a, mean_a, low_a, high_a = _mean_ci(xa)
                n_b, mean_b, low_b, high_b = _mean_ci(xb)
                row = {"domain": value, **book, "part": "additivity", "quantity": quantity, "A": ga, "B": gb,
                       "n_A": n_a, "mean_A": mean_a, "ci_A_low": low_a, "ci_A_high": high_a, "n_B": n_b,
                       "mean_B": mean_b, "ci_B_low": low_b, "ci_B_high": high_b, "diff": mean_a - mean_b,
                       "ci_low": np.nan, "ci_high": np.nan, "p": np.nan, "p_holm": np.nan,
                       "test": "permutation (uncorrected)", "note": ""}
                if n_a >= 2 and n_b >= 2 and np.ptp(np.concatenate([xa, xb])) > 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        ci = sps.ttest_ind(xa, xb, equal_var=False).confidence_interval(0.95)
                    row.update(ci_low=float(ci.low), ci_high=float(ci.high),
                               p=permutation_test(xa, xb, n_resamples=n_resamples, seed=seed)[1])
                else:
                    row["note"] = "fewer than 2 probes with a gap in a group, or no variance"
                out.append(row)
    return out


def _gap_per_probe(cells: pd.DataFrame, n_layers: int | None, labels: Sequence[str]) -> pd.DataFrame:
    """One gap per probe, site kind and quantity: every layer jointly (the bottom-up stack ending at the last layer,
    or a top-m set of every layer), each other top-m set, and the mean interaction over a probe's pairs; with the
    probe's ``labels``."""
    depth = int(n_layers) if n_layers else int(cells["size"].max())
    family, size, k = cells["family"].astype(str), cells["size"].astype(int), pd.to_numeric(cells["k"], "coerce")
    whole = ((family == "bottom") & (k == depth - 1)) | ((family == "top_m") & (size == depth))
    quantity = np.select([whole, family == "top_m", family == "pair"],
                         ["gap_all_layers", "gap_top" + k.fillna(0).astype(int).astype(str), "interaction_pairs"],
                         default="")
    keep = cells.assign(quantity=quantity)[quantity != ""]
    keys = ["probe_id", "site_kind", "quantity", *[c for c in ("metric", "positions") if c in keep.columns]]
    gaps = keep.groupby(keys, sort=True, dropna=False)["gap"].mean().reset_index()
    per_probe = keep.drop_duplicates("probe_id").set_index("probe_id")
    for c in labels:
        gaps[c] = gaps["probe_id"].map(per_probe[c])
    return gaps


def _additivity_slice(units: pd.DataFrame, kind: str, block: pd.DataFrame) -> dict[str, Any]:
    """The slice columns of the additivity rows of ``kind``: the analysed slice with the same site kind, metric,
    position selection and ``replace`` (the cells' own values where no such slice was analysed)."""
    want = {"site_kind": kind, "operation": "replace"}
    for c in ("metric", "positions"):
        if c in block.columns and block[c].notna().any():
            want[c] = str(block[c].iloc[0])
    match = units
    for c, v in want.items():
        if c in match.columns:
            match = match[match[c].astype(str) == v]
    if len(match):
        return {c: match.iloc[0][c] for c in SELECT_COLUMNS if c in match.columns}
    return want


# ------------------------------------------------------------------------------------------------- compositions
def read_compositions(meta: Mapping[str, Any], results_dir: str | Path | None = None,
                      field: str = "composes") -> dict[str, list[str]]:
    """Composed probe id -> its parts' ids, from the ``field`` of the probe file ``run.json``'s spec names (lists
    are set aside by the engine, so they are not result labels). Empty when the file cannot be found or read, or
    no probe lists two parts; the caller says so."""
    probes = ((meta.get("spec") or {}).get("probes") or {})
    name = probes.get("file") if isinstance(probes, Mapping) else None
    records: list[Any] = list(probes.get("inline") or []) if isinstance(probes, Mapping) else []
    if name and str(name).endswith(".jsonl"):
        candidates = [Path(name)] + ([Path(results_dir) / name, Path(results_dir).parent / name]
                                     if results_dir is not None and not Path(name).is_absolute() else [])
        for path in candidates:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                continue
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except ValueError:
                return {}
            break
    out = {}
    for r in records:
        parts = r.get(field) if isinstance(r, Mapping) else None
        if isinstance(parts, list) and len(parts) == 2 and r.get("id") is not None:
            out[str(r["id"])] = [str(p) for p in parts]
    return out


# ------------------------------------------------------------------------------------------------- for people
def _cell(row: Mapping[str, Any], a_b: bool = True) -> str:
    from analyses.formatting import fmt

    def interval(low: Any, high: Any) -> str:
        return f" [{fmt(low)}, {fmt(high)}]" if pd.notna(low) and pd.notna(high) else ""

    text = f"{fmt(row['mean_A'])} vs {fmt(row['mean_B'])}" if a_b else ""
    text += f"{', ' if text else ''}diff {fmt(row['diff'])}{interval(row['ci_low'], row['ci_high'])}"
    if pd.notna(row.get("p_holm")):
        text += f", Holm p {fmt(row['p_holm'])}"
    elif pd.notna(row.get("p")):
        text += f", p {fmt(row['p'])}"
    return text


def display(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The condensed views of a cross-domain table (one row per domain x slice x pair; slice columns that do not
    vary left out): the localization contrast (effective layers, 80 % window, centre of mass as "A vs B, diff
    [interval], Holm p"; the additivity gap of every layer jointly per group; the verdict), and where composed
    probes sit relative to their parts (one row per domain x slice x reference). Only formatting: every number is
    the table's."""
    if table.empty:
        return pd.DataFrame(), pd.DataFrame()
    keys = [c for c in SELECT_COLUMNS if c in table.columns and (c == "site_kind" or table[c].nunique() > 1)]
    loc = table[table["part"] == "localization"]
    add = table[(table["part"] == "additivity") & (table["quantity"] == "gap_all_layers")]
    rows = []
    for key, block in loc.groupby(["domain", *keys, "A", "B"], sort=False, dropna=False):
        by = {r["quantity"]: r for r in block.to_dict("records")}
        first = block.iloc[0]
        row = {"domain": key[0], **dict(zip(keys, key[1:-2], strict=True)), "groups": f"{first['A']} vs {first['B']}",
               "n": f"{_count(first['n_A'])} / {_count(first['n_B'])}"}
        for measure in ("eff_layers_pr", "window_width", "centre_of_mass"):
            row[MEASURE_WORDS[measure]] = _cell(by[measure]) if measure in by else "–"
        gap = add[(add["domain"] == key[0]) & (add["site_kind"] == first["site_kind"]) & (add["A"] == first["A"])
                  & (add["B"] == first["B"])]
        if "metric" in keys:
            gap = gap[gap["metric"] == first["metric"]]
        if len(add):
            row["additivity gap, all layers"] = _cell(gap.iloc[0]) if len(gap) else "–"
        row["verdict"] = first["verdict"]
        rows.append(row)
    comp_rows = []
    comp = table[table["part"] == "composition"]
    for key, block in comp.groupby(["domain", *keys, "A", "B"], sort=False, dropna=False):
        by = {r["quantity"]: r for r in block.to_dict("records")}
        first = block.iloc[0]
        row = {"domain": key[0], **dict(zip(keys, key[1:-2], strict=True)),
               "composed vs": str(first["B"]), "pairs": _count(first["n_A"])}
        for measure in COMPOSITION_MEASURES:
            row[MEASURE_WORDS[measure]] = _cell(by[measure]) if measure in by else "–"
        comp_rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(comp_rows)


def _count(value: Any) -> str:
    return "–" if pd.isna(value) else str(int(value))


def findings(table: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One sentence per domain and pair: the verdict per slice with the measures behind it (the concentration
    measures with Holm p < ``alpha``; the effective layers when none is), then one per domain with compositions:
    where the composed probes' centre of mass sits relative to their parts."""
    from analyses.formatting import fmt

    if table.empty:
        return []
    keys = [c for c in SELECT_COLUMNS if c in table.columns and (c == "site_kind" or table[c].nunique() > 1)]
    out = []
    loc = table[table["part"] == "localization"]
    for (value, a, b), block in loc.groupby(["domain", "A", "B"], sort=True):
        bits = []
        for key, part in block.groupby(keys, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            # the measures behind the verdict: the significant concentration measures, else the effective layers
            p = pd.to_numeric(part["p_holm"], errors="coerce")
            behind = part[part["quantity"].isin(list(LOCALIZING)) & (p < alpha)]
            if behind.empty:
                behind = part[part["quantity"] == "eff_layers_pr"]
            numbers = " and ".join(f"{MEASURE_WORDS[r['quantity']]} {fmt(r['mean_A'])} vs {fmt(r['mean_B'])}, "
                                   f"Holm p {fmt(r['p_holm'])}" for r in behind.to_dict("records"))
            verdict_words = part.iloc[0]["verdict"]
            bits.append(f"`{' '.join(map(str, key))}`: {verdict_words}" + (f" ({numbers})" if numbers else ""))
        out.append(f"{value} ({a} vs {b}, n = {_count(block['n_A'].max())} / {_count(block['n_B'].max())}): "
                   + "; ".join(bits) + ".")
    comp = table[(table["part"] == "composition") & (table["quantity"] == "centre_of_mass")
                 & (table["B"] == "both hops (mean)")]
    for value, block in comp.groupby("domain", sort=True):
        bits = [f"`{' '.join(str(r[c]) for c in keys)}` {_cell(r)}" for r in block.to_dict("records")]
        out.append(f"{value}: centre of mass of the composed probes vs the mean of their two hops (relative depth, "
                   f"n = {_count(block['n_A'].max())} pairs): " + "; ".join(bits) + ".")
    return out


def methods_sentences(table: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The Methods sentences of the cross-domain table (only the parts it holds)."""
    if table.empty:
        return []
    domain, group = table["domain_label"].iloc[0], table["group_label"].iloc[0]
    domains = ", ".join(map(str, sorted(table["domain"].unique(), key=str)))
    out = [f"Cross-domain table: the localization analysis repeated within each `{domain}` ({domains}) on that "
           f"domain's probes, `{group}` groups compared as above (Welch interval of the difference, permutation "
           f"test, Holm across the {len(MEASURES)} measures of each domain x slice x pair). The verdict names the "
           f"group that every concentration measure (effective layers, peak share, 80 % window) with Holm p < "
           f"{alpha:g} calls more localized, \"mixed\" when they disagree, \"cannot tell\" when none is significant."]
    if (table["part"] == "additivity").any():
        out.append("Per domain and group, the additivity gap (joint - sum of single layers) per probe with its t "
                   "interval, and the group difference with its Welch interval and a permutation p (uncorrected).")
    if (table["part"] == "composition").any():
        out.append("Composed (two-hop) probes paired with their own one-hop parts (`composes`): per measure the "
                   "composed probe minus its first hop, its second hop and the mean of both; mean paired "
                   "difference with its t interval, paired t-test, Holm across "
                   f"{len(COMPOSITION_MEASURES)} measures per reference. A hop shared by several compositions "
                   "enters each of their pairs.")
    return out


# ------------------------------------------------------------------------------------------------- the analysis
def attach_domains(result: Any) -> pd.DataFrame | None:
    """The cross-domain table of an :class:`analyses.pipeline.Analysis` whose options name a ``domain`` label:
    written as ``cross_domain.csv``, its Methods appended, its section added to the report (``result.derived``).
    Returns the table (None when the analysis has no domain label or no group)."""
    from analyses.derived import Section

    o = result.options
    domain, group = o.get("domain"), o.get("group")
    if not domain:
        return None
    if not group:
        _skip(result, [{"test": "cross_domain", "reason": f"no group with 2+ values: the cross-domain table compares "
                                                          f"groups within each {domain}"}])
        return None
    additivity = next((s.data for s in result.derived if s.key == "additivity"), None)
    opts = o.get("analysis") or {}
    subject = "clean_prompt" if opts.get("subject") == "clean_prompt" else "probe_id"
    composes = read_compositions(result.meta, result.results_dir)
    agg = o.get("agg") if o.get("agg") in AGGS else None  # the legacy keyword; else the named rules
    table, skipped = cross_domain_table(
        result.data, result.tables["units"], domain=domain, group=group, dv=o.get("dv", "recovery"),
        subject=subject, n_layers=(result.meta.get("model") or {}).get("n_layers"),
        cross_model=bool(result.meta.get("source_model")), position_reduction=opts.get("position_reduction", "last"),
        subject_field=opts.get("subject_field", "subject"), agg=agg, missing=o.get("missing", "drop_subjects"),
        seed=o.get("seed", 0), alpha=o.get("alpha", 0.05), additivity=additivity, composes=composes)
    result.files.append(atomic_write_frame(result.out_dir / CROSS_DOMAIN_FILE, table))
    result.tables["cross_domain"] = table
    _skip(result, [{**{k: v for k, v in s.items() if k != "domain"}, "test": f"cross_domain:{s['test']}",
                    "reason": f"{domain} {s['domain']}: {s['reason']}"} for s in skipped])
    result.methods += methods_sentences(table, o.get("alpha", 0.05))
    contrast, composed = display(table)
    shown = {f"Localization within each {domain}: A vs B (mean per group), difference A - B [95 % interval]":
             contrast}
    if len(composed):
        shown["Composed probes vs their parts (paired), difference composed - part [95 % t interval]"] = composed
    result.derived.append(Section("cross_domain", f"Across domains: localization within each `{domain}`",
                                  findings(table, o.get("alpha", 0.05)), shown, []))
    return table


def _skip(result: Any, rows: list[dict[str, Any]]) -> None:
    """Record what the cross-domain table could not compute in the analysis' ``skipped`` table and its CSV."""
    if not rows:
        return
    skipped = pd.concat([result.tables["skipped"], pd.DataFrame(rows)], ignore_index=True)
    result.tables["skipped"] = skipped
    atomic_write_frame(result.out_dir / "skipped.csv", skipped)
