"""The Methods text of an analysis: one sentence group per item, saying only what was done.

Written from the options the analysis ran under and the tables it filled, so it names the reduction, the subject
unit, the exclusions, the interval and the sums-of-squares type, and only the tests that actually ran (a test
skipped on every slice is not claimed); the localization profiles, noise draws, cross-model baselines and
attribution-patching estimates add their sentences when the results hold them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from analyses.localization import localization_methods
from analyses.reductions import position_label
from analyses.tables import probe_labels
from clap.analysis_options import AnalysisOptions
from clap.groups import choice_words


def exclusion_rules(opts: AnalysisOptions) -> str:
    """The probe exclusion rules in words (empty when none applies)."""
    parts = []
    if opts.min_clean_logit_diff is not None:
        parts.append(f"clean logit difference >= {opts.min_clean_logit_diff:g}")
    if opts.require_flip:
        parts.append("the corruption flips the preference")
    if opts.min_abs_diff is not None:
        parts.append(f"|recovery denominator| (|clean - corrupted|, across models |source - target|) >= "
                     f"{opts.min_abs_diff:g}")
    return "; ".join(parts)


def reduction_words(opts: AnalysisOptions) -> str:
    """How a probe's rows in one layer became one value, in words (the ``agg`` option of an analysis)."""
    heads = "heads summed per layer" if opts.head_reduction == "sum" else "heads tested one by one"
    return f"{position_label(opts.position_reduction)} ({heads})"


def _cross_model_methods(meta: dict[str, Any]) -> list[str]:
    """The baselines of a cross-model run (``run.json`` names a ``source_model``), else nothing."""
    source = meta.get("source_model")
    if not source:
        return []
    return [f"Cross-model patching: source activations from {source.get('source') or 'another model'} patched into "
            f"{(meta.get('model') or {}).get('source') or 'the target model'}; recovery = (patched - target model on "
            "the target prompt) / (source model on the source prompt - target model on the target prompt)."]


def _group_methods(options: Mapping[str, Any], meta: dict[str, Any], data: pd.DataFrame) -> str:
    """Which label grouped the probes and why (declared, or the default of :mod:`clap.groups`)."""
    o = options
    labels = probe_labels(meta, data)
    subject_field = (o.get("analysis") or {}).get("subject_field", "subject")
    return choice_words(o.get("group_requested"), bool(o.get("group_declared")), list(labels), subject_field, labels)


def methods_text(tables: Mapping[str, pd.DataFrame], options: Mapping[str, Any], meta: dict[str, Any] | None,
                 data: pd.DataFrame) -> list[str]:
    """The Methods paragraph, item by item: only what was done, with the reduction and units named.

    ``options`` is :attr:`analyses.pipeline.Analysis.options` (the resolved options), ``tables`` the analysis's
    tables, ``meta`` run.json and ``data`` the rows the statistics used."""
    o, t, meta = options, tables, meta or {}
    a = AnalysisOptions(**o["analysis"])
    group = o.get("group")
    reductions = sorted(set().union(*[set(t[n]["reduction"].dropna())
                                      for n in ("rm_anova", "one_sample") if len(t[n])]))
    out = [
        f"Dependent variable: `{o['dv']}`, one value per probe and layer. Reduction of a probe's rows in one layer: "
        + (f"legacy aggregation `{o['agg']}`." if o["agg"] and o["agg"] not in (reduction_words(a),) else
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
    out += _cross_model_methods(meta)
    out.append(_group_methods(o, meta, data))
    validity = t.get("probe_validity", pd.DataFrame())
    excluded = validity[validity["excluded"].astype(bool)] if len(validity) else validity
    rules = exclusion_rules(a)
    if rules:
        out.append(f"Probe exclusion before any statistic ({rules}): {len(excluded)} of {len(validity)} probes "
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
    return out + _noise_methods(meta) + _approximate_methods(data)


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
