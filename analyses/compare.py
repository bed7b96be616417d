"""``clap compare RUN_A RUN_B``: did model B (e.g. fine-tuned) change where the answer is recovered, relative to A?

Both runs must have patched the same probes at the same sites: probes are matched by id, and a mismatch (ids in
one run only, the same id with a different clean or corrupted prompt, other answer tokens, other prompt tokens or
labels, different sites) is refused with a :class:`~clap.errors.ClapError` listing a few, because a difference
between unmatched probes says nothing about the models. Every number is paired: per probe and layer the value of B
minus that of A (each reduced to one value per probe and layer by the rule of :mod:`analyses.select`, under the
same ``analysis:`` options as ``clap analyze``: position and head reductions, the subject field, and the exclusion
rules, which drop a probe from both runs when it fails them in either).

Per slice (metric, site kind, operation, direction, positions):

* ``differences``: per layer, mean of A, of B, of the paired difference B - A with its t-based 95 % interval,
  the paired t-test and its Holm-corrected p over the slice's layers;
* ``anova``: a two-way repeated-measures ANOVA, ``layer`` x ``model`` both within probes (pingouin
  ``rm_anova``), on probes complete in both runs: ``model`` says B differs from A on average, the interaction
  that the difference depends on the layer;
* a layer x site-kind heatmap of the mean difference, and ``compare.html`` / ``compare.md``.

Models of different depth (``run.json``'s ``model.n_layers``), or any two runs when asked (``relative_depth``), are
paired per probe and **relative depth bin** instead of layer (:mod:`analyses.depth`: how layers are binned and how
the cumulative residual stream and per-layer contributions become one value per bin): the same tables, test,
ANOVA (``depth_bin`` x ``model``), heatmap and findings, over bins. Their sites differ with the depth, and their
tokenizers may differ, so there the probes are matched by id, labels and prompt text
(:func:`check_matched_across_depth`) and the site kinds, not the sites, must overlap.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.formatting import (
    figure_html,
    figure_markdown,
    html_page,
    html_table,
    list_html,
    markdown_table,
    slice_title,
    slug,
    stat_table_html,
)
from analyses.io import load_results
from analyses.select import SELECT_COLUMNS, AnalysisWarning, analysis_units, prepare
from clap.contract import SITE_KINDS, atomic_write_frame, atomic_write_json, atomic_write_text
from clap.errors import ClapError
from clap.outputs import prepare_output_dir

#: The findings as data beside ``compare.html``, read by ``clap run``'s study page.
FINDINGS_FILE = "findings.json"
#: How many offending probes or sites an error message lists.
SHOW = 5

DIFF_COLUMNS = ["layer", "n", "mean_A", "mean_B", "diff", "ci_low", "ci_high", "T", "dof", "p_unc", "p_corr"]
ANOVA_COLUMNS = ["Source", "SS", "ddof1", "ddof2", "MS", "F", "p_unc", "p_GG_corr", "eps", "np2", "n_subjects"]


@dataclass
class Comparison:
    """What :func:`compare` computed and wrote."""

    run_a: Path
    run_b: Path
    out_dir: Path
    differences: pd.DataFrame
    anova: pd.DataFrame
    paired: pd.DataFrame
    meta_a: dict[str, Any]
    meta_b: dict[str, Any]
    group: str | None = None
    files: list[Path] = field(default_factory=list)
    #: the analysis options every value was computed under (``position_reduction``, exclusion rules, ...)
    options: dict[str, Any] = field(default_factory=dict)
    #: probes dropped by the exclusion rules: ``probe_id``, ``run`` (A, B or both) and ``reason``
    excluded: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["probe_id", "run", "reason"]))
    dv: str = "recovery"
    #: what values are paired per: ``layer``, or ``depth_bin`` in a comparison by relative depth
    level: str = "layer"
    #: relative depth bins (None: paired by layer) and each model's number of layers
    bins: int | None = None
    depths: tuple[int, int] | None = None
    #: slices or bins left out of a relative-depth comparison, with the reason
    notes: list[str] = field(default_factory=list)

    @property
    def level_words(self) -> tuple[str, str]:
        """How the report names the level, singular and plural."""
        from analyses.depth import LEVEL_WORDS

        return ("layer", "layers") if self.level == "layer" else LEVEL_WORDS


def _listing(items: list[Any]) -> str:
    items = sorted(map(str, items))
    return ", ".join(items[:SHOW]) + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")


#: what each run's ``run.json`` records per probe and must be equal between the runs for a probe to be paired
PROBE_FIELDS = ("clean", "corrupted", "answer_ids", "wrong_ids")


def check_same_probes(meta_a: dict[str, Any], meta_b: dict[str, Any], names: tuple[str, str] = ("A", "B"),
                      fields: tuple[str, ...] = PROBE_FIELDS) -> None:
    """Refuse two runs in which one probe id stands for different probes: per probe, the clean and the corrupted
    prompt and the answer and wrong-answer tokens recorded in each ``run.json`` must be equal. (The results' rows
    carry only the tokens at patched positions: a prompt changed elsewhere, same length, would pass unseen.) Runs
    whose sidecars do not record their probes are checked on their rows only (:func:`check_matched`). ``fields``:
    what is compared (models of different vocabularies: the prompts only)."""
    def recorded(meta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        probes = meta.get("probes")
        if not isinstance(probes, list) or not probes:
            return None
        return {str(p["probe_id"]): p for p in probes if isinstance(p, dict) and "probe_id" in p}

    probes_a, probes_b = recorded(meta_a), recorded(meta_b)
    if probes_a is None or probes_b is None:
        return
    differ: list[str] = []
    for pid in sorted(set(probes_a) & set(probes_b)):
        changed = [f for f in fields if probes_a[pid].get(f) != probes_b[pid].get(f)]
        if changed:
            first = changed[0]
            differ.append(f"{pid} ({', '.join(changed)}; {first}: {probes_a[pid].get(first)!r} in {names[0]}, "
                          f"{probes_b[pid].get(first)!r} in {names[1]})")
    if differ:
        shown = "; ".join(differ[:SHOW]) + (f"; and {len(differ) - SHOW} more" if len(differ) > SHOW else "")
        raise ClapError(f"{len(differ)} probe id(s) stand for different probes in the two runs: {shown}. The same id "
                        "must mean the same prompts and answers; rerun both models on one probe file")


def check_matched(a: pd.DataFrame, b: pd.DataFrame, group_columns: list[str],
                  names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse runs whose probes or sites do not match (see the module docstring)."""
    _check_ids(a, b, names)
    bad, tok_a, tok_b = _token_mismatches(a, b)
    _check_labels(a, b, group_columns)
    if bad:
        pid = bad[0]
        ta = "".join(tok_a.loc[pid].astype(str).tolist())
        tb = "".join(tok_b.loc[pid].astype(str).tolist())
        raise ClapError(f"{len(bad)} probe(s) have different prompt tokens in the two runs ({_listing(bad)}; "
                        f"{pid}: {ta!r} vs {tb!r}): the same id must mean the same prompt")
    sites_a, sites_b = set(a["site"]), set(b["site"])
    if sites_a != sites_b:
        parts = [f"{len(s)} only in {n} ({_listing(list(s))})"
                 for s, n in ((sites_a - sites_b, names[0]), (sites_b - sites_a, names[1])) if s]
        raise ClapError(f"the runs patched different sites: {'; '.join(parts)}; compare runs of the same study spec")


