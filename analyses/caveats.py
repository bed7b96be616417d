"""Automatic caveats: the things a reader of a patching study must know before trusting its numbers.

Each check looks at the results and the computed tables and, when it applies, returns one plain sentence that the
report puts at the top. The sentences name the sites, probes and counts involved so they can be acted upon.

Two kinds: the analysis caveats (:func:`collect` and the validity, group-size and denominator checks), about one
analysis's statistics; and the design caveats (:func:`design_caveats`), about what the patched sites can show at
all (sites that reproduce the clean run by construction, GPT-2's ``Conv1D`` modules). Those are a property of the
study's design, visible across models, so ``clap run``'s study page shows them first, per model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

#: GPT-2's projection modules are ``transformers.pytorch_utils.Conv1D``: a linear layer despite the name.
CONV1D_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: A site whose patched value equals the clean run's to this tolerance for every probe reproduces it exactly.
EXACT = 1e-5
#: Below this many probes per group a test has little power and its normal-theory p depends on normality.
SMALL_SAMPLE = 10


def _names(values: list[Any], limit: int = 6) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def trivial_caveat(data: pd.DataFrame) -> str | None:
    """Sites that recover 100 % by construction (unembedding, final residual stream / norm at the answer)."""
    triv = data[data["trivial"].astype(bool)]
    if triv.empty:
        return None
    sites = triv.groupby(["site", "site_kind"], observed=True)["recovery"].mean().reset_index()
    listed = _names([f"{r.site} ({r.site_kind}, mean recovery {r.recovery:.2f})" for r in sites.itertuples()])
    return (
        f"{len(sites)} site(s) reproduce the source run by construction (recovery 1 when denoising, 0 when "
        f"noising), not because they store anything: {listed}. "
        "Their rows are flagged `trivial`, excluded from every test and hatched in the per-module figure; "
        "they are sanity checks of the patching, not findings."
    )


def approximate_caveat(data: pd.DataFrame) -> str | None:
    """Rows estimated by attribution patching (``approximate``): a first-order estimate, not a measurement."""
    if "approximate" not in data.columns:
        return None
    approx = data[data["approximate"].astype(bool)]
    if approx.empty:
        return None
    operations = _names(sorted(approx["operation"].unique().tolist(), key=str))
    return (
        f"{len(approx)} of {len(data)} rows are attribution-patching estimates (operation {operations}): first-order "
        "(activation difference x gradient of the logit difference at the target run, or that gradient integrated "
        "along the input path for `attribution(ig...)`), not measured. They are "
        "tested and drawn as their own operation; trust them where they agree with exact patching, and patch the "
        "sites they rank highest exactly before reporting a finding."
    )


def undefined_caveat(data: pd.DataFrame) -> str | None:
    """Recoveries with a (near) zero denominator (clean and corrupted runs give the same metric), or infinite."""
    bad = data[~data["recovery_defined"].astype(bool) | ~np.isfinite(data["recovery"].astype(float))]
    if bad.empty:
        return None
    probes = sorted(bad["probe_id"].unique().tolist(), key=str)
    per_metric = bad.groupby("metric", observed=True).size()
    detail = ", ".join(f"{m}: {n}" for m, n in per_metric.items())
    return (
        f"Recovery is undefined for {len(bad)} of {len(data)} rows ({detail}) in {len(probes)} probe(s) "
        f"({_names(probes)}): clean and corrupted runs give (nearly) the same metric, so there is nothing to recover. "
        "These rows are excluded from tests and means (never counted as 0 or 1); a corruption that does not change "
        "the answer is worth fixing in the probe set."
    )


def group_caveat(data: pd.DataFrame, group: str | None, dv: str = "recovery") -> str | None:
    """Groups with fewer than 2 complete probes (a defined value at every layer of a slice) in some tested slice:
    such a group has no variance and no interval, and the between-group tests lean on the other groups. Often the
    sign of a grouping by a per-probe field (an id), so the sentence says how to declare the group."""
    from analyses.select import SELECT_COLUMNS

    if not group or group not in data.columns or dv not in data.columns:
        return None
    rows = data[~data["trivial"].astype(bool) & data["layer"].notna()
                & np.isfinite(pd.to_numeric(data[dv], errors="coerce").astype(float))]
    keys = [c for c in SELECT_COLUMNS if c in rows.columns]
    groups = data.drop_duplicates("probe_id").set_index("probe_id")[group]
    fewest: dict[Any, int] = {}
    for _, part in rows.groupby(keys, observed=True, dropna=False) if keys else [((), rows)]:
        n_layers = part["layer"].nunique()
        if n_layers < 2:
            continue
        per_probe = part.groupby("probe_id", observed=True)["layer"].nunique()
        complete = per_probe[per_probe == n_layers].index
        counts = groups.reindex(complete).value_counts().reindex(groups.unique(), fill_value=0)
        for g, k in counts.items():
            fewest[g] = min(fewest.get(g, int(k)), int(k))
    small = sorted(((g, k) for g, k in fewest.items() if k < 2), key=lambda item: str(item[0]))
    if not small:
        return None
    listed = _names([f"{g} ({k})" for g, k in small])
    return (f"Design: {len(small)} of {len(fewest)} `{group}` group(s) have fewer than 2 complete probes (a value "
            f"at every layer of a slice; fewest per group over the slices): {listed}. Such a group has no variance "
            "and no interval, and the between-group tests rest on the other groups. Check that `"
            f"{group}` is the grouping you meant (declare it with `analysis: {{group: NAME}}` or `--group NAME`), "
            "or add probes to these groups.")


def sample_caveats(data: pd.DataFrame, group: str | None) -> list[str]:
    """Single probe (no test possible) and small samples (little power)."""
    n = data["probe_id"].nunique()
    if n <= 1:
        return [
            f"Only {n} probe: no test across layers is possible (a repeated-measures test needs at least 2 probes, "
            "and 10 or more per group for useful power). Only descriptive tables and figures are shown."
        ]
    if group and group in data.columns:
        sizes = data.drop_duplicates("probe_id")[group].value_counts().sort_index()
        small = sizes[sizes < SMALL_SAMPLE]
        if len(small):
            return [
                f"Small samples: {', '.join(f'{g}: {k} probe(s)' for g, k in sizes.items())}. With fewer than "
                f"{SMALL_SAMPLE} probes per group tests have little power, normal-theory p-values lean on the "
                "normality assumption and Mauchly's test is unreliable; check the Friedman test (ranks, no normality), "
                "read the t intervals (they keep their coverage at small n; percentile bootstraps do not) and treat "
                "non-significant results as inconclusive."
            ]
        return []
    if n < SMALL_SAMPLE:
        return [
            f"Small sample: {n} probes. With fewer than {SMALL_SAMPLE} probes tests have little power and "
            "normal-theory p-values lean on the normality assumption; check the Friedman test (ranks, no "
            "normality) and read the t intervals (they keep their coverage at small n)."
        ]
    return []


def table_caveats(tables: Mapping[str, pd.DataFrame], alpha: float = 0.05, group: str | None = None) -> list[str]:
    """Caveats that follow from the test results: dropped probes, sphericity, skipped tests, many slices."""
    out: list[str] = []
    rm = tables.get("rm_anova", pd.DataFrame())
    if len(rm):
        dropped = rm[rm["n_dropped"] > 0]
        if len(dropped):
            worst = int(dropped["n_dropped"].max())
            out.append(
                f"Missing cells: in {len(dropped)} tested slice(s) up to {worst} probe(s) lacked some layers and were "
                "dropped from the repeated-measures tests (listwise deletion); descriptive means and intervals still "
                "use every probe that has a value."
            )
        violated = rm[rm["sphericity"].astype("boolean").eq(False).fillna(False)]
        if len(violated):
            out.append(
                f"Sphericity is violated (Mauchly p < 0.05) in {len(violated)} slice(s): read the Greenhouse-Geisser "
                "corrected p (`p_GG_corr`), not `p_unc`."
            )
        undefined = rm[rm["sphericity"].isna()]
        if len(undefined):
            out.append(
                f"Mauchly's test is undefined in {len(undefined)} slice(s) because there are fewer probes than layers; "
                "the Greenhouse-Geisser correction is still applied."
            )
    n_tests, n_families, n_slices = count_tests(tables, group)
    if n_families > 1:
        out.append(
            f"{n_tests} tests in {n_slices} slice(s) (metric x site kind x operation x direction x positions) are "
            f"reported, in {n_families} separately corrected families (each ANOVA or Friedman row is one, each slice's "
            "Holm-corrected post-hoc table one); p-values are not corrected across them (at alpha = "
            f"{alpha}, about {alpha * n_families:.1f} false positives are expected by chance if nothing is going on)."
        )
    skipped = tables.get("skipped", pd.DataFrame())
    if len(skipped):
        reasons = skipped["reason"].drop_duplicates().tolist()
        out.append(f"{len(skipped)} test(s) were not run: {' | '.join(reasons[:3])}"
                   + (" | ..." if len(reasons) > 3 else ""))
    return out


def validity_caveats(validity: pd.DataFrame, shared: pd.DataFrame, subject: str = "probe") -> list[str]:
    """Excluded probes (which and why), probes whose corruption does not flip the preference, shared clean prompts."""
    out: list[str] = []
    if len(validity):
        excluded = validity[validity["excluded"].astype(bool)]
        if len(excluded):
            listed = _names([f"{r.probe_id} ({r.reason})" for r in excluded.itertuples()], limit=4)
            out.append(f"{len(excluded)} of {len(validity)} probe(s) were excluded before any statistic by the "
                       f"analysis rules: {listed}.")
        kept = validity[~validity["excluded"].astype(bool)]
        no_flip = kept[kept["flips"].astype("boolean").eq(False).fillna(False)]
        same_prompt = bool(len(kept)) and bool((kept["clean_logit_diff"] == kept["corrupted_logit_diff"]).all())
        if len(no_flip) and not same_prompt:  # one prompt run twice (cross-model, same prompt) has no corruption
            remaining = len(kept) - len(no_flip)
            advice = ("Consider `require_flip: true` in the `analysis:` section (it would keep "
                      f"{remaining} of {len(kept)} probes)." if remaining >= max(2, (len(kept) + 1) // 2) else
                      f"`require_flip: true` would keep only {remaining} of {len(kept)} probes, so it is not "
                      "suggested: read recovery as the share of the clean-corrupted gap recovered, not as restoring "
                      "a flipped answer.")
            out.append(f"In {len(no_flip)} of {len(kept)} analysed probe(s) the corruption does not flip the model's "
                       "preference (clean and corrupted logit differences of the same sign): "
                       f"{_names(no_flip['probe_id'].tolist())}. {advice}")
    if len(shared) and subject != "clean_prompt":
        n_probes = int(shared["n_probes"].sum())
        out.append(f"{n_probes} probes share {len(shared)} clean prompt(s) and are not independent subjects: the tests "
                   "count them separately, which overstates the sample size. Set `subject: clean_prompt` in the "
                   "`analysis:` section to average them into one subject per clean prompt.")
    return out


#: Recovery outside this range at a non-trivial site is rarely a finding: usually a (near) zero denominator.
PLAUSIBLE_RECOVERY = (-1.0, 2.0)


def small_denominators(data: pd.DataFrame, validity: pd.DataFrame, metric: str = "logit_diff") -> pd.DataFrame:
    """Probes whose recovery denominator is small (below the median of the analysed probes) and whose recovery of
    ``metric`` leaves :data:`PLAUSIBLE_RECOVERY` at some non-trivial site: ``probe_id``, ``abs_diff``,
    ``min_recovery``, ``max_recovery``, sorted by ``abs_diff``. A few such probes can turn a clear layer effect
    into "no evidence": their recoveries dominate every mean and variance."""
    columns = ["probe_id", "abs_diff", "min_recovery", "max_recovery"]
    if not len(validity) or "abs_diff" not in validity.columns or validity["abs_diff"].isna().all():
        return pd.DataFrame(columns=columns)
    rows = data[(data["metric"] == metric) & ~data["trivial"].astype(bool) & data["recovery_defined"].astype(bool)]
    rec = rows["recovery"].astype(float)
    rows = rows[np.isfinite(rec)]
    span = rows.groupby("probe_id", observed=True)["recovery"].agg(["min", "max"])
    low, high = PLAUSIBLE_RECOVERY
    wild = span[(span["min"] < low) | (span["max"] > high)]
    kept = validity[~validity["excluded"].astype(bool)].set_index("probe_id")["abs_diff"].astype(float)
    median = float(kept.median()) if len(kept) else np.nan
    small = kept.reindex(wild.index)
    flagged = small[small < median].index
    out = pd.DataFrame({"probe_id": flagged, "abs_diff": kept.reindex(flagged).to_numpy(),
                        "min_recovery": wild.loc[flagged, "min"].to_numpy(),
                        "max_recovery": wild.loc[flagged, "max"].to_numpy()})
    return out.sort_values("abs_diff").reset_index(drop=True)[columns]


def _round_down_between(low: float, high: float) -> float:
    """A short number t with low < t <= high (fewest significant digits), for a threshold a person can type."""
    import math

    if high <= 0:
        return high
    for digits in range(1, 7):
        step = 10.0 ** (math.floor(math.log10(high)) - digits + 1)
        t = round(math.floor(high / step) * step, 12)
        if low < t <= high:
            return t
    return high


def denominator_caveat(data: pd.DataFrame, validity: pd.DataFrame, metric: str = "logit_diff") -> str | None:
    """Flag probes with a near-zero recovery denominator (:func:`small_denominators`) and suggest a
    ``min_abs_diff`` that excludes them while keeping most probes; no rule is suggested that would keep fewer
    than half of them (never one that excludes every probe)."""
    flagged = small_denominators(data, validity, metric)
    if flagged.empty:
        return None
    kept = validity[~validity["excluded"].astype(bool)]["abs_diff"].astype(float).dropna()
    listed = _names([f"{r.probe_id} (|denominator| {r.abs_diff:.3g}, recovery {r.min_recovery:.3g} to "
                     f"{r.max_recovery:.3g})" for r in flagged.itertuples()], limit=4)
    text = (f"Small denominators: {len(flagged)} of {len(kept)} probe(s) have a recovery denominator "
            f"(|clean - corrupted| of the {metric}; across models |source - target|) well below the median "
            f"{kept.median():.3g}, and recoveries outside [{PLAUSIBLE_RECOVERY[0]:g}, {PLAUSIBLE_RECOVERY[1]:g}]: "
            f"{listed}. Dividing by a near-zero gap makes such values dominate every mean and variance, and can hide "
            "a clear layer effect. ")
    worst = float(flagged["abs_diff"].max())
    above = kept[kept > worst]
    if len(above):
        threshold = _round_down_between(worst, float(above.min()))
        remaining = int((kept >= threshold).sum())
        if remaining >= max(2, (len(kept) + 1) // 2):
            return text + (f"`min_abs_diff: {threshold:g}` in the `analysis:` section would exclude them and keep "
                           f"{remaining} of {len(kept)} probes.")
    return text + ("No `min_abs_diff` would exclude them and keep most probes; check these probes' prompts, or "
                   "read the effect (`effect`, patched - corrupted) instead of recovery.")


def count_tests(tables: Mapping[str, pd.DataFrame], group: str | None = None) -> tuple[int, int, int]:
    """``(tests, families, slices)`` over every table with p-values: each row with a p-value is a test; a table
    corrected within a slice (``p_corr``, ``p_holm``) is one family per slice (per group too, when the table is
    corrected within each group, as the per-group one-sample tests are), every other row a family of its own."""
    from analyses.select import SELECT_COLUMNS

    n_tests = n_families = 0
    slices: set[tuple] = set()
    for name, table in tables.items():
        if name == "skipped" or not len(table) or "p_unc" not in table.columns:
            continue
        tested = table[table["p_unc"].notna()]
        keys = [c for c in SELECT_COLUMNS if c in tested.columns]
        slices |= set(tested[keys].astype(str).itertuples(index=False, name=None)) if keys else {()}
        n_tests += len(tested)
        if any(c in tested.columns for c in ("p_corr", "p_holm", "p_fdr_bh")) and keys:
            family = keys + ([group] if group and group in tested.columns else [])
            n_families += len(tested.drop_duplicates(family))
        else:
            n_families += len(tested)
    return n_tests, n_families, len(slices)


def cross_model_caveat(data: pd.DataFrame) -> str | None:
    """What the baselines are when the source activations came from another model (cross-model patching)."""
    if "source_model_clean" not in data.columns or not data["source_model_clean"].notna().any():
        return None
    return ("Cross-model patching: the source activations come from another model. `clean` and `corrupted` (and "
            "the probe validity table) are the target model's runs; recovery runs from the target model on the "
            "target prompt (0) to the source model on the source prompt (1, `source_model_clean` when denoising), "
            "so it measures how much of the source model's behaviour a site carries over, not a restored "
            "corruption; `kl` has no cross-model recovery.")


def collect(data: pd.DataFrame, tables: Mapping[str, pd.DataFrame], group: str | None,
            alpha: float = 0.05) -> list[str]:
    """All caveats that apply, most fundamental first."""
    found = [cross_model_caveat(data), approximate_caveat(data), trivial_caveat(data), undefined_caveat(data),
             *sample_caveats(data, group),
             *table_caveats(tables, alpha, group)]
    return [c for c in found if c]


def design_caveats(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Caveats about what the patched sites can show at all, from one model's results (``frame``, ``meta``: its
    results and run.json): sites that recover 100 % by construction, sites that reproduce the clean run exactly for
    every probe (a whole-stream tensor patched at every position), and GPT-2's ``Conv1D`` modules."""
    notes = []
    trivial = frame[frame["trivial"]]
    if len(trivial):
        sites = sorted(trivial["site"].unique())
        notes.append(
            f"{len(sites)} site(s) recover 100 % by construction ({_names(sites, 8)}): the patched tensor alone "
            "determines the answer logits (the unembedding `lm_head`, the final norm, the last residual stream at the "
            "answer position), so their recovery says nothing about where the knowledge is stored."
        )
    rows = frame[(frame["direction"] == "denoising") & ~frame["trivial"] & frame["recovery_defined"]]
    if len(rows):
        # the run a whole-stream patch reproduces: the clean one, or across models the source model's clean run
        reference = rows["source_model_clean"] if "source_model_clean" in rows.columns else rows["clean"]
        same = (rows["patched"] - reference).abs() <= EXACT * reference.abs().clip(lower=1.0)
        whole = same.groupby(rows["site"]).all()
        sites = sorted(whole[whole].index)
        if sites:
            notes.append(
                f"{len(sites)} further site(s) reproduce the clean run exactly for every probe ({_names(sites, 8)}): "
                "patched at every position, a tensor "
                "that carries the whole residual stream (a block's output, the token embedding) replaces the whole "
                "corrupted run, so recovery is 1 at every layer by construction, not a finding about that layer."
            )
    architecture = str((meta.get("model") or {}).get("architecture") or "")
    modules = sorted({m for m in frame["module"].dropna().unique() if str(m).endswith(CONV1D_SUFFIXES)})
    if modules and ("GPT2" in architecture or not architecture):
        notes.append(
            f"GPT-2's `c_attn`, `c_proj` and `c_fc` modules ({len(modules)} patched) are "
            "`transformers.pytorch_utils.Conv1D`: a linear projection (x @ W + b, the weight stored transposed), "
            "not a convolution. Results for them are results for linear layers."
        )
    return notes
