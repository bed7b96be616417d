"""``clap analyze`` and ``clap report``: statistics, figures and the study report from a results directory.

Heavy imports (pandas, pingouin, matplotlib) happen inside the commands so that ``clap --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analyses.options import AnalyzeOptions

log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="folder with results.parquet and run.json (from `clap patch`)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: RESULTS_DIR/analysis)")
    p.add_argument("--dv", default="recovery", help="column to test (default: recovery)")
    p.add_argument("--group", default=None,
                   help="probe label whose values are the groups of the between-group tests (the analysis.group "
                        "field; default: analysis.group, else knowledge_type, else the first label that is not "
                        "provenance such as pmids or an id)")
    p.add_argument("--metric", action="append", dest="metrics", default=None, metavar="METRIC",
                   help="restrict to this metric (repeatable; default: every metric)")
    p.add_argument("--site-kind", action="append", dest="site_kinds", default=None, metavar="KIND",
                   help="restrict tests to this site kind (repeatable; default: every site kind with 2+ layers)")
    p.add_argument("--position-reduction", default=None, metavar="RULE",
                   help="a probe's positions in one layer -> one value: last (default), max, sum, subject, "
                        "subject_last or a token INDEX (-1 = last); default: the spec's analysis: section, else last")
    p.add_argument("--head-reduction", default=None, choices=("sum", "each"),
                   help="attention heads of a layer: sum (the layer's total; default) or each (per-head tests only)")
    p.add_argument("--subject", dest="subject_unit", default=None, choices=("probe", "clean_prompt"),
                   help="unit of replication: probe (default) or clean_prompt (probes sharing one are averaged)")
    p.add_argument("--interval", default=None, choices=("t", "bca", "percentile"),
                   help="confidence intervals of means: t (default), bca or percentile bootstrap")
    p.add_argument("--ss-type", type=int, default=None, choices=(2, 3),
                   help="sums of squares of the mixed ANOVA: 2 (pingouin, default) or 3 (unweighted means)")
    p.add_argument("--agg", default=None, choices=("mean", "median", "max", "min", "sum"),
                   help="legacy: one aggregation for all of a probe's rows in a layer, instead of the reductions above")
    p.add_argument("--missing", default="drop_subjects", choices=("drop_subjects", "drop_levels", "error"),
                   help="probes lacking some layer: drop those probes (default), drop those layers, or stop")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the run's seed from run.json)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level for highlighting (default: 0.05)")
    p.add_argument("--dpi", type=int, default=200, help="PNG resolution, at least 200 (default: 200)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables only (faster)")


def _options(args: argparse.Namespace) -> AnalyzeOptions:
    """The options object of ``clap analyze`` / ``clap report`` from their flags (the flags of the ``analysis:``
    section become overrides of the section recorded in run.json)."""
    from analyses.options import analyze_options
    from clap.analysis_options import parse_position_reduction
    from clap.errors import ClapError

    if args.n_boot < 100:
        raise ClapError(f"--n-boot {args.n_boot}: use at least 100 resamples (2000 or more for publication)")
    if args.dpi < 200:
        raise ClapError(f"--dpi {args.dpi}: figures are saved at 200 dpi or more")
    if not 0 < args.alpha < 1:
        raise ClapError(f"--alpha {args.alpha}: expected a number between 0 and 1")
    position = parse_position_reduction(args.position_reduction) if args.position_reduction is not None else None
    return analyze_options(out_dir=args.out, dv=args.dv, group=args.group, metrics=args.metrics,
                           site_kinds=args.site_kinds, agg=args.agg, missing=args.missing, n_boot=args.n_boot,
                           seed=args.seed, alpha=args.alpha, dpi=args.dpi, figures=args.figures,
                           position_reduction=position, head_reduction=args.head_reduction,
                           subject=args.subject_unit, interval=args.interval, ss_type=args.ss_type)


def _analyze(args: argparse.Namespace) -> int:
    from analyses.pipeline import analyze

    result = analyze(args.results_dir, _options(args))
    n_tests = len(result.tables["rm_anova"])
    print(f"wrote {len(result.files)} files to {result.out_dir} "
          f"({n_tests} slice(s) tested, {len(result.figures)} figures)")
    for caveat in result.caveats:
        log.warning("caveat: %s", caveat)
    return 0


def _report(args: argparse.Namespace) -> int:
    from analyses.report import write_report

    files = write_report(args.results_dir, _options(args))
    print(f"wrote {files.html} and {files.markdown}")
    for caveat in files.analysis.caveats:
        log.warning("caveat: %s", caveat)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from analyses.compare import compare
    from clap.errors import ClapError

    if args.dpi < 200:
        raise ClapError(f"--dpi {args.dpi}: figures are saved at 200 dpi or more")
    if args.relative_depth is not None and args.relative_depth < 1:
        raise ClapError(f"--relative-depth {args.relative_depth}: expected a number of bins, at least 1")
    result = compare(args.run_a, args.run_b, args.out, dv=args.dv, group=args.group, alpha=args.alpha,
                     figures=args.figures, dpi=args.dpi, relative_depth=args.relative_depth)
    by = "" if result.bins is None else (f", by relative depth: {result.bins} bins, models of "
                                         f"{result.depths[0]} and {result.depths[1]} layers")
    print(f"wrote {len(result.files)} files to {result.out_dir} ({result.paired['probe_id'].nunique()} probes paired"
          f"{by})")
    return 0


def register_compare(subparsers: Any) -> None:
    """Add ``compare`` (two runs of the same probes and sites, e.g. a base and a fine-tuned model)."""
    c = subparsers.add_parser(
        "compare",
        help="paired comparison of two runs of the same probes (B - A per probe and layer, or relative depth bin)",
        description="Match the probes of two results directories by id, compute paired B - A differences per layer "
        "and site kind, a layer x model repeated-measures ANOVA, difference heatmaps and compare.html / compare.md. "
        "Models of different depth are paired per relative depth bin instead of layer (--relative-depth).",
    )
    c.add_argument("run_a", metavar="RUN_A", help="results directory of the reference run (A)")
    c.add_argument("run_b", metavar="RUN_B", help="results directory of the compared run (B)")
    c.add_argument("-o", "--out", required=True, help="output folder")
    c.add_argument("--dv", default="recovery", help="column to compare (default: recovery)")
    c.add_argument("--group", default=None,
                   help="probe label whose values are the groups (default: the runs' analysis.group, else "
                        "knowledge_type, else the first shared label that is not provenance such as pmids or an id)")
    c.add_argument("--alpha", type=float, default=0.05, help="significance level for highlighting (default: 0.05)")
    c.add_argument("--dpi", type=int, default=200, help="PNG resolution, at least 200 (default: 200)")
    c.add_argument("--no-figures", dest="figures", action="store_false", help="tables only")
    c.add_argument("--relative-depth", type=int, default=None, metavar="BINS",
                   help="pair per relative depth bin instead of layer: layer l of N at (l + 0.5) / N, [0, 1) cut "
                        "into BINS equal bins (default: by relative depth with min(N_A, N_B) bins when the models' "
                        "depths differ, else by layer)")
    c.set_defaults(func=_compare)


def register(subparsers: Any) -> None:
    """Add ``analyze``, ``report`` and ``compare`` to the ``clap`` command line."""
    p = subparsers.add_parser(
        "analyze",
        help="statistics across layers (CSV tables) and figures (PNG, SVG) from a results directory",
        description="Repeated-measures and mixed ANOVA, Friedman, Holm-corrected post-hoc tests and bootstrap CIs "
        "for every slice of the results, written as CSV tables, plus figures (PNG and SVG).",
    )
    _add_common(p)
    p.set_defaults(func=_analyze)
    r = subparsers.add_parser(
        "report",
        help="self-contained HTML report (and Markdown) of a results directory",
        description="Run `clap analyze` and write report.html (figures embedded) and report.md into the output folder.",
    )
    _add_common(r)
    r.set_defaults(func=_report)
    register_compare(subparsers)