def _check_ids(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> None:
    """Refuse runs that hold different probe ids, naming a few of each side's."""
    ids_a, ids_b = set(a["probe_id"]), set(b["probe_id"])
    only_a, only_b = ids_a - ids_b, ids_b - ids_a
    if only_a or only_b:
        parts = [f"{len(s)} only in {n} ({_listing(list(s))})"
                 for s, n in ((only_a, names[0]), (only_b, names[1])) if s]
        raise ClapError(f"the runs hold different probes: {'; '.join(parts)}; compare runs of the same probe set")


def _check_labels(a: pd.DataFrame, b: pd.DataFrame, group_columns: list[str]) -> None:
    """Refuse a probe whose text columns or labels differ between the runs."""
    text_cols = [c for c in ("prompt", "answer", "answers", "target", "source_prompt", *group_columns)
                 if c in a.columns and c in b.columns]
    for col in text_cols:
        va = a.drop_duplicates("probe_id").set_index("probe_id")[col].astype(str)
        vb = b.drop_duplicates("probe_id").set_index("probe_id")[col].astype(str).reindex(va.index)
        differ = va.index[(va != vb).to_numpy()].tolist()
        if differ:
            raise ClapError(f"column {col!r} differs between the runs for {len(differ)} probe(s) ({_listing(differ)}): "
                            "the same id must mean the same probe")


def _token_mismatches(a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[str], pd.Series, pd.Series]:
    """Probes whose prompt token differs at a position both runs patched, and each run's tokens by position."""
    single = a["position"].notna()
    tok_a = a.loc[single].drop_duplicates(["probe_id", "position"]).set_index(["probe_id", "position"])["token"]
    tok_b = (b.loc[b["position"].notna()].drop_duplicates(["probe_id", "position"])
             .set_index(["probe_id", "position"])["token"])
    both = tok_a.index.intersection(tok_b.index)
    bad = sorted({pid for pid, _ in both[(tok_a.loc[both].astype(str) != tok_b.loc[both].astype(str)).to_numpy()]})
    return bad, tok_a, tok_b


def check_matched_across_depth(a: pd.DataFrame, b: pd.DataFrame, meta_a: dict[str, Any], meta_b: dict[str, Any],
                               group_columns: list[str], names: tuple[str, str] = ("A", "B")) -> bool:
    """The matching of a relative-depth comparison, whose models may tokenize differently: the same probe ids and
    labels; where both runs tokenized the prompts alike (the same tokens at the same positions) the same tokens and
    answer ids (:func:`check_same_probes`), else the same clean and corrupted prompts as text (``run.json``'s probes:
    token ids of different vocabularies cannot be compared); at least one site kind with layers in both runs (the
    sites themselves differ with the depth). Returns whether the tokenizations were the same."""
    _check_ids(a, b, names)
    _check_labels(a, b, group_columns)
    bad, tok_a, tok_b = _token_mismatches(a, b)
    same_tokens = not bad and set(tok_a.index) == set(tok_b.index)
    if same_tokens:
        check_same_probes(meta_a, meta_b, names)
    else:
        if not all(isinstance(m.get("probes"), list) and m["probes"] for m in (meta_a, meta_b)):
            raise ClapError("the runs tokenized the prompts differently and their run.json files do not record the "
                            "probes' prompts, so it cannot be told whether each id means the same probe; rerun "
                            "with this version of clap (run.json records each probe's prompts)")
        check_same_probes(meta_a, meta_b, names, fields=("clean", "corrupted"))
    kinds_a = set(a.loc[a["layer"].notna(), "site_kind"])
    kinds_b = set(b.loc[b["layer"].notna(), "site_kind"])
    if not kinds_a & kinds_b:
        raise ClapError(f"nothing to align by relative depth: no site kind with layers in both runs ({names[0]}: "
                        f"{', '.join(sorted(kinds_a)) or 'none'}; {names[1]}: {', '.join(sorted(kinds_b)) or 'none'})")
    return same_tokens


def paired_values(a: pd.DataFrame, b: pd.DataFrame, dv: str = "recovery", group: str | None = None,
                  agg: str | None = None, position_reduction: str | int = "last",
                  head_reduction: str = "sum", subject_field: str = "subject") -> pd.DataFrame:
    """One row per slice, probe and layer present in both runs: ``value_A``, ``value_B``, ``diff`` (B - A).

    A probe's rows in one layer become one value by the same named rules as :func:`analyses.prepare` (default: its
    last token; heads summed per layer), recorded in the ``reduction`` column: a mean over positions would erase
    the layer effect (recovery is roughly conserved across positions)."""
    frames = []
    for sel, prep_a, pb in _per_layer(a, b, dv, group, agg, position_reduction, head_reduction, subject_field):
        pa = prep_a.data
        keys = ["probe_id", "layer", *([group] if group else [])]
        m = pa.merge(pb, on=keys, suffixes=("_A", "_B"))
        m = m.rename(columns={f"{dv}_A": "value_A", f"{dv}_B": "value_B"})
        m["diff"] = m["value_B"] - m["value_A"]
        for k, v in sel.items():
            m[k] = v
        m["reduction"] = prep_a.reduction
        frames.append(m)
    if not frames:
        raise ClapError("no slice with values in both runs (undefined or trivial everywhere?)")
    return pd.concat(frames, ignore_index=True)


def _per_layer(a: pd.DataFrame, b: pd.DataFrame, dv: str, group: str | None, agg: str | None,
               position_reduction: str | int, head_reduction: str, subject_field: str,
               skipped: list[str] | None = None) -> Iterator[tuple[dict[str, Any], Any, pd.DataFrame]]:
    """Per slice of run A: its selection, A's prepared per-layer values and B's (one value per probe and layer by
    the analysis rules); a slice either run cannot give values for is left out (its reason in ``skipped``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for unit in analysis_units(a).to_dict("records"):
            sel = {c: unit[c] for c in SELECT_COLUMNS if c in unit}
            kw = dict(between=group, missing="keep", agg=agg, position_reduction=position_reduction,
                      head_reduction=head_reduction, subject_field=subject_field, min_subjects=1, min_per_group=1,
                      min_groups=1, min_levels=1, **sel)
            try:
                prep_a = prepare(a, dv, "layer", "probe_id", **kw)
                pb = prepare(b, dv, "layer", "probe_id", **kw).data
            except ClapError as exc:
                if skipped is not None:
                    skipped.append(f"{slice_title(sel)}: {exc}")
                continue
            yield sel, prep_a, pb


def depth_paired_values(a: pd.DataFrame, b: pd.DataFrame, depths: tuple[int, int], bins: int, dv: str = "recovery",
                        group: str | None = None, agg: str | None = None, position_reduction: str | int = "last",
                        head_reduction: str = "sum", subject_field: str = "subject",
                        notes: list[str] | None = None) -> pd.DataFrame:
    """One row per slice, probe and relative depth bin holding values in both runs (:mod:`analyses.depth`):
    ``value_A``, ``value_B``, ``diff`` (B - A), the bin's ``depth_range`` and the layers of each model it was made
    from (``layers_A``, ``layers_B``). Slices that cannot be aligned (raw module sites, heads one by one, a slice
    one run lacks, no bin measured in both) are left out, each with its reason in ``notes``; when nothing is left
    the comparison is refused."""
    from analyses import depth

    notes = notes if notes is not None else []
    frames = []
    group_keys = (group,) if group else ()
    for sel, prep_a, pb in _per_layer(a, b, dv, group, agg, position_reduction, head_reduction, subject_field,
                                      notes):
        kind = sel.get("site_kind")
        if kind not in depth.STATE_KINDS + depth.CONTRIBUTION_KINDS:
            notes.append(f"{slice_title(sel)}: {kind} sites are not aligned by relative depth (raw module names "
                         "are architecture-specific)")
            continue
        binned = [depth.to_bins(p, n, bins, kind, dv, ("probe_id", *group_keys))
                  for p, n in ((prep_a.data, depths[0]), (pb, depths[1]))]
        common = sorted(set(binned[0].layers) & set(binned[1].layers))
        only = [sorted(set(x.layers) - set(common)) for x in binned]
        if only[0] or only[1]:
            notes.append(f"{slice_title(sel)}: relative depth bin(s) measured in one run only left out ("
                         + "; ".join(f"{'AB'[i]}: {', '.join(map(str, o))}" for i, o in enumerate(only) if o) + ")")
        if not common:
            continue
        m = binned[0].values.merge(binned[1].values, on=["probe_id", depth.LEVEL, *group_keys],
                                   suffixes=("_A", "_B"))
        m = m.rename(columns={f"{dv}_A": "value_A", f"{dv}_B": "value_B"})
        m["diff"] = m["value_B"] - m["value_A"]
        m["depth_range"] = [depth.bin_range(int(i), bins) for i in m[depth.LEVEL]]
        for label, x in zip(("layers_A", "layers_B"), binned, strict=True):
            m[label] = [", ".join(map(str, x.layers[int(i)])) for i in m[depth.LEVEL]]
        for k, v in sel.items():
            m[k] = v
        m["reduction"] = prep_a.reduction
        m["bin_scale_A"], m["bin_scale_B"] = binned[0].scale, binned[1].scale
        frames.append(m)
    if not frames:
        raise ClapError("nothing to align by relative depth: no slice has a relative depth bin with values in both "
                        "runs" + (f" ({'; '.join(notes[:SHOW])})" if notes else ""))
    return pd.concat(frames, ignore_index=True)


def _exclude(a: pd.DataFrame, meta_a: dict[str, Any], b: pd.DataFrame, meta_b: dict[str, Any],
             opts: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Both runs without the probes that fail the exclusion rules in either, and the table of those probes."""
    from analyses.validity import apply_exclusions, probe_validity

    rules = dict(min_clean_logit_diff=opts.min_clean_logit_diff, require_flip=opts.require_flip,
                 min_abs_diff=opts.min_abs_diff)
    reasons: dict[str, dict[str, str]] = {}
    for label, data, meta in (("A", a, meta_a), ("B", b, meta_b)):
        _, validity = apply_exclusions(data, probe_validity(data, meta), **rules)
        for pid, reason in validity.loc[validity["excluded"], ["probe_id", "reason"]].itertuples(index=False):
            reasons.setdefault(pid, {})[label] = reason
    rows = [{"probe_id": pid, "run": "both" if len(by) == 2 else next(iter(by)),
             "reason": "; ".join(f"{k}: {v}" for k, v in sorted(by.items()))} for pid, by in sorted(reasons.items())]
    table = pd.DataFrame(rows, columns=["probe_id", "run", "reason"])
    if reasons and len(reasons) == a["probe_id"].nunique():
        raise ClapError(f"every probe was excluded by the analysis rules in run A or B ({len(reasons)} probes); see "
                        "each run's probe validity table")
    return a[~a["probe_id"].isin(reasons)], b[~b["probe_id"].isin(reasons)], table


def layer_differences(paired: pd.DataFrame, ci: float = 0.95, level: str = "layer") -> pd.DataFrame:
    """Per slice and layer (or ``level``: ``depth_bin``): means, the paired difference with its t interval, paired
    t-test, Holm over the slice's layers (bins)."""
    import pingouin as pg
    from scipy import stats as sps

    keys = [c for c in SELECT_COLUMNS if c in paired.columns]
    rows = []
    for key, part in paired.groupby(keys, sort=True):
        sel = dict(zip(keys, key, strict=True))
        block = []
        for layer, cell in part.groupby(level, sort=True):
            d = cell["diff"].to_numpy(float)
            n = len(d)
            row = {**sel, level: layer, "n": n, "mean_A": cell["value_A"].mean(), "mean_B": cell["value_B"].mean(),
                   "diff": d.mean(), "ci_low": np.nan, "ci_high": np.nan, "T": np.nan, "dof": n - 1, "p_unc": np.nan}
            if n >= 2 and d.std(ddof=1) > 0:
                res = sps.ttest_rel(cell["value_B"].to_numpy(float), cell["value_A"].to_numpy(float))
                half = sps.t.ppf(1 - (1 - ci) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
                row.update(ci_low=d.mean() - half, ci_high=d.mean() + half, T=float(res.statistic),
                           p_unc=float(res.pvalue))
            block.append(row)
        frame = pd.DataFrame(block)
        ok = frame["p_unc"].notna()
        frame["p_corr"] = np.nan
        if ok.any():
            frame.loc[ok, "p_corr"] = pg.multicomp(frame.loc[ok, "p_unc"].to_numpy(), method="holm")[1]
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)[[*keys, level, *DIFF_COLUMNS[1:]]]


def layer_model_anova(paired: pd.DataFrame, level: str = "layer") -> pd.DataFrame:
    """Per slice: two-way repeated-measures ANOVA (``layer`` x ``model``, both within probes; or ``level`` x
    ``model``) on complete probes."""
    import pingouin as pg

    keys = [c for c in SELECT_COLUMNS if c in paired.columns]
    out = []
    for key, part in paired.groupby(keys, sort=True):
        sel = dict(zip(keys, key, strict=True))
        wide = part.pivot(index="probe_id", columns=level, values="diff")
        complete = wide.index[wide.notna().all(axis=1)]
        part = part[part["probe_id"].isin(complete)]
        if len(complete) < 2 or part[level].nunique() < 2:
            continue
        long = pd.concat([
            part[["probe_id", level]].assign(model="A", value=part["value_A"]),
            part[["probe_id", level]].assign(model="B", value=part["value_B"]),
        ], ignore_index=True)
        long[level] = long[level].astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pg.rm_anova(long, dv="value", within=[level, "model"], subject="probe_id", detailed=True,
                              effsize="np2")
        for _, r in res.iterrows():
            out.append({**sel, "Source": r["Source"], "SS": r["SS"], "ddof1": r["ddof1"], "ddof2": r["ddof2"],
                        "MS": r["MS"], "F": r["F"], "p_unc": r["p_unc"], "p_GG_corr": r.get("p_GG_corr", np.nan),
                        "eps": r.get("eps", np.nan), "np2": r.get("np2", np.nan), "n_subjects": len(complete)})
    return pd.DataFrame(out, columns=[*keys, *ANOVA_COLUMNS])


def compare(run_a: str | Path, run_b: str | Path, out_dir: str | Path, *, dv: str = "recovery",
            group: str | None = None, agg: str | None = None, analysis: Any = None,
            position_reduction: str | int | None = None, head_reduction: str | None = None, alpha: float = 0.05,
            figures: bool = True, dpi: int = 200, relative_depth: int | None = None) -> Comparison:
    """Load both runs, check they match, compute the paired tables and write tables, figure and report.

    Every number is paired per probe and layer (B - A; see the module docstring), so the two runs must have
    patched the same probes at the same sites; models of different depth are paired per probe and relative depth
    bin instead (``relative_depth``).

    Parameters
    ----------
    run_a, run_b : str or Path
        Results folders of the reference model (A) and of the model compared with it (B, e.g. fine-tuned).
    out_dir : str or Path
        Where ``paired_differences.csv``, ``layer_differences.csv``, ``layer_model_anova.csv``, the figures and
        ``compare.html`` / ``compare.md`` are written.
    dv : str, default "recovery"
        The variable compared.
    group : str, optional
        A probe label of both runs; default the ``analysis.group`` their specs declare, else ``knowledge_type``
        when both carry it, else the first shared label that can group probes (never a provenance label such as
        ``pmids`` or ``bioasq_id``; :mod:`clap.groups`).
    agg : str, optional
        Legacy: one pandas aggregation over a probe's rows at one layer instead of the named reductions.
    analysis : AnalysisOptions or dict, optional
        The ``analysis:`` options (:mod:`clap.analysis_options`), as ``clap analyze`` takes them; default the
        ``analysis:`` section recorded in run A's ``run.json``. The position and head reductions and the subject
        field decide each value; the exclusion rules drop a probe (from both runs) that fails them in either run.
    position_reduction : str or int, optional
        Overrides ``analysis``'s: how a probe's rows at several positions of one layer become one value
        (:mod:`analyses.reductions`).
    head_reduction : {"sum", "each"}, optional
        Overrides ``analysis``'s: heads of one layer are summed (the layer's total), never averaged.
    alpha : float, default 0.05
        Significance level for highlighting in the reports.
    figures : bool, default True
        Draw the difference heatmaps.
    dpi : int, default 200
        Resolution of the PNG figures.
    relative_depth : int, optional
        Pair by relative depth bin instead of layer, with this many bins (:mod:`analyses.depth`). Default: by
        relative depth with ``min(n_layers_A, n_layers_B)`` bins when the models' depths (``run.json``'s
        ``model.n_layers``) differ, else by layer. The tables are then ``depth_differences.csv``,
        ``depth_model_anova.csv`` (``depth_bin`` x ``model``) and ``depth_bins.csv`` (each model's layers per bin),
        and the models may tokenize differently (the prompts are then matched as text).

    Returns
    -------
    Comparison
        ``differences`` (per slice and layer: ``mean_A``, ``mean_B``, ``diff`` with its interval, paired t-test,
        Holm-corrected ``p_corr``), ``anova`` (``layer`` x ``model``), ``paired`` (the per-probe values) and
        ``files`` (everything written); by relative depth, ``depth_bin`` in place of ``layer``.

    Raises
    ------
    clap.errors.ClapError
        Runs whose probes or sites do not match, or a ``group`` not in both runs; by relative depth, runs with
        nothing to align (no site kind with layers in both, no bin with values in both) or without
        ``model.n_layers``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from analyses.compare import compare
    >>> from analyses.synthetic import write_synthetic
    >>> kw = dict(n_probes=8, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     a = write_synthetic(Path(tmp) / "a", **kw)
    ...     b = write_synthetic(Path(tmp) / "b", layer_effect=1.2, seed=1, **kw)
    ...     result = compare(a, b, Path(tmp) / "cmp", figures=False)
    >>> result.differences[["layer", "n", "mean_A", "mean_B", "diff", "p_corr"]].round(3)
       layer  n  mean_A  mean_B   diff  p_corr
    0      0  8   0.190   0.117 -0.073   0.813
    1      1  8   0.392   0.847  0.454   0.026
    2      2  8   0.577   0.748  0.171   0.186
    3      3  8   0.193   0.131 -0.062   0.813
    >>> result.anova[["Source", "ddof1", "ddof2"]]
              Source  ddof1  ddof2
    0          layer      3     21
    1          model      1      7
    2  layer * model      3     21
    """
    from analyses.options import resolve_options

    a, meta_a = load_results(run_a)
    b, meta_b = load_results(run_b)
    opts = resolve_options(meta_a, analysis, position_reduction=position_reduction, head_reduction=head_reduction)
    group = comparison_group(group if group is not None else getattr(opts, "group", None), a, b, meta_a, meta_b)
    names = (str(run_a), str(run_b))
    group_columns = [g for g in meta_a["group_columns"] if g in b.columns]
    bins, depths = _depth_plan(relative_depth, a, meta_a, b, meta_b, names)
    if bins is None:
        check_same_probes(meta_a, meta_b, names)
        check_matched(a, b, group_columns, names=names)
    else:
        check_matched_across_depth(a, b, meta_a, meta_b, group_columns, names)
    prepare_output_dir(out_dir, holds="the comparison's tables, figures and reports are written into a folder")
    a, b, excluded = _exclude(a, meta_a, b, meta_b, opts)
    reduce = (dv, group, agg, opts.position_reduction, opts.head_reduction, opts.subject_field)
    notes: list[str] = []
    if bins is None:
        paired, level = paired_values(a, b, *reduce), "layer"
    else:
        from analyses import depth

        paired, level = depth_paired_values(a, b, depths, bins, *reduce, notes=notes), depth.LEVEL
    differences = layer_differences(paired, level=level)
    if bins is not None:
        differences = _with_bin_layers(differences, paired)
    result = Comparison(Path(run_a), Path(run_b), Path(out_dir), differences, layer_model_anova(paired, level),
                        paired, meta_a, meta_b, group, options=opts.model_dump(), excluded=excluded, dv=dv,
                        level=level, bins=bins, depths=depths, notes=notes)
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    prefix = "layer" if bins is None else "depth"
    tables = [("paired_differences", paired), (f"{prefix}_differences", result.differences),
              (f"{prefix}_model_anova", result.anova), ("excluded_probes", excluded)]
    if bins is not None:
        tables.append(("depth_bins", depth_bins_table(depths, bins)))
    for name, table in tables:
        path = atomic_write_frame(out / f"{name}.csv", table)
        result.files.append(path)
    figs = difference_figures(result, out / "figures", dpi=dpi) if figures else []
    result.files += [p for _, paths in figs for p in paths]
    atomic_write_text(out / "compare.html", render_html(result, figs, alpha))
    atomic_write_text(out / "compare.md", render_markdown(result, figs, alpha))
    atomic_write_json(out / FINDINGS_FILE, findings_record(result, alpha))
    result.files += [out / "compare.html", out / "compare.md", out / FINDINGS_FILE]
    return result


def _depth_plan(requested: int | None, a: pd.DataFrame, meta_a: dict[str, Any], b: pd.DataFrame,
                meta_b: dict[str, Any], names: tuple[str, str]) -> tuple[int | None, tuple[int, int] | None]:
    """``(bins, (n_layers_A, n_layers_B))`` of a relative-depth comparison, or ``(None, None)`` to pair by layer:
    by relative depth when asked (``requested`` bins) or when the runs' models differ in depth."""
    from analyses import depth

    recorded = [(m.get("model") or {}).get("n_layers") for m in (meta_a, meta_b)]
    if requested is None and (None in recorded or recorded[0] == recorded[1]):
        return None, None  # equal (or unrecorded) depths: pair by layer, exactly as ever
    depths = (depth.model_depth(meta_a, a, names[0]), depth.model_depth(meta_b, b, names[1]))
    return depth.resolve_bins(requested, *depths), depths


def depth_bins_table(depths: tuple[int, int], bins: int) -> pd.DataFrame:
    """``depth_bins.csv``: every layer of both models with its relative depth and bin."""
    from analyses import depth

    return pd.concat([depth.bin_table(n, bins).assign(model=m, n_layers=n)
                      for m, n in zip("AB", depths, strict=True)], ignore_index=True)[
        ["model", "n_layers", "layer", "relative_depth", depth.LEVEL, "depth_range"]]


def _with_bin_layers(differences: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """The relative-depth differences with each bin's depth range and the layers of A and B it was made from."""
    from analyses import depth

    keys = [c for c in SELECT_COLUMNS if c in differences.columns] + [depth.LEVEL]
    info = paired.drop_duplicates(keys)[[*keys, "depth_range", "layers_A", "layers_B"]]
    merged = differences.merge(info, on=keys, how="left")
    front = [*keys, "depth_range", "layers_A", "layers_B"]
    return merged[front + [c for c in merged.columns if c not in front]]


def comparison_findings(result: Comparison, alpha: float = 0.05) -> list[tuple[str, list[str]]]:
    """``(slice heading, sentences)`` per slice (:func:`analyses.findings.comparison_findings`), from the very tables
    ``compare.html`` prints; ``compare.html`` / ``.md`` show them first and ``findings.json`` holds them."""
    from analyses.findings import comparison_findings as sentences

    keys = [c for c in SELECT_COLUMNS if c in result.differences.columns]
    out = []
    for key, _ in result.differences.groupby(keys, sort=True) if keys else []:
        unit = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        lines = sentences(result.differences, result.anova, unit, alpha, result.dv, result.level, result.level_words)
        if lines:
            out.append((slice_title(unit), lines))
    return out


def findings_record(result: Comparison, alpha: float = 0.05) -> dict[str, Any]:
    """What ``findings.json`` of a comparison holds (read by ``clap run``'s study page)."""
    found = comparison_findings(result, alpha)
    return {"kind": "comparison", "group": result.group, "dv": result.dv, "alpha": alpha,
            "n_probes": int(result.paired["probe_id"].nunique()),
            "slices": [{"slice": h, "headline": lines, "findings": lines} for h, lines in found]}


def comparison_group(group: str | None, a: pd.DataFrame, b: pd.DataFrame, meta_a: dict[str, Any],
                     meta_b: dict[str, Any]) -> str | None:
    """The group of a comparison: ``group`` (``--group``), else the ``analysis.group`` the runs' specs declare,
    else the default of :mod:`clap.groups` (``knowledge_type``; never a provenance label such as ``pmids``) over
    the labels both runs carry. A group that is not a label of both runs raises :class:`ClapError`."""
    from analyses.tables import probe_labels
    from clap.groups import resolve_group

    analyses = [(m.get("spec") or {}).get("analysis") or {} for m in (meta_a, meta_b)]
    if group is None:
        group = next((x.get("group") for x in analyses if x.get("group")), None)
    in_b = set(meta_b.get("group_columns") or []) & set(b.columns)
    shared = {k: v for k, v in probe_labels(meta_a, a).items() if k in in_b}
    subject_field = analyses[0].get("subject_field") or "subject"
    return resolve_group(group, shared, subject_field, where="group (--group, analysis.group; a label of both runs)")


def difference_figures(result: Comparison, fig_dir: Path, dpi: int = 200) -> list[tuple[str, list[Path]]]:
    """A layer x site-kind heatmap of the mean paired difference (B - A) per metric slice, one panel per group
    (relative depth bin x site kind when the models differ in depth)."""
    from analyses import figures as _figures

    made = []
    paired = result.paired
    if result.level != "layer":  # the heatmaps' columns are the level, whatever it is called
        paired = paired.drop(columns=["layer"], errors="ignore").rename(columns={result.level: "layer"})
    per = "" if result.level == "layer" else f" per {result.level_words[0]}"
    outer = [c for c in ("metric", "operation", "direction", "positions") if c in paired.columns]
    for key, part in paired.groupby(outer, sort=True):
        sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
        groups = _figures.group_values(part, result.group)
        kinds = list(dict.fromkeys(k for k in SITE_KINDS if k in set(part["site_kind"])))
        kinds += sorted(set(part["site_kind"]) - set(kinds))
        fig = _figures.layer_heatmaps(
            part, "site_kind", groups, result.group, "diff", "probe_id", ylabel="site kind", annotate=None,
            row_order=_in_order(kinds),
            title=f"Mean paired difference B - A{per} ({', '.join(f'{k}={v}' for k, v in sel.items())})",
        )
        if result.level != "layer":
            for ax in fig.axes:
                if ax.get_xlabel() == "layer":
                    ax.set_xlabel(result.level_words[0])
        made.append((f"Mean paired difference B - A{per} ({', '.join(f'{k}={v}' for k, v in sel.items())})",
                     _figures.save_figure(fig, fig_dir / f"difference_{slug(sel)}", dpi=dpi)))
    return made


def _in_order(order: list[str]) -> Callable[[pd.Index], list[str]]:
    """A ``row_order`` callable: the entries of ``order`` present in an index (``order`` bound now, not at call)."""
    return lambda index: [k for k in order if k in index]


def _sections(result: Comparison) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    keys = [c for c in SELECT_COLUMNS if c in result.differences.columns]
    out = []
    for key, part in result.differences.groupby(keys, sort=True):
        sel = dict(zip(keys, key, strict=True))
        anova = result.anova
        for k, v in sel.items():
            anova = anova[anova[k] == v] if len(anova) else anova
        title = slice_title(sel)
        out.append((title, part.drop(columns=keys), anova.drop(columns=[k for k in keys if k in anova.columns])))
    return out


def _group_words(result: Comparison) -> str:
    return f"`{result.group}` (one heatmap panel per group)" if result.group else "none"


def _model_name(meta: dict[str, Any], path: Path) -> str:
    from analyses.report import study_title

    return f"{study_title(meta)} ({path})"


def _table_titles(result: Comparison) -> tuple[str, str]:
    """The titles of a slice's two tables, naming the level (layer or relative depth bin)."""
    one, many = result.level_words
    return (f"Paired difference per {one} (B - A, t-test, Holm over {many})",
            f"Repeated-measures ANOVA: {one} x model")


def _depth_overview(result: Comparison) -> tuple[str, pd.DataFrame, list[str]] | None:
    """A relative-depth comparison's Methods sentence, its bins (each model's layers in each) and what was left
    out; None for a comparison by layer."""
    from analyses import depth

    if result.bins is None or result.depths is None:
        return None
    table = depth_bins_table(result.depths, result.bins)
    wide = (table.groupby([depth.LEVEL, "depth_range", "model"])["layer"]
            .apply(lambda s: ", ".join(map(str, s))).unstack("model").reindex(columns=["A", "B"]).fillna("none"))
    wide = wide.rename(columns={"A": f"layers of A ({result.depths[0]})", "B": f"layers of B ({result.depths[1]})"})
    return depth.method_sentence(*result.depths, result.bins), wide.reset_index(), list(result.notes)


def _values_sentence(result: Comparison) -> str:
    """How each per-probe value was made (the reduction) and which probes the exclusion rules dropped."""
    reductions = ", ".join(sorted(set(map(str, result.paired["reduction"])))) if "reduction" in result.paired else ""
    text = f"Each probe's value per layer: {reductions}." if reductions else ""
    if len(result.excluded):
        text += (f" Excluded by the analysis rules (from both runs): {len(result.excluded)} probe(s) "
                 f"({_listing(list(result.excluded['probe_id']))}; see excluded_probes.csv).")
    return text.strip()


def render_html(result: Comparison, figs: list[tuple[str, list[Path]]], alpha: float = 0.05) -> str:
    """``compare.html``: self-contained (figures embedded), in the style of the study report."""
    parts = ["<h1>Comparison of two runs: B - A</h1>",
             f"<p>A: <code>{html.escape(_model_name(result.meta_a, result.run_a))}</code><br>"
             f"B: <code>{html.escape(_model_name(result.meta_b, result.run_b))}</code><br>"
             f"{result.paired['probe_id'].nunique()} probes matched by id; every difference is paired (the same probe "
             f"in both runs). Groups: {html.escape(_group_words(result))}. {html.escape(_values_sentence(result))}</p>"]
    found = comparison_findings(result, alpha)
    if found:
        parts.append("<h2>Findings</h2>")
        for heading, lines in found:
            parts.append(f"<h3>{html.escape(heading)}</h3>" + list_html(lines, "findings"))
    overview = _depth_overview(result)
    if overview is not None:
        sentence, bins, notes = overview
        parts.append(f"<h2>Relative depth</h2><p>{html.escape(sentence)}</p>")
        parts.append(html_table(bins))
        if notes:
            parts.append("<p>Left out:</p>" + list_html(notes))
    diff_title, anova_title = _table_titles(result)
    for title, diff, anova in _sections(result):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(stat_table_html(diff_title, diff, alpha))
        if len(anova):
            parts.append(stat_table_html(anova_title, anova, alpha))
    for title, paths in figs:
        png = next(p for p in paths if p.suffix == ".png")
        parts.append(figure_html(png.stem, title, "Mean over probes of each probe's B - A; red: B recovers more.", png))
    return html_page("clap compare", parts)


def render_markdown(result: Comparison, figs: list[tuple[str, list[Path]]], alpha: float = 0.05) -> str:
    """``compare.md``: the same tables, figures linked relative to the output folder."""
    out = ["# Comparison of two runs: B - A", "", f"- A: `{_model_name(result.meta_a, result.run_a)}`",
           f"- B: `{_model_name(result.meta_b, result.run_b)}`", "",
           f"{result.paired['probe_id'].nunique()} probes matched by id; every difference is paired. "
           f"Groups: {_group_words(result)}. {_values_sentence(result)}", ""]
    found = comparison_findings(result, alpha)
    if found:
        out += ["## Findings", ""]
        for heading, lines in found:
            out += [f"### {heading}", "", *[f"- {x}" for x in lines], ""]
    overview = _depth_overview(result)
    if overview is not None:
        sentence, bins, notes = overview
        out += ["## Relative depth", "", sentence, "", markdown_table(bins)]
        if notes:
            out += ["Left out:", "", *[f"- {x}" for x in notes], ""]
    diff_title, anova_title = _table_titles(result)
    for title, diff, anova in _sections(result):
        out += [f"## {title}", "", f"### {diff_title}", "", markdown_table(diff)]
        if len(anova):
            out += [f"### {anova_title}", "", markdown_table(anova)]
    for title, paths in figs:
        png = next(p for p in paths if p.suffix == ".png")
        out += figure_markdown(title, "", png, result.out_dir)
    return "\n".join(out) + "\n"
