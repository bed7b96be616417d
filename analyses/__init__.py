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

from typing import TYPE_CHECKING

from clap.lazy import lazy_exports

#: Each public name and the module it lives in: imported on first use, so ``clap --help`` never loads pandas or scipy.
_EXPORTS = {
    "bootstrap_ci": "analyses.bootstrap",
    "REQUIRED_COLUMNS": "analyses.io",
    "load_results": "analyses.io",
    "save_results": "analyses.io",
    "validate_results": "analyses.io",
    "AnalysisWarning": "analyses.select",
    "analysis_units": "analyses.select",
    "prepare": "analyses.select",
    "select_rows": "analyses.select",
    "friedman": "analyses.stats",
    "mixed_anova": "analyses.stats",
    "pairwise_between": "analyses.stats",
    "pairwise_within": "analyses.stats",
    "rm_anova": "analyses.stats",
    "compare_localization": "analyses.localization",
    "contributions": "analyses.localization",
    "localization_measures": "analyses.localization",
    "profile_measures": "analyses.localization",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time the names above are imported on first use
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
