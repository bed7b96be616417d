"""The analyses of the runs derived from a study (the additivity check's joint patches, the clean-run ablation),
attached to the study's :class:`analyses.pipeline.Analysis` and rendered as sections of its report.

Why here and not in the pipeline: both read the study's own analysed rows (after the probe exclusions) beside a
second results folder, so :func:`analyses.pipeline.analyze` hands them its result once (:func:`attach`) and the
report asks for their sections (:func:`html_sections`, :func:`markdown_sections`); neither needs to know more.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses import ablation as _ablation
from analyses import additivity as _additivity
from analyses.formatting import figure_html, figure_markdown, list_html, stat_table_html, stat_table_markdown


@dataclass
class Section:
    """One derived analysis in the report: title, findings, Methods sentences, tables (title -> frame), figures
    (name, title, caption, paths)."""

    key: str
    title: str
    findings: list[str]
    tables: dict[str, pd.DataFrame]
    figures: list[tuple[str, str, str, list[Path]]]
    #: the per-probe rows behind the section (the additivity cells), for analyses that read them too
    data: pd.DataFrame | None = None


def attach(result: Any, *, additivity: str | Path | None = None, ablation: str | Path | None = None,
           figures: bool = True, dpi: int = 200) -> list[Section]:
    """Analyse the derived runs against ``result`` (an Analysis): tables written into its folder, Methods sentences
    appended to ``result.methods``, sections returned (and kept in ``result.derived``)."""
    o = result.options
    dv, group = o.get("dv", "recovery"), o.get("group")
    sections = []
    if additivity is not None:
        add = _additivity.analyze_additivity(result.data, additivity, result.out_dir, dv=dv, group=group,
                                             alpha=o.get("alpha", 0.05), figures=figures, dpi=dpi)
        result.methods += add.methods
        shown = ["site_kind", "family", "k", *([group] if group else []), "n", "joint", "sum_single", "gap",
                 "ci_low", "ci_high", "p_unc"]
        pair_cols = ["site_kind", "ranks", *([group] if group else []), "n", "gap", "ci_low", "ci_high", "p_unc"]
        overall = add.gaps[add.gaps[group] == "all"] if group else add.gaps
        sections.append(Section("additivity", "Additivity: layers patched jointly vs the sum of single layers",
                                 add.findings, {"Joint vs sum per set of layers (all probes)": overall[shown],
                                                "Pairwise interaction terms by rank pair (gap = interaction)":
                                                    add.pairs[pair_cols]}, add.figures, add.cells))
        result.files += add.files
    if ablation is not None:
        abl = _ablation.analyze_ablation(ablation, result.out_dir, patching=result.data, dv=dv, group=group,
                                         probes=sorted(result.data["probe_id"].unique()), n_boot=o.get("n_boot", 2000),
                                         seed=o.get("seed", 0), figures=figures, dpi=dpi)
        result.methods += abl.methods
        layers = abl.summary[abl.summary["site_kind"] != "head"]
        shown = ["operation", "site", *([group] if group else []), "n", "clean", "ablated", "change", "ci_low",
                 "ci_high", "p_unc"]
        sections.append(Section("ablation", "Ablation of the clean run", abl.findings,
                                {"Rank agreement with head patching (Spearman over heads)": abl.agreement,
                                 "Attention and MLP outputs: change in the clean value": layers[shown]},
                                abl.figures))
        result.files += abl.files
    result.derived = sections
    return sections


def html_sections(result: Any) -> list[str]:
    """The derived sections as HTML (figures embedded; rows with p < alpha bold, long tables folded)."""
    parts, alpha = [], result.options.get("alpha", 0.05)
    for s in getattr(result, "derived", None) or []:
        parts.append(f"<h2 id=\"{s.key}\">{html.escape(s.title)}</h2>")
        if s.findings:
            parts.append(list_html(s.findings, "findings"))
        parts += [stat_table_html(title, table, alpha) for title, table in s.tables.items() if len(table)]
        parts += [figure_html(name, title, caption, _png(paths)) for name, title, caption, paths in s.figures]
    return parts


def markdown_sections(result: Any) -> list[str]:
    """The derived sections as Markdown (figures linked relative to the analysis folder)."""
    out, alpha = [], result.options.get("alpha", 0.05)
    for s in getattr(result, "derived", None) or []:
        out += [f"## {s.title}", "", *[f"- {x}" for x in s.findings], ""]
        for title, table in s.tables.items():
            if len(table):
                out += [f"#### {title}", "", *stat_table_markdown(table, alpha)]
        for _, title, caption, paths in s.figures:
            out += figure_markdown(title, caption, _png(paths), result.out_dir)
    return out


def _png(paths: list[Path]) -> Path:
    return next(p for p in paths if p.suffix == ".png")
