"""Statistics, figures and reports for activation-patching results.

Start from a results directory written by the patching engine (``results.parquet`` + ``run.json``)::

    from analyses import load_results, rm_anova, mixed_anova, pairwise_within, bootstrap_ci

    data, meta = load_results("runs/capitals")
    rm_anova(data, dv="recovery", within="layer", subject="probe_id", metric="logit_diff", site_kind="mlp_out")

or from the command line: ``clap analyze RESULTS_DIR`` (tables and figures), ``clap report RESULTS_DIR`` (HTML and
Markdown). How rows become one value per probe and layer is documented once, in :mod:`analyses.select`; how
concentrated each probe's per-layer contributions are (localization profiles), in :mod:`analyses.localization`.
"""

from __future__ import annotations

from analyses.bootstrap import bootstrap_ci
from analyses.io import REQUIRED_COLUMNS, load_results, save_results, validate_results
from analyses.localization import compare_localization, contributions, localization_measures, profile_measures
from analyses.select import AnalysisWarning, analysis_units, prepare, select_rows
from analyses.stats import (
    friedman,
    mixed_anova,
    pairwise_between,
    pairwise_within,
    rm_anova,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "AnalysisWarning",
    "analysis_units",
    "bootstrap_ci",
    "compare_localization",
    "contributions",
    "friedman",
    "load_results",
    "localization_measures",
    "mixed_anova",
    "pairwise_between",
    "pairwise_within",
    "prepare",
    "profile_measures",
    "rm_anova",
    "save_results",
    "select_rows",
    "validate_results",
]
