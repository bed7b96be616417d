"""The statistics tables of one analysis: every test on every slice, computed without writing anything.

:func:`compute_tables` runs the tests of :mod:`analyses.stats` and the intervals of :mod:`analyses.bootstrap` on each
slice with at least two layers (:func:`analyses.select.analysis_units`), and the localization profiles
(:mod:`analyses.localization`); a test that cannot run on a slice is recorded in ``skipped`` with its reason instead
of stopping the others. The descriptive tables beside the tests (probe counts, trivial sites, the per-module
intervals, the spread over noise draws) are here too. :data:`TABLE_FILES` names the CSV file of each table;
:func:`analyses.pipeline.analyze` writes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.bootstrap import CI_COLUMNS, bootstrap_ci
from analyses.figures import site_order
from analyses.localization import TABLE_FILES as LOCALIZATION_FILES
from analyses.localization import localization_tables
from analyses.samples import sample_spread
from analyses.select import SELECT_COLUMNS, AnalysisWarning, analysis_units, concat_or_empty
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
from analyses.validity import VALIDITY_COLUMNS, shared_clean_prompts
from clap.analysis_options import AnalysisOptions
from clap.contract import read_samples
from clap.errors import ClapError

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

#: Book-keeping columns every statistics table ends with (see :mod:`analyses.stats`).
BOOK_COLUMNS = ["dv", *SELECT_COLUMNS, "n_subjects", "n_levels", "n_dropped", "n_undefined", "reduction"]

#: Beyond this many sites a per-module bar plot is unreadable; the heatmaps cover layer sweeps.
MAX_BAR_SITES = 80


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
    tables = {name: concat_or_empty(frames, columns[name] + BOOK_COLUMNS) for name, frames in collected.items()}
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


def noise_samples(results_dir: Path, data: pd.DataFrame) -> pd.DataFrame:
    """The spread over noise draws (:func:`analyses.samples.sample_spread`) of the probes the analysis kept, from
    ``samples.parquet``; empty when the study drew noise once."""
    samples = read_samples(results_dir)
    if samples is None:
        return pd.DataFrame()
    kept = samples[samples["probe_id"].isin(set(data["probe_id"])) & samples["metric"].isin(set(data["metric"]))]
    return sample_spread(kept)


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
            order = site_order(part)
            table["site"] = pd.Categorical(table["site"], order, ordered=True)
            table = table.sort_values(["site"] + ([group] if group else [])).reset_index(drop=True)
            table["site"] = table["site"].astype(str)
            triv = set(part.loc[part["trivial"].astype(bool), "site"])
            table.insert(1, "trivial", table["site"].isin(triv))
            frames.append(table)
    return concat_or_empty(frames, ["site", "trivial", *([group] if group else []), *CI_COLUMNS, *BOOK_COLUMNS])


def probe_labels(meta: dict[str, Any], data: pd.DataFrame) -> dict[str, list[Any]]:
    """Each probe label of run.json's ``group_columns`` present in ``data`` -> its value per probe."""
    names = [c for c in meta.get("group_columns") or [] if c in data.columns]
    per_probe = data.drop_duplicates("probe_id")
    return {name: per_probe[name].tolist() for name in names}
