"""``clap analyze``: every test, table and figure for a results directory, written to one folder.

The jobs are split by module: :mod:`analyses.tables` computes the tables, :mod:`analyses.methods` writes the Methods
text, :mod:`analyses.figure_set` draws the figures, :mod:`analyses.caveats` the caveats; this module loads the
results, applies the options (:class:`analyses.options.AnalyzeOptions`: one object, built by ``clap analyze``,
``clap report``, ``clap run`` and :func:`analyses.options.analyze_options` alike) and writes what they made.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analyses import caveats as _caveats
from analyses.derived import attach
from analyses.domains import attach_domains, resolve_domain
from analyses.figure_set import FigureFile, draw_figures
from analyses.io import load_results
from analyses.methods import exclusion_rules, methods_text, reduction_words
from analyses.options import AnalyzeOptions, analyze_options, resolve_options
from analyses.tables import TABLE_FILES, compute_tables, noise_samples, probe_labels
from analyses.validity import apply_exclusions, clean_prompts, probe_validity, shared_clean_prompts
from clap.analysis_options import AnalysisOptions
from clap.contract import atomic_write_frame, atomic_write_text
from clap.errors import ClapError
from clap.groups import resolve_group
from clap.outputs import prepare_output_dir, prune_outputs

#: The hidden list of the files an analysis wrote in its folder: the next analysis there removes those it does not
#: write again (figures and tables of slices no longer in the results), and never any other file.
ANALYZE_MANIFEST = ".clap-analyze-files.json"


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
        the keys of :data:`analyses.tables.TABLE_FILES`. Beside the tests (``rm_anova``, ``friedman``, ``mixed_anova``,
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


def analyze(results_dir: str | Path, options: AnalyzeOptions | None = None, **names: Any) -> Analysis:
    """Load ``results_dir``, run every test on every slice, write tables, caveats and figures.

    ``options`` (:class:`~analyses.options.AnalyzeOptions`) says what to do; keyword ``names`` are applied on top of
    it by :func:`analyses.options.analyze_options`: ``analyze(folder, group="knowledge_type", figures=False)``. A
    field of the options object is set (``out_dir``, ``dv``, ``metrics``, ``site_kinds``, ``agg``, ``missing``,
    ``n_boot``, ``seed``, ``alpha``, ``figures``, ``dpi``, ``analysis``, ``additivity``, ``ablation``); a field of
    the ``analysis:`` section (``group``, ``position_reduction``, ``head_reduction``, ``subject``, ``interval``,
    ``ss_type``, the exclusion rules) overrides that field of ``options.analysis``, else of the section recorded in
    run.json, else of the defaults; an unknown name is refused with the nearest valid ones.

    Defaults: the output folder is ``RESULTS_DIR/analysis``; the group is ``knowledge_type`` when the probes carry
    it, else the first probe label that can group them, never a provenance label such as ``pmids``
    (:mod:`clap.groups`; no group tests when there is none); the bootstrap seed is the run's, so the intervals of
    a study are reproducible from its sidecar.

    Parameters
    ----------
    results_dir : str or Path
        A folder written by ``clap patch`` (``results.parquet`` + ``run.json``).
    options : AnalyzeOptions, optional
        What to compute and write (default: the defaults).
    **names
        Single options by name, applied on top of ``options`` (see above).

    Returns
    -------
    Analysis
        The tables (keys of :data:`analyses.tables.TABLE_FILES`), caveats, figures, Methods text and the files
        written.

    Raises
    ------
    clap.errors.ClapError
        A malformed results folder, an unknown option, or options naming columns or values the results do not
        have.

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
    opts = analyze_options(options, **names)
    results_dir = Path(results_dir)
    out = opts.out_dir if opts.out_dir is not None else results_dir / "analysis"
    data, meta = load_results(results_dir)
    rules = resolve_options(meta, opts.analysis, **opts.overrides)
    requested = _resolve_group(rules, meta, data)
    seed = int(meta.get("seed", 0) if opts.seed is None else opts.seed)
    data = _restrict(data, "metric", opts.metrics)
    validity = probe_validity(data, meta)
    data, validity = apply_exclusions(data, validity, min_clean_logit_diff=rules.min_clean_logit_diff,
                                      require_flip=rules.require_flip, min_abs_diff=rules.min_abs_diff)
    if data.empty:
        raise ClapError(f"every probe was excluded by the analysis rules ({exclusion_rules(rules)}); "
                        "see the probe validity table")
    prompts = clean_prompts(meta, data["probe_id"].unique().tolist())
    if prompts is not None:
        data = data.assign(clean_prompt=data["probe_id"].map(prompts))
    elif rules.subject == "clean_prompt":
        raise ClapError("subject: clean_prompt needs each probe's clean prompt, but run.json has no `probes` list with "
                        "`probe_id` and `clean`; rerun `clap patch` (it records them) or use subject: probe")
    domain = resolve_domain(rules.domain, probe_labels(meta, data), requested)  # cross_domain.csv (analyses.domains)
    # the options are valid: prove the folder writable before the tables are computed
    prepare_output_dir(out, holds="tables, figures and reports are written into a folder")
    group = requested if requested and data[requested].nunique() >= 2 else None
    dv, alpha = opts.dv, opts.alpha
    options_used = dict(dv=dv, group=group, group_requested=requested, group_declared=rules.group is not None,
                        domain=domain, metrics=list(opts.metrics), site_kinds=list(opts.site_kinds),
                        agg=opts.agg or reduction_words(rules), missing=opts.missing, n_boot=opts.n_boot, seed=seed,
                        alpha=alpha, analysis=rules.model_dump())
    tables = compute_tables(data, dv=dv, group=group, site_kinds=list(opts.site_kinds) or None, agg=opts.agg,
                            missing=opts.missing, n_boot=opts.n_boot, seed=seed, options=rules,
                            n_layers=(meta.get("model") or {}).get("n_layers"),
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
    notes += _caveats.validity_caveats(validity, tables["shared_prompts"], rules.subject)
    notes += [c for c in [_caveats.denominator_caveat(data, validity)] if c]
    result = Analysis(results_dir, out, data, meta, options_used, tables, notes)
    result.methods = methods_text(tables, options_used, meta, data)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        result.files.append(atomic_write_frame(out / TABLE_FILES[name], table))
    caveat_path = out / "caveats.md"
    atomic_write_text(caveat_path, "".join(f"- {c}\n\n" for c in notes) or "No caveats.\n")
    result.files.append(caveat_path)
    if opts.figures:
        result.figures, figure_skips = draw_figures(data, tables, options_used, out / "figures", dpi=opts.dpi)
        if figure_skips:
            tables["skipped"] = pd.concat([tables["skipped"], pd.DataFrame(figure_skips)], ignore_index=True)
            atomic_write_frame(out / TABLE_FILES["skipped"], tables["skipped"])
        result.files.extend(p for f in result.figures for p in f.paths if p not in result.files)
    if opts.additivity is not None or opts.ablation is not None:
        attach(result, additivity=opts.additivity, ablation=opts.ablation, figures=opts.figures, dpi=opts.dpi)
    attach_domains(result)  # after the additivity check, whose gaps it splits by domain
    prune_outputs(out, result.files, ANALYZE_MANIFEST)  # an earlier analysis's slices that are gone now
    return result


def _resolve_group(opts: AnalysisOptions, meta: dict[str, Any], data: pd.DataFrame) -> str | None:
    """The group of the between-group tests: ``analysis.group`` / ``--group`` if given, else the default of
    :mod:`clap.groups` (``knowledge_type``; never a provenance label such as ``pmids`` or ``bioasq_id``)."""
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
