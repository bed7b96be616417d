"""``clap analyze``: every test, table and figure for a results directory, written to one folder.

The study may hold several slices (metrics, site kinds, operations, directions, position selections). Each slice
with at least two layers is tested on its own (see :func:`analyses.select.analysis_units`); a test that cannot run
on a slice (a single probe, too few per group, every value undefined, no error variance, a single group) is
recorded in ``skipped.csv`` with its reason instead of stopping the others. The tables of all slices are
concatenated; their book-keeping columns say which slice a row belongs to, and ``reduction`` how each probe's rows
of a layer became one value (:mod:`analyses.reductions`; chosen by the spec's ``analysis:`` section, see
:mod:`clap.analysis_options`, or the command line).

Before any statistic, the probe-validity table is computed and the exclusion rules of the ``analysis:`` section
are applied (:mod:`analyses.validity`).

Files written to the output folder:

``probe_counts.csv``   probes, rows, undefined and trivial rows per group (and ``all``)
``units.csv``          the slices tested
``rm_anova.csv``       :func:`analyses.stats.rm_anova` per slice
``friedman.csv``       :func:`analyses.stats.friedman` per slice
``mixed_anova.csv``    :func:`analyses.stats.mixed_anova` per slice (with a group column of 2+ groups)
``posthoc_layers.csv`` :func:`analyses.stats.pairwise_within` per slice
``posthoc_groups.csv`` :func:`analyses.stats.pairwise_between` per slice (with groups)
``one_sample.csv``     :func:`analyses.stats.one_sample`: recovery against 0 per layer, Holm and BH across layers
``one_sample_groups.csv`` the same per group (with groups)
``head_tests.csv``     per-head one-sample tests (slices of attention heads), corrected across the slice's heads
``probe_validity.csv`` :func:`analyses.validity.probe_validity`, with the exclusions applied
``shared_prompts.csv`` clean prompts shared by several probes (not independent subjects)
``bootstrap_ci.csv``   :func:`analyses.bootstrap.bootstrap_ci` per slice and group (t intervals by default)
``module_ci.csv``      bootstrap CI per site (trivial sites included), per metric
``trivial_sites.csv``  the sites flagged ``trivial`` and their mean recovery
``localization*.csv``  :mod:`analyses.localization`: per-layer contributions, per-probe localization measures,
                       group means and the group comparison per slice
``cross_domain.csv``   :mod:`analyses.domains`: with a domain label (``topic``), localization within each domain
``skipped.csv``        tests not run, with the reason
``caveats.md``         the automatic caveats, one per paragraph
``figures/*.png|svg``  the figures (PNG at 200 dpi and SVG)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from analyses import caveats as _caveats
from analyses import figures as _figures
from analyses.bootstrap import CI_COLUMNS, bootstrap_ci
from analyses.domains import attach_domains, resolve_domain
from analyses.io import load_results
from analyses.localization import TABLE_FILES as LOCALIZATION_FILES
from analyses.localization import localization_methods, localization_tables
from analyses.reductions import position_label
from analyses.select import SELECT_COLUMNS, AnalysisWarning, analysis_units
from analyses.stats import (
    FRIEDMAN_COLUMNS,
    MIXED_COLUMNS,
    ONE_SAMPLE_COLUMNS,
    PAIRWISE_BETWEEN_COLUMNS,
    PAIRWISE_WITHIN_COLUMNS,
    RM_COLUMNS,
    friedman,
    mixed_anova,
    one_sample,
    pairwise_between,
    pairwise_within,
    rm_anova,
)
from analyses.validity import (
    VALIDITY_COLUMNS,
    apply_exclusions,
    clean_prompts,
    probe_validity,
    shared_clean_prompts,
)
from clap.analysis_options import AnalysisOptions
from clap.contract import atomic_write_frame, atomic_write_text
from clap.errors import ClapError
from clap.outputs import prepare_output_dir, prune_outputs

TABLE_FILES = {
    "probe_counts": "probe_counts.csv",
    "units": "units.csv",
    "rm_anova": "rm_anova.csv",
    "friedman": "friedman.csv",
    "mixed_anova": "mixed_anova.csv",
    "posthoc_layers": "posthoc_layers.csv",
    "posthoc_groups": "posthoc_groups.csv",
    "one_sample": "one_sample.csv",
    "one_sample_groups": "one_sample_groups.csv",
    "head_tests": "head_tests.csv",
    "probe_validity": "probe_validity.csv",
    "shared_prompts": "shared_prompts.csv",
    "bootstrap_ci": "bootstrap_ci.csv",
    "module_ci": "module_ci.csv",
    "trivial_sites": "trivial_sites.csv",
    "skipped": "skipped.csv",
    "noise_samples": "noise_samples.csv",
    **LOCALIZATION_FILES,
}

#: The hidden list of the files an analysis wrote in its folder: the next analysis there removes those it does not
#: write again (figures and tables of slices no longer in the results), and never any other file.
ANALYZE_MANIFEST = ".clap-analyze-files.json"

#: Book-keeping columns every statistics table ends with (see :mod:`analyses.stats`).
BOOK_COLUMNS = ["dv", *SELECT_COLUMNS, "n_subjects", "n_levels", "n_dropped", "n_undefined", "reduction"]

#: Beyond this many sites a per-module bar plot is unreadable; the heatmaps cover layer sweeps.
MAX_BAR_SITES = 80


@dataclass
class FigureFile:
    """One saved figure: what it shows and where its files are."""

    name: str
    title: str
    caption: str
    unit: dict[str, Any]
    paths: list[Path]

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")


@dataclass
class Analysis:
    """Everything ``clap analyze`` computed; :mod:`analyses.report` renders it.

    ``data``
        the results the statistics used (after the probe exclusions; with a ``clean_prompt`` column when run.json
        records the prompts).
    ``options``
        the resolved options: ``dv``, ``group`` (None when fewer than 2 groups remain: no group tests ran),
        ``group_requested``, ``metrics``, ``site_kinds``, ``agg`` (the reduction in words, for older readers),
        ``missing``, ``n_boot``, ``seed``, ``alpha``, and ``analysis`` (the
        :class:`~clap.analysis_options.AnalysisOptions` as a dict: ``position_reduction``, ``head_reduction``,
        ``subject_field``, ``subject``, exclusion rules, ``interval``, ``ss_type``).
    ``tables``
        the keys of :data:`TABLE_FILES`. Beside the tests (``rm_anova``, ``friedman``, ``mixed_anova``,
        ``posthoc_layers``, ``posthoc_groups``; every one with a ``reduction`` column): ``one_sample`` /
        ``one_sample_groups`` (which layers recover at all: ``layer`` [, group], ``n``, ``mean``, ``sd``,
        ``ci_low``, ``ci_high``, ``popmean``, ``T``, ``dof``, ``p_unc``, ``p_holm``, ``p_fdr_bh``, ``hedges``,
        ``hedges_ci_low``, ``hedges_ci_high``, ``note``), ``head_tests`` (the same per head: ``site``, ``layer``,
        ``head`` first), ``probe_validity`` (``probe_id``, labels, ``clean_prompt``, ``clean_logit_diff``,
        ``corrupted_logit_diff``, ``flips``, ``abs_diff``, ``excluded``, ``reason``), ``shared_prompts``
        (``clean_prompt``, ``n_probes``, ``probe_ids``), ``skipped`` (slice, ``test``, ``reason``).
    ``methods``
        the Methods text, one sentence group per item, naming the reduction, the subject unit, the exclusions, the
        interval and the tests that actually ran (none that were skipped).
    """

    results_dir: Path
    out_dir: Path
    data: pd.DataFrame
    meta: dict[str, Any]
    options: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    caveats: list[str]
    figures: list[FigureFile] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    #: the sections of derived runs (additivity check, clean-run ablation): :mod:`analyses.derived`
    derived: list[Any] = field(default_factory=list)


def analyze(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    dv: str = "recovery",
    group: str | None = None,
    metrics: Sequence[str] | None = None,
    site_kinds: Sequence[str] | None = None,
    agg: str | None = None,
    missing: str = "drop_subjects",
    n_boot: int = 2000,
    seed: int | None = None,
    alpha: float = 0.05,
    figures: bool = True,
    dpi: int = 200,
    analysis: AnalysisOptions | dict[str, Any] | None = None,
    position_reduction: str | int | None = None,
    head_reduction: str | None = None,
    subject: str | None = None,
    interval: str | None = None,
    ss_type: int | None = None,
    additivity: str | Path | None = None,
    ablation: str | Path | None = None,
) -> Analysis:
    """Load ``results_dir``, run every test on every slice, write tables, caveats and figures to ``out_dir``.

    ``out_dir`` defaults to ``RESULTS_DIR/analysis``. ``group`` (the ``analysis.group`` field; this keyword wins)
    defaults to ``knowledge_type`` when the probes carry it, else the first probe label that can group them, never
    a provenance label such as ``pmids`` (:mod:`clap.groups`; no group tests when there is none). ``seed``
    defaults to the run's seed, so the bootstrap intervals of a study are reproducible from its sidecar.
    ``metrics`` / ``site_kinds`` restrict the slices.

    How the results are reduced and tested comes from ``analysis`` (an :class:`~clap.analysis_options.AnalysisOptions`
    or dict), else the ``analysis:`` section of the spec recorded in run.json, else the defaults; the keywords
    ``position_reduction``, ``head_reduction``, ``subject``, ``interval``, ``ss_type`` override single fields (the
    command line's flags). ``agg`` (legacy) applies one aggregation to all of a cell's rows instead.

    Parameters
    ----------
    results_dir : str or Path
        A folder written by ``clap patch`` (``results.parquet`` + ``run.json``).
    out_dir : str or Path, optional
        Where tables, caveats and figures go; default ``RESULTS_DIR/analysis``.
    dv : str, default "recovery"
        The dependent variable of every test.
    group : str, optional
        The probe label whose values are the groups of the between-probe tests (overrides ``analysis.group``);
        default as above.
    metrics, site_kinds : sequence of str, optional
        Restrict the slices analysed.
    agg : str, optional
        Legacy: one aggregation over all of a cell's rows instead of the reduction rules.
    missing : str, default "drop_subjects"
        Missing-cell policy of :func:`analyses.select.prepare`.
    n_boot : int, default 2000
        Resamples of bootstrap intervals.
    seed : int, optional
        Bootstrap seed; default the run's seed.
    alpha : float, default 0.05
        Significance level used by the caveats and findings.
    figures : bool, default True
        Draw and save the figures (``False`` writes tables only, much faster).
    dpi : int, default 200
        Resolution of the PNG figures.
    analysis : AnalysisOptions or dict, optional
        How results are reduced and tested (see above).
    position_reduction, head_reduction, subject, interval, ss_type : optional
        Override single fields of ``analysis``.
    additivity, ablation : str or Path, optional
        Results folders of the study's derived runs (the additivity check's joint patches with their
        ``design.csv``; the clean-run ablation): analysed against this study's rows (:mod:`analyses.derived`).

    Returns
    -------
    Analysis
        The tables (keys of :data:`TABLE_FILES`), caveats, figures, Methods text and the files written.

    Raises
    ------
    clap.errors.ClapError
        A malformed results folder or options naming columns or values the results do not have.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from analyses.pipeline import analyze
    >>> from analyses.synthetic import write_synthetic
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run = write_synthetic(Path(tmp) / "run", n_probes=8, n_layers=4, site_kinds=("mlp_out",),
    ...                           metrics=("logit_diff",))
    ...     result = analyze(run, figures=False, n_boot=200)
    ...     where = result.out_dir.relative_to(tmp).as_posix()
    >>> where, result.options["group"]
    ('run/analysis', 'knowledge_type')
    >>> "rm_anova" in result.tables and "mixed_anova" in result.tables
    True
    >>> result.tables["rm_anova"][["Source", "F", "np2"]].round(3)
      Source      F    np2
    0  layer  9.396  0.573
    """
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "analysis"
    data, meta = load_results(results_dir)
    opts = resolve_options(meta, analysis, position_reduction=position_reduction, head_reduction=head_reduction,
                           subject=subject, interval=interval, ss_type=ss_type, group=group)
    requested = _resolve_group(opts, meta, data)
    seed = int(meta.get("seed", 0) if seed is None else seed)
    data = _restrict(data, "metric", metrics)
    validity = probe_validity(data, meta)
    data, validity = apply_exclusions(data, validity, min_clean_logit_diff=opts.min_clean_logit_diff,
                                      require_flip=opts.require_flip, min_abs_diff=opts.min_abs_diff)
    if data.empty:
        raise ClapError(f"every probe was excluded by the analysis rules ({_rules(opts)}); "
                        "see the probe validity table")
    prompts = clean_prompts(meta, data["probe_id"].unique().tolist())
    if prompts is not None:
        data = data.assign(clean_prompt=data["probe_id"].map(prompts))
    elif opts.subject == "clean_prompt":
        raise ClapError("subject: clean_prompt needs each probe's clean prompt, but run.json has no `probes` list with "
                        "`probe_id` and `clean`; rerun `clap patch` (it records them) or use subject: probe")
    domain = resolve_domain(opts.domain, probe_labels(meta, data), requested)  # cross_domain.csv (analyses.domains)
    # the options are valid: prove the folder writable before the tables are computed
    prepare_output_dir(out, holds="tables, figures and reports are written into a folder")
    group = requested if requested and data[requested].nunique() >= 2 else None
    options = dict(dv=dv, group=group, group_requested=requested, group_declared=opts.group is not None, domain=domain,
                   metrics=list(metrics or []),
                   site_kinds=list(site_kinds or []), agg=agg or _reduction_words(opts), missing=missing,
                   n_boot=n_boot, seed=seed, alpha=alpha, analysis=opts.model_dump())
    tables = compute_tables(data, dv=dv, group=group, site_kinds=site_kinds, agg=agg, missing=missing, n_boot=n_boot,
                            seed=seed, options=opts, n_layers=(meta.get("model") or {}).get("n_layers"),
                            cross_model=bool(meta.get("source_model")))
    if requested and not group:
        only = ", ".join(map(str, data[requested].dropna().unique())) or "none"
        reason = (f"only one {requested} group ({only}) after exclusions: the mixed ANOVA and the between-group "
                  "tests need at least 2")
        extra = [{"test": t, "reason": reason} for t in ("mixed_anova", "posthoc_groups", "one_sample_groups",
                                                                    "localization_tests")]
        tables["skipped"] = pd.concat([tables["skipped"], pd.DataFrame(extra)], ignore_index=True)
    tables["probe_validity"] = validity
    tables["shared_prompts"] = shared_clean_prompts(prompts)
    tables["noise_samples"] = noise_samples(results_dir, data)
    notes = [c for c in [_caveats.group_caveat(data, requested, dv)] if c]
    notes += _caveats.collect(data, tables, group, alpha)
    notes += _caveats.validity_caveats(validity, tables["shared_prompts"], opts.subject)
    notes += [c for c in [_caveats.denominator_caveat(data, validity)] if c]
    result = Analysis(results_dir, out, data, meta, options, tables, notes)
    result.methods = methods_text(result)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        path = atomic_write_frame(out / TABLE_FILES[name], table)
        result.files.append(path)
    caveat_path = out / "caveats.md"
    atomic_write_text(caveat_path, "".join(f"- {c}\n\n" for c in notes) or "No caveats.\n")
    result.files.append(caveat_path)
    if figures:
        figure_skips: list[dict[str, Any]] = []
        result.figures = make_figures(data, tables, out / "figures", dv=dv, group=group, site_kinds=site_kinds, dpi=dpi,
                                      skipped=figure_skips)
        try:  # the study's own figures: the group contrast per layer and the per-module bars
            add_study_figures(result, dpi=dpi)
        except ClapError as exc:
            figure_skips.append({"test": "figure:add_study_figures", "reason": str(exc)})
        result.figures += _localization_figures(result, dpi, figure_skips)
        if figure_skips:
            tables["skipped"] = pd.concat([tables["skipped"], pd.DataFrame(figure_skips)], ignore_index=True)
            atomic_write_text(out / TABLE_FILES["skipped"], tables["skipped"].to_csv(index=False))
        result.files.extend(p for f in result.figures for p in f.paths if p not in result.files)
    if additivity is not None or ablation is not None:
        from analyses.derived import attach

        attach(result, additivity=additivity, ablation=ablation, figures=figures, dpi=dpi)
    attach_domains(result)  # after the additivity check, whose gaps it splits by domain
    prune_outputs(out, result.files, ANALYZE_MANIFEST)  # an earlier analysis's slices that are gone now
    return result


def compute_tables(
    data: pd.DataFrame,
    *,
    dv: str = "recovery",
    group: str | None = None,
    site_kinds: Sequence[str] | None = None,
    agg: str = "mean",
    missing: str = "drop_subjects",
    n_boot: int = 2000,
    seed: int = 0,
    options: AnalysisOptions | None = None,
    n_layers: int | None = None,
    cross_model: bool = False,
) -> dict[str, pd.DataFrame]:
    """All statistics tables (the keys of :data:`TABLE_FILES`), without writing anything.

    ``probe_validity`` and ``shared_prompts`` need run.json and are filled by :func:`analyze` (empty here).
    ``n_layers`` (the model's depth, for relative depth) and ``cross_model`` go to the localization profiles
    (:func:`analyses.localization.localization_tables`)."""
    opts = options or AnalysisOptions()
    units = analysis_units(data)
    if site_kinds:
        unknown = sorted(set(site_kinds) - set(units["site_kind"]))
        if unknown:
            raise ClapError(
                f"no testable slice with site_kind {', '.join(unknown)}; site kinds with 2+ layers in the results: "
                f"{', '.join(sorted(set(units['site_kind']))) or 'none'}"
            )
        units = units[units["site_kind"].isin(list(site_kinds))].reset_index(drop=True)
    n_groups = data[group].nunique() if group else 0
    collected: dict[str, list[pd.DataFrame]] = {k: [] for k in (
        "rm_anova", "friedman", "mixed_anova", "posthoc_layers", "posthoc_groups", "one_sample", "one_sample_groups",
        "head_tests", "bootstrap_ci")}
    unit = "clean_prompt" if opts.subject == "clean_prompt" else "probe_id"
    reduce = dict(position_reduction=opts.position_reduction, head_reduction=opts.head_reduction,
                  subject_field=opts.subject_field) if agg is None else dict(agg=agg)
    skipped: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)  # counts are in the tables and the caveats
        for unit_row in units.to_dict("records"):
            sel = {c: unit_row[c] for c in SELECT_COLUMNS if c in unit_row}
            common = dict(dv=dv, subject=unit, **reduce, **sel)
            runs: list[tuple[str, Callable[[], pd.DataFrame]]] = [
                ("rm_anova", partial(rm_anova, data, missing=missing, **common)),
                ("friedman", partial(friedman, data, missing=missing, **common)),
                ("posthoc_layers", partial(pairwise_within, data, missing=missing, **common)),
                ("one_sample", partial(one_sample, data, **common)),
            ]
            if group and n_groups >= 2:
                runs += [
                    ("mixed_anova",
                     partial(mixed_anova, data, between=group, missing=missing, ss_type=opts.ss_type, **common)),
                    ("posthoc_groups", partial(pairwise_between, data, between=group, missing=missing, **common)),
                    ("one_sample_groups", partial(one_sample, data, between=group, **common)),
                ]
            if sel.get("site_kind") == "head":
                runs.append(("head_tests", partial(head_tests, data, **common)))
            runs.append(("bootstrap_ci", partial(bootstrap_ci, data, between=group, n_boot=n_boot, seed=seed,
                                                 method=opts.interval, **common)))
            for name, run in runs:
                try:
                    collected[name].append(run())
                except ClapError as exc:
                    skipped.append({**sel, "test": name, "reason": str(exc)})
    columns = {
        "rm_anova": RM_COLUMNS,
        "friedman": FRIEDMAN_COLUMNS,
        "mixed_anova": MIXED_COLUMNS,
        "posthoc_layers": PAIRWISE_WITHIN_COLUMNS,
        "posthoc_groups": PAIRWISE_BETWEEN_COLUMNS,
        "one_sample": ["layer", *ONE_SAMPLE_COLUMNS],
        "one_sample_groups": ["layer", *([group] if group else []), *ONE_SAMPLE_COLUMNS],
        "head_tests": ["site", "layer", "head", *ONE_SAMPLE_COLUMNS],
        "bootstrap_ci": ["layer", *([group] if group else []), *CI_COLUMNS],
    }
    # A table no slice could fill is still written with its header, so readers of the CSV need no special case.
    tables = {name: _concat(frames, columns[name] + BOOK_COLUMNS) for name, frames in collected.items()}
    loc_tables, loc_skipped = localization_tables(
        data, units, dv=dv, group=group, subject=unit, n_layers=n_layers, cross_model=cross_model, agg=agg,
        missing=missing, seed=seed, position_reduction=opts.position_reduction, subject_field=opts.subject_field)
    tables.update(loc_tables)
    skipped += loc_skipped
    tables["units"] = units
    tables["skipped"] = pd.DataFrame(skipped, columns=[*SELECT_COLUMNS, "test", "reason"])
    tables["probe_counts"] = probe_counts(data, group)
    tables["trivial_sites"] = trivial_sites(data)
    tables["module_ci"] = module_ci(data, dv=dv, group=group, n_boot=n_boot, seed=seed, method=opts.interval,
                                    position_reduction=opts.position_reduction, subject_field=opts.subject_field)
    tables["probe_validity"] = pd.DataFrame(columns=VALIDITY_COLUMNS)
    tables["shared_prompts"] = shared_clean_prompts(None)
    tables["noise_samples"] = pd.DataFrame()  # filled by analyze() from samples.parquet when the study drew noise
    return {name: tables[name] for name in TABLE_FILES}


def head_tests(data: pd.DataFrame, **select: Any) -> pd.DataFrame:
    """Per-head one-sample tests of a head slice: each head (``site``) tested against 0, Holm and BH over the
    slice's heads, with its ``layer`` and ``head``. The position rule applies; heads are never pooled here."""
    select = {k: v for k, v in select.items() if k != "head_reduction"}
    table = one_sample(data, within="site", **select)
    where = data.drop_duplicates("site").set_index("site")
    table.insert(1, "layer", where["layer"].reindex(table["site"]).to_numpy())
    table.insert(2, "head", where["head"].reindex(table["site"]).to_numpy())
    return table.sort_values(["layer", "head"]).reset_index(drop=True)


def resolve_options(meta: dict[str, Any], analysis: AnalysisOptions | dict[str, Any] | None = None,
                    **overrides: Any) -> AnalysisOptions:
    """The analysis options: ``analysis`` if given, else the spec's ``analysis:`` section in run.json, else the
    defaults; non-None ``overrides`` (command-line flags) replace single fields. Invalid values: ClapError."""
    if analysis is None:
        analysis = (meta.get("spec") or {}).get("analysis") or {}
    base = analysis.model_dump() if isinstance(analysis, AnalysisOptions) else dict(analysis)
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AnalysisOptions(**base)
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = ".".join(map(str, err["loc"])) or "analysis"
        raise ClapError(f"analysis option {field_name}: {err['msg'].removeprefix('Value error, ')} "
                        f"(valid options: {', '.join(AnalysisOptions.model_fields)})") from None


def _rules(opts: AnalysisOptions) -> str:
    parts = []
    if opts.min_clean_logit_diff is not None:
        parts.append(f"clean logit difference >= {opts.min_clean_logit_diff:g}")
    if opts.require_flip:
        parts.append("the corruption flips the preference")
    if opts.min_abs_diff is not None:
        parts.append(f"|recovery denominator| (|clean - corrupted|, across models |source - target|) >= "
                     f"{opts.min_abs_diff:g}")
    return "; ".join(parts)


def _reduction_words(opts: AnalysisOptions) -> str:
    heads = "heads summed per layer" if opts.head_reduction == "sum" else "heads tested one by one"
    return f"{position_label(opts.position_reduction)} ({heads})"


def noise_samples(results_dir: Path, data: pd.DataFrame) -> pd.DataFrame:
    """The spread over noise draws (:func:`analyses.samples.sample_spread`) of the probes the analysis kept, from
    ``samples.parquet``; empty when the study drew noise once."""
    from analyses.samples import sample_spread
    from clap.contract import read_samples

    samples = read_samples(results_dir)
    if samples is None:
        return pd.DataFrame()
    kept = samples[samples["probe_id"].isin(set(data["probe_id"])) & samples["metric"].isin(set(data["metric"]))]
    return sample_spread(kept)
def _cross_model_methods(meta: dict[str, Any]) -> list[str]:
    """The baselines of a cross-model run (``run.json`` names a ``source_model``), else nothing."""
    source = meta.get("source_model")
    if not source:
        return []
    return [f"Cross-model patching: source activations from {source.get('source') or 'another model'} patched into "
            f"{(meta.get('model') or {}).get('source') or 'the target model'}; recovery = (patched - target model on "
            "the target prompt) / (source model on the source prompt - target model on the target prompt)."]


def _group_methods(result: Analysis) -> str:
    """Which label grouped the probes and why (declared, or the default of :mod:`clap.groups`)."""
    from clap.groups import choice_words

    o = result.options
    labels = probe_labels(result.meta or {}, result.data)
    subject_field = (o.get("analysis") or {}).get("subject_field", "subject")
    return choice_words(o.get("group_requested"), bool(o.get("group_declared")), list(labels), subject_field, labels)


def methods_text(result: Analysis) -> list[str]:
    """The Methods paragraph, item by item: only what was done, with the reduction and units named."""
    o, t = result.options, result.tables
    a = AnalysisOptions(**o["analysis"])
    group = o.get("group")
    reductions = sorted(set().union(*[set(t[n]["reduction"].dropna())
                                      for n in ("rm_anova", "one_sample") if len(t[n])]))
    out = [
        f"Dependent variable: `{o['dv']}`, one value per probe and layer. Reduction of a probe's rows in one layer: "
        + (f"legacy aggregation `{o['agg']}`." if o["agg"] and o["agg"] not in (_reduction_words(a),) else
           f"{position_label(a.position_reduction)} for slices that patched several positions (the mean over positions "
           "is not used: recovery is roughly conserved across positions, so it would be about 1/prompt length at "
           "every layer); attention heads "
           + ("summed per layer (the layer's total) for the layer tests and tested one by one in the per-head table."
              if a.head_reduction == "sum" else "tested one by one only (no layer test on heads)."))
        + (f" Reductions in the tables: {'; '.join(reductions)}." if reductions else ""),
        "Rows flagged `trivial`, sites outside the layer stack and undefined (NaN or infinite) values are excluded "
        "first and counted. Each slice (metric, site kind, operation, direction, position selection) is tested "
        "separately.",
    ]
    out += _cross_model_methods(result.meta or {})
    out.append(_group_methods(result))
    validity = t.get("probe_validity", pd.DataFrame())
    excluded = validity[validity["excluded"].astype(bool)] if len(validity) else validity
    if _rules(a):
        out.append(f"Probe exclusion before any statistic ({_rules(a)}): {len(excluded)} of {len(validity)} probes "
                   "excluded (listed in the probe validity table).")
    shared = t.get("shared_prompts", pd.DataFrame())
    if a.subject == "clean_prompt":
        out.append("Subjects: clean prompts (probes sharing a clean prompt are averaged first, as they are not "
                   "independent).")
    elif len(shared):
        out.append(f"Subjects: probes ({len(shared)} clean prompt(s) are shared by several probes, which are therefore "
                   "not independent; `subject: clean_prompt` averages them).")
    out.append({
        "drop_subjects": "Missing cells: probes lacking any layer are dropped from the repeated-measures tests "
                         "(listwise).",
        "drop_levels": "Missing cells: layers that some probe lacks are dropped from the tests.",
        "error": "Missing cells: refused (none present).",
    }.get(o["missing"], f"Missing cells: {o['missing']}."))
    if len(t["rm_anova"]):
        out.append("Repeated-measures ANOVA (pingouin) with Mauchly's sphericity test and Greenhouse-Geisser "
                   "correction; effect size partial eta squared with a 95 % interval (noncentral F inversion). "
                   "Tests whose error variance is zero relative to the data are reported as undefined, not run.")
    if len(t["friedman"]):
        out.append("Friedman test (chi-square, Kendall's W) as the rank-based alternative.")
    if len(t["one_sample"]):
        out.append("Which layers recover at all: one-sample t-tests of recovery against 0 per layer"
                   + (" and per group" if len(t["one_sample_groups"]) else "")
                   + ", Holm and Benjamini-Hochberg corrected across layers; Hedges' g with 95 % intervals.")
    if len(t["head_tests"]):
        out.append("Attention heads: the same one-sample tests per head, corrected across the heads of a slice.")
    if len(t["mixed_anova"]) and group:
        ss = ("Type III sums of squares (unweighted group means; statsmodels OLS with sum-to-zero contrasts)"
              if a.ss_type == 3 else "pingouin's sums of squares (weighted means, Type II for unbalanced groups)")
        out.append(f"Mixed ANOVA with layer within and `{group}` between, interaction included, {ss}.")
    if len(t["posthoc_groups"]) and group:
        out.append("Welch t-tests between groups at each layer, Holm-corrected over layers and group pairs; Hedges' g "
                   "with 95 % intervals.")
    if len(t["posthoc_layers"]):
        out.append("Post-hoc paired t-tests between all pairs of layers, Holm-corrected; Hedges' g (d_av with "
                   "small-sample factor) with 95 % intervals.")
    interval = {"t": "t intervals of the mean (t quantile with n-1 degrees of freedom)",
                "bca": f"BCa bootstrap intervals ({o['n_boot']} resamples of probes, seed {o['seed']})",
                "percentile": f"percentile-bootstrap intervals ({o['n_boot']} resamples of probes, seed {o['seed']})"}
    out.append(f"Intervals of means: 95 % {interval[a.interval]}.")
    if o.get("group_requested") and not group:
        out.append(f"No group tests: only one `{o['group_requested']}` group.")
    out += localization_methods(t, group)
    return out + _noise_methods(result.meta) + _approximate_methods(result.data)


def _approximate_methods(data: pd.DataFrame) -> list[str]:
    """The Methods sentence of results holding attribution-patching estimates (none otherwise), naming how each
    estimating operation takes its gradient."""
    if "approximate" not in data.columns or not data["approximate"].astype(bool).any():
        return []
    approx = data[data["approximate"].astype(bool)]
    n = len(approx)
    labels = sorted(approx["operation"].astype(str).unique())
    named = ", ".join(f"`{label}`" for label in labels)
    how = []
    if "attribution" in labels:
        how.append("`attribution` is the first-order term (source - target activation) . d logit_diff / d activation "
                   "at the target run, from one forward and one backward pass per chunk of probes (Nanda 2023; Syed "
                   "et al. 2023)")
    steps = sorted(int(label[len("attribution(ig"):-1]) for label in labels if label.startswith("attribution(ig"))
    if steps:
        how.append(f"`attribution(igK)` (K = {', '.join(map(str, steps))}) multiplies the same activation difference "
                   "by the gradient integrated along the straight line from the target prompt's token embeddings to "
                   "the source prompt's, by the trapezoid rule over K points (EAP-IG; Hanna et al. 2024)")
    return [f"{n} rows (operation {named}) are attribution-patching estimates, not measurements: "
            f"{'; '.join(how)}. They are analysed as separate operations."]


def _noise_methods(meta: dict[str, Any]) -> list[str]:
    """The Methods sentence of a study that drew noise several times (none otherwise)."""
    out = []
    draws = (meta.get("noise") or {}).get("samples") or 1
    if draws > 1:
        out.append(f"Noise: every value is the average over {draws} seeded noise draws per cell (each draw seeded by "
                   "the study's seed, the probe, the draw and the site; the std used is in run.json); clean, corrupted "
                   "and patched values are averaged, recovery and effect computed from the averages. The draws are in "
                   "samples.parquet; the noise draws table gives per metric, site kind and layer the spread of each "
                   "cell's effect over its draws (median and largest standard deviation, mean 95 % t half-width).")
    return out


def probe_counts(data: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """Per group and overall (``all``): ``n_probes``, ``n_rows``, ``n_undefined`` (rows with undefined recovery),
    ``n_probes_undefined`` (probes with any), ``n_trivial`` (rows flagged trivial)."""
    def count(part: pd.DataFrame, label: str) -> dict[str, Any]:
        undefined = part[~part["recovery_defined"].astype(bool) | ~np.isfinite(part["recovery"].astype(float))]
        return {
            "group": label,
            "n_probes": part["probe_id"].nunique(),
            "n_rows": len(part),
            "n_undefined": len(undefined),
            "n_probes_undefined": undefined["probe_id"].nunique(),
            "n_trivial": int(part["trivial"].astype(bool).sum()),
        }

    rows = []
    if group:
        for g, part in data.groupby(group, observed=True, sort=True):
            rows.append(count(part, str(g)))
    rows.append(count(data, "all"))
    out = pd.DataFrame(rows)
    return out.rename(columns={"group": group or "group"})


def trivial_sites(data: pd.DataFrame) -> pd.DataFrame:
    """Sites flagged ``trivial``: ``site``, ``site_kind``, ``metric``, ``n_rows``, ``mean_recovery``."""
    triv = data[data["trivial"].astype(bool)]
    if triv.empty:
        return pd.DataFrame(columns=["site", "site_kind", "metric", "n_rows", "mean_recovery"])
    return (
        triv.groupby(["site", "site_kind", "metric"], observed=True)
        .agg(n_rows=("recovery", "size"), mean_recovery=("recovery", "mean"))
        .reset_index()
    )


def module_ci(data: pd.DataFrame, *, dv: str = "recovery", group: str | None = None, n_boot: int = 2000,
              seed: int = 0, method: str = "t", position_reduction: str | int = "last",
              subject_field: str = "subject") -> pd.DataFrame:
    """Bootstrap CI of mean ``dv`` per site (trivial and out-of-stack sites included), per metric slice, in network
    order, with a ``trivial`` column; the data of the per-module bar plot."""
    frames = []
    cols = [c for c in ("metric", "operation", "direction", "positions") if c in data.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, part in data.groupby(cols, observed=True, sort=True):
            if part["site"].nunique() > MAX_BAR_SITES:
                continue
            sel = dict(zip(cols, key if isinstance(key, tuple) else (key,), strict=True))
            try:
                table = bootstrap_ci(part, dv, within="site", between=group, n_boot=n_boot, seed=seed, method=method,
                                     include_trivial=True, vary=("site_kind",), position_reduction=position_reduction,
                                     subject_field=subject_field, **sel)
            except ClapError:
                continue
            order = _figures.site_order(part)
            table["site"] = pd.Categorical(table["site"], order, ordered=True)
            table = table.sort_values(["site"] + ([group] if group else [])).reset_index(drop=True)
            table["site"] = table["site"].astype(str)
            triv = set(part.loc[part["trivial"].astype(bool), "site"])
            table.insert(1, "trivial", table["site"].isin(triv))
            frames.append(table)
    return _concat(frames, ["site", "trivial", *([group] if group else []), *CI_COLUMNS, *BOOK_COLUMNS])


def make_figures(
    data: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    fig_dir: Path,
    *,
    dv: str = "recovery",
    group: str | None = None,
    site_kinds: Sequence[str] | None = None,
    dpi: int = 200,
    skipped: list[dict[str, Any]] | None = None,
) -> list[FigureFile]:
    """Draw and save the figures of :mod:`analyses.figures` for every slice; returns what was written.

    A figure that cannot be drawn for a slice (e.g. every value undefined) is left out and, when ``skipped`` is
    given, recorded there (``test`` = ``figure:<function>``) with its reason; the other figures are still drawn."""
    sink = _FigureSink(fig_dir, dpi, skipped)
    units = tables["units"]
    if units.empty and tables["module_ci"].empty:
        return sink.made
    outer = [c for c in ("metric", "operation", "direction", "positions") if c in units.columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, block in (units.groupby(outer, sort=True) if len(units) else []):
            outer_sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
            kinds = block["site_kind"].tolist()
            if len(kinds) >= 2:
                fig = sink.draw(_figures.heatmap_layer_site_kind, data, dv, group, **outer_sel)
                sink.save(fig, f"layer_site_kind_{_slug(outer_sel)}",
                          f"Mean {dv} by layer and site kind ({_label(outer_sel)})",
                          "Mean over probes of each probe's mean over positions; colour centred on 0 (no recovery).",
                          outer_sel)
            for kind in kinds:
                _site_kind_figures(sink, data, tables["bootstrap_ci"], {**outer_sel, "site_kind": kind}, dv, group)
    _module_figures(sink, tables["module_ci"], dv, group)
    return sink.made


@dataclass
class _FigureSink:
    """Draws and saves the figures of :func:`make_figures`, keeping one list of what was written and what was not.

    A figure that cannot be drawn for a slice is recorded in ``skipped`` (when given) instead of failing the run.
    """

    fig_dir: Path
    dpi: int
    skipped: list[dict[str, Any]] | None
    made: list[FigureFile] = field(default_factory=list)

    def draw(self, func: Callable[..., Any], *args: Any, unit: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)``, or ``None`` (and a ``skipped`` entry) if it raises a :class:`ClapError`."""
        try:
            return func(*args, **kwargs)
        except ClapError as exc:
            where = unit if unit is not None else kwargs
            if self.skipped is not None:
                self.skipped.append({**{c: where[c] for c in SELECT_COLUMNS if c in where},
                                     "test": f"figure:{func.__name__}", "reason": str(exc)})
            return None

    def save(self, fig: Any, name: str, title: str, caption: str, unit: dict[str, Any]) -> None:
        """Save a drawn figure under ``name`` and list it (nothing for a figure that could not be drawn)."""
        if fig is None:
            return
        paths = _figures.save_figure(fig, self.fig_dir / name, dpi=self.dpi)
        self.made.append(FigureFile(name, title, caption, unit, paths))


def _site_kind_figures(sink: _FigureSink, data: pd.DataFrame, bootstrap: pd.DataFrame, sel: dict[str, Any], dv: str,
                       group: str | None) -> None:
    """The figures of one site kind in one slice: line by layer, and layer x head or x position where they vary."""
    ktag = _slug(sel)
    ci = bootstrap[_match(bootstrap, sel)] if len(bootstrap) else bootstrap
    if len(ci):
        fig = sink.draw(_figures.line_by_layer, ci, group, dv=dv, unit=sel, title=f"{dv} by layer ({_label(sel)})")
        sink.save(fig, f"line_{ktag}", f"{dv} by layer ({_label(sel)})",
                  f"Mean over probes ({ci['reduction'].iloc[0]}) with {int(ci['ci'].iloc[0] * 100)} % "
                  f"{_interval_words(ci)} bands; one line per {group or 'study'}.", sel)
    rows = data[_match(data, sel)]
    if sel["site_kind"] == "head" and "head" in rows.columns and rows["head"].nunique() >= 2:
        fig = sink.draw(_figures.heatmap_layer_head, data, dv, group, **sel)
        sink.save(fig, f"layer_head_{ktag}", f"Mean {dv} by layer and head ({_label(sel)})",
                  "Mean over probes of each probe's mean over positions, per attention head "
                  "(the head's output before the output projection).", sel)
    # a position axis needs several positions within a probe ("last" differs between probes only)
    per_probe_positions = rows.groupby("probe_id")["position"].nunique() if len(rows) else None
    if per_probe_positions is not None and per_probe_positions.max() >= 2:
        fig = sink.draw(_figures.heatmap_layer_position, data, dv, group, **sel)
        sink.save(fig, f"layer_position_{ktag}", f"Mean {dv} by layer and position ({_label(sel)})",
                  "Mean over probes at each token position (label: most common token, * where probes differ; "
                  "[index] in the unpadded prompt).", sel)


def _module_figures(sink: _FigureSink, mod: pd.DataFrame, dv: str, group: str | None) -> None:
    """One bar chart per metric slice of the per-module intervals (slices with at least two modules)."""
    if not len(mod):
        return
    cols = [c for c in ("metric", "operation", "direction", "positions") if c in mod.columns]
    for key, block in mod.groupby(cols, sort=True, dropna=False):
        sel = dict(zip(cols, key if isinstance(key, tuple) else (key,), strict=True))
        if block["site"].nunique() < 2:
            continue
        triv = block.loc[block["trivial"], "site"].unique().tolist()
        fig = sink.draw(_figures.bar_by_module, block, group, dv=dv, trivial_sites=triv, unit=sel,
                        title=f"{dv} per module ({_label(sel)})")
        sink.save(fig, f"modules_{_slug(sel)}", f"{dv} per module ({_label(sel)})",
                  f"Mean over probes with 95 % {_interval_words(block)} intervals; hatched bars reproduce the source "
                  "run by construction (recovery 1 when denoising, 0 when noising).", sel)


def _interval_words(ci: pd.DataFrame) -> str:
    method = str(ci["method"].iloc[0]) if len(ci) else "t"
    if method == "t":
        return "t-interval"
    return f"{'BCa' if method == 'bca' else 'percentile'}-bootstrap ({int(ci['n_boot'].iloc[0])} resamples of probes)"


def probe_labels(meta: dict[str, Any], data: pd.DataFrame) -> dict[str, list[Any]]:
    """Each probe label of run.json's ``group_columns`` present in ``data`` -> its value per probe."""
    names = [c for c in meta.get("group_columns") or [] if c in data.columns]
    per_probe = data.drop_duplicates("probe_id")
    return {name: per_probe[name].tolist() for name in names}


def _resolve_group(opts: AnalysisOptions, meta: dict[str, Any], data: pd.DataFrame) -> str | None:
    """The group of the between-group tests: ``analysis.group`` / ``--group`` if given, else the default of
    :mod:`clap.groups` (``knowledge_type``; never a provenance label such as ``pmids`` or ``bioasq_id``)."""
    from clap.groups import resolve_group

    return resolve_group(opts.group, probe_labels(meta, data), opts.subject_field,
                         where="group (--group, analysis.group)")


def _restrict(data: pd.DataFrame, column: str, values: Sequence[str] | None) -> pd.DataFrame:
    if not values:
        return data
    present = set(data[column])
    unknown = [v for v in values if v not in present]
    if unknown:
        raise ClapError(f"no rows with {column} {', '.join(unknown)}; "
                        f"the results hold {', '.join(sorted(map(str, present)))}")
    return data[data[column].isin(list(values))]


def _match(frame: pd.DataFrame, sel: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for k, v in sel.items():
        if k in frame.columns:
            mask &= frame[k] == v
    return mask


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def _slug(sel: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(v) for v in sel.values())).strip("-")


def _label(sel: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items())


def add_study_figures(result: Analysis, dpi: int = 200) -> list[FigureFile]:
    """The figures that answer the study's question, per metric / operation / direction / positions: the group
    contrast per layer (two or more groups, t-based CIs, ``*`` where the Holm-corrected Welch test differs) and
    the module view (attention and MLP outputs per layer). Figures ``result`` already holds by name are kept."""
    import warnings

    from analyses import figures as _figures
    from analyses.select import AnalysisWarning

    data, o = result.data, result.options
    group, dv = o.get("group"), o.get("dv", "recovery")
    have = {f.name for f in result.figures}
    made: list[FigureFile] = []
    units = result.tables["units"]
    outer = [c for c in ("metric", "operation", "direction", "positions") if c in units.columns]
    kinds_wanted = set(o.get("site_kinds") or [])

    def save(fig: Any, name: str, title: str, caption: str, unit: dict[str, Any]) -> None:
        if name in have:
            return
        paths = _figures.save_figure(fig, result.out_dir / "figures" / name, dpi=dpi)
        made.append(FigureFile(name, title, caption, unit, paths))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for key, block in (units.groupby(outer, sort=True) if len(units) else []):
            sel = dict(zip(outer, key if isinstance(key, tuple) else (key,), strict=True))
            kinds = [k for k in block["site_kind"] if not kinds_wanted or k in kinds_wanted]
            if not kinds:
                continue
            a = o.get("analysis") or {}
            head_rule = "sum" if a.get("head_reduction", "sum") == "each" else a.get("head_reduction", "sum")
            means = _figures.layer_means(data, dv, group, site_kinds=kinds,
                                         position_reduction=a.get("position_reduction", "last"),
                                         head_reduction=head_rule, subject_field=a.get("subject_field", "subject"),
                                         **sel)
            if group and means[group].nunique() >= 2:
                post = result.tables["posthoc_groups"]
                differ = post[_match(post, sel) & (post["p_corr"] < o.get("alpha", 0.05))] if len(post) else None
                if differ is not None:
                    differ = differ.rename(columns={"level": "layer"})
                fig = _figures.layer_contrast(means, group, dv=dv, differ=differ)
                save(fig, f"contrast_{_slug(sel)}", f"{dv} per layer by {group} ({_label(sel)})",
                     f"Mean over probes (each probe reduced first: {o.get('agg')}) with 95 % t-based intervals, "
                     f"one panel per site kind; * marks layers where the {group} groups differ "
                     "(Welch t, Holm-corrected).", sel)
            modules = means[means["site_kind"].isin(["attn_out", "mlp_out"])]
            if len(modules):
                fig = _figures.module_bars(modules, group, dv=dv)
                save(fig, f"module_bars_{_slug(sel)}", f"{dv} per module and layer ({_label(sel)})",
                     "Attention and MLP outputs patched layer by layer: mean over probes with 95 % t-based "
                     "intervals.", sel)
    result.figures.extend(made)
    result.files.extend(p for f in made for p in f.paths)
    return made


def _localization_figures(result: Analysis, dpi: int, skipped: list[dict[str, Any]]) -> list[FigureFile]:
    """The localization profiles' figures (:mod:`analyses.localization_figures`); a failure is recorded in
    ``skipped`` rather than stopping the other figures."""
    from analyses.localization_figures import localization_figures

    try:
        made = localization_figures(result.tables, result.out_dir / "figures", group=result.options.get("group"),
                                    subject="clean_prompt" if result.options["analysis"].get("subject") ==
                                    "clean_prompt" else "probe_id", dpi=dpi)
    except ClapError as exc:
        skipped.append({"test": "figure:localization", "reason": str(exc)})
        return []
    return [FigureFile(*f) for f in made]
