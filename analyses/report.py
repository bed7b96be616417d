"""``clap report``: one self-contained HTML page (and a Markdown twin) that states what a study found.

The HTML embeds its figures as base64 ``data:`` URIs and its style inline, so the single file can be mailed,
archived or attached to a paper's supplement and still show everything. The Markdown version links the PNG files
written by :func:`analyses.pipeline.analyze` beside it (relative paths), for repositories and wikis.

Both give: the caveats first, then the study spec, model identity, package versions and seed, probe counts, the
methods (selection and aggregation rules, corrections), and per tested slice the repeated-measures ANOVA,
Friedman test, mixed ANOVA, post-hoc tables and the figures.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses import interactive
from analyses.derived import html_sections, markdown_sections
from analyses.figure_set import FigureFile
from analyses.findings import localization_findings, overall_findings, unit_findings, unit_headline
from analyses.formatting import (
    FOLD_ROWS,
    figure_html,
    figure_markdown,
    fmt,
    folded,
    html_page,
    html_table,
    interval,
    kv_table_html,
    list_html,
    markdown_table,
    slice_title,
    stat_table_html,
    stat_table_markdown,
)
from analyses.localization import MEASURES
from analyses.options import AnalyzeOptions
from analyses.pipeline import Analysis, analyze
from analyses.select import SELECT_COLUMNS, AnalysisWarning, slice_rows
from analyses.tables import TABLE_FILES
from clap.contract import atomic_write_json, atomic_write_text

#: The findings as data beside ``report.html`` (:func:`findings_record`), read by ``clap run``'s study page.
FINDINGS_FILE = "findings.json"

#: Columns shown in the report (the CSV files keep every column).
SHOWN = {
    "rm_anova": ["Source", "F", "ddof1", "ddof2", "p_unc", "eps", "p_GG_corr", "np2", "sphericity", "p_spher",
                 "n_subjects", "n_dropped", "n_undefined"],
    "friedman": ["Source", "Q", "ddof1", "p_unc", "W", "n_subjects"],
    "mixed_anova": ["Source", "F", "ddof1", "ddof2", "p_unc", "p_GG_corr", "np2", "n_subjects"],
    "posthoc_layers": ["A", "B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr", "hedges"],
    "posthoc_groups": ["level", "A", "B", "n_A", "n_B", "mean_A", "mean_B", "diff", "T", "dof", "p_unc", "p_corr",
                       "hedges"],
    "bootstrap_ci": ["layer", "GROUP", "mean", "ci_low", "ci_high", "sd", "n"],
}
TITLES = {
    "rm_anova": "Repeated-measures ANOVA across layers",
    "friedman": "Friedman test across layers",
    "mixed_anova": "Mixed ANOVA: layer x group",
    "posthoc_layers": "Post-hoc: pairs of layers (paired t, Holm)",
    "posthoc_groups": "Post-hoc: groups at each layer (Welch t, Holm)",
    "bootstrap_ci": "Mean recovery with its confidence interval (t by default; see Methods)",
}
#: Tables rendered per slice, in this order; any other per-slice table the analysis holds follows them.
SLICE_TABLES = ("rm_anova", "friedman", "mixed_anova", "posthoc_layers", "posthoc_groups", "bootstrap_ci")
#: Tables that are not per slice or are shown elsewhere (or not at all).
NOT_PER_SLICE = ("units", "skipped", "probe_counts", "trivial_sites", "module_ci", "probe_validity",
                 "localization_contributions", "localization", "localization_groups", "localization_tests")

@dataclass
class ReportFiles:
    """The files :func:`write_report` wrote."""

    html: Path
    markdown: Path
    analysis: Analysis


def write_report(results_dir: str | Path, options: AnalyzeOptions | None = None, **names: Any) -> ReportFiles:
    """Run :func:`analyses.pipeline.analyze` (``options`` and ``names`` go to it) and write ``report.html`` and
    ``report.md`` into its output folder (``out_dir``; default ``RESULTS_DIR/analysis``).

    The HTML report is self-contained (figures embedded); the Markdown one links the figures relative to its folder.

    Parameters
    ----------
    results_dir : str or Path
        A folder written by ``clap patch``.
    options : AnalyzeOptions, optional
        What to analyse and where to write (:class:`analyses.options.AnalyzeOptions`).
    **names
        Single options by name (``out_dir``, ``group``, ``metrics``, ``figures``, ``n_boot``, ...), applied on top
        of ``options`` as :func:`analyses.options.analyze_options` applies them.

    Returns
    -------
    ReportFiles
        ``html`` and ``markdown`` (the two paths) and ``analysis`` (the :class:`~analyses.pipeline.Analysis`).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from analyses.report import write_report
    >>> from analyses.synthetic import write_synthetic
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run = write_synthetic(Path(tmp) / "run", n_probes=8, n_layers=4, site_kinds=("mlp_out",),
    ...                           metrics=("logit_diff",))
    ...     files = write_report(run, out_dir=Path(tmp) / "report", figures=False, n_boot=200)
    ...     written = sorted(p.name for p in files.html.parent.glob("report.*"))
    ...     title = "<html" in files.html.read_text(encoding="utf-8").lower()
    >>> written, title
    (['report.html', 'report.md'], True)
    """
    result = analyze(results_dir, options, **names)
    html_path = result.out_dir / "report.html"
    md_path = result.out_dir / "report.md"
    atomic_write_text(html_path, render_html(result))
    atomic_write_text(md_path, render_markdown(result))
    atomic_write_json(result.out_dir / FINDINGS_FILE, findings_record(result))
    return ReportFiles(html_path, md_path, result)


def findings_record(result: Analysis) -> dict[str, Any]:
    """What ``findings.json`` holds, for pages that summarise several reports (``clap run``'s study page): per
    tested slice its heading, headline (:func:`analyses.findings.unit_headline`) and every finding, the lines
    across slices, the group, and the caveats; the very sentences this report prints."""
    o = result.options
    group, alpha, dv = o.get("group"), o.get("alpha", 0.05), o.get("dv", "recovery")
    found = dict(findings(result))
    slices = [{"slice": slice_title(u), "headline": unit_headline(result.tables, u, group, alpha, dv),
               "findings": found.get(slice_title(u), [])} for u in _units(result)]
    return {"kind": "analysis", "group": group, "dv": dv, "alpha": alpha, "slices": slices,
            "overall": found.get("Across slices", []), "caveats": list(result.caveats)}


def _shown(name: str, table: pd.DataFrame, group: str | None) -> pd.DataFrame:
    cols = [group if c == "GROUP" else c for c in SHOWN.get(name, list(table.columns))]
    return table[[c for c in cols if c and c in table.columns]]


def slice_tables(result: Analysis) -> list[str]:
    """The per-slice tables to show: the known ones, then any other table with slice columns (e.g. one-sample tests
    per layer or effect sizes, when the analysis computes them), so a new table is shown without a report change."""
    tables = result.tables
    extra = [n for n, t in tables.items() if n not in SLICE_TABLES and n not in NOT_PER_SLICE
             and isinstance(t, pd.DataFrame) and "site_kind" in t.columns]
    return [n for n in SLICE_TABLES if n in tables] + extra


def _units(result: Analysis) -> list[dict[str, Any]]:
    units = result.tables["units"]
    return [{c: u[c] for c in SELECT_COLUMNS if c in u} for u in units.to_dict("records")]


def _model_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(str(k), _plain(v)) for k, v in meta.get("model", {}).items()]
    rows += [("seed", str(meta.get("seed"))), ("created", str(meta.get("created"))),
             ("probes (run.json)", str(meta.get("n_probes")))]
    return rows


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _spec_text(meta: dict[str, Any]) -> str:
    try:
        import yaml

        return yaml.safe_dump(meta.get("spec", {}), sort_keys=False, allow_unicode=True, default_flow_style=False)
    except Exception:  # a spec with objects yaml cannot represent still shows
        return json.dumps(meta.get("spec", {}), indent=2, default=str)


def findings(result: Analysis) -> list[tuple[str, list[str]]]:
    """The findings section: ``(heading, sentences)`` per tested slice, then an overall line per group; built from
    the same tables the report prints (:mod:`analyses.findings`)."""
    o = result.options
    out = [(slice_title(u),
            unit_findings(result.tables, u, o.get("group"), o.get("alpha", 0.05), o.get("dv", "recovery")))
           for u in _units(result)]
    overall = overall_findings(result.tables, o.get("group"), o.get("dv", "recovery"))
    if overall:
        out.append(("Across slices", overall))
    out.append(("Localization: is one group more localized than the other?", _localization_findings(result)))
    return [(h, lines) for h, lines in out if lines]


def _methods(result: Analysis) -> list[str]:
    """The Methods text the analysis wrote (:attr:`Analysis.methods`): it names the reduction, subject unit,
    exclusions, interval and sums-of-squares type, and only the tests that ran, so it cannot claim what was not done."""
    return list(getattr(result, "methods", None) or [])


# ---------------------------------------------------------------------------------------------------- HTML


def study_title(meta: dict) -> str:
    """"<study name> on <model source>" from the run sidecar (either part may be missing)."""
    name = (meta.get("spec") or {}).get("name")
    model = meta.get("model") or {}
    source = model.get("name") or model.get("source") or model.get("architecture")
    return " on ".join(str(part) for part in (name, source) if part) or "results"


def _interactive(result: Analysis) -> str:
    """The layer x position heatmaps of every slice with several positions per probe, as an interactive section."""
    payloads = []
    o = result.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for unit in _units(result):
            rows = slice_rows(result.data, unit)
            if rows.empty or rows.groupby("probe_id")["position"].nunique().max() < 2:
                continue
            title = f"Mean {o.get('dv', 'recovery')} by layer and position ({slice_title(unit)})"
            payload = interactive.heatmap_payload(result.data, o.get("dv", "recovery"), o.get("group"), title=title,
                                                  **unit)
            if payload:
                payloads.append(payload)
    return interactive.render(payloads)


def render_html(result: Analysis) -> str:
    """The report as one HTML string with everything embedded."""
    meta, tables, o = result.meta, result.tables, result.options
    group, alpha = o.get("group"), o.get("alpha", 0.05)
    model = study_title(meta)
    parts = [
        f"<h1>Activation-patching study: {html.escape(str(model))}</h1>",
        f"<p>Results: <code>{html.escape(str(result.results_dir))}</code>. {int(meta.get('n_probes', 0))} probes; "
        f"created {html.escape(str(meta.get('created')))}.</p>",
        "<h2 id=\"caveats\">Caveats</h2>",
    ]
    parts += _html_caveats_and_findings(result)
    validity = tables.get("probe_validity", ())
    parts += [
        "<h2 id=\"model\">Model</h2>", kv_table_html(_model_rows(meta)),
        "<h2 id=\"versions\">Package versions</h2>",
        kv_table_html((k, str(v)) for k, v in meta.get("versions", {}).items()),
        "<h2 id=\"probes\">Probe counts</h2>", html_table(tables["probe_counts"]),
        *(["<h3>Probe validity</h3>", html_table(validity)] if len(validity) else []),
        "<h2 id=\"spec\">Study spec</h2>", f"<pre>{html.escape(_spec_text(meta))}</pre>",
        "<h2 id=\"methods\">Methods</h2>" + list_html(_methods(result)),
    ]
    if len(tables.get("noise_samples", ())):
        parts += ["<h3>Noise draws</h3>", html_table(tables["noise_samples"])]
    if len(tables["trivial_sites"]):
        parts += ["<h3>Sites that recover by construction</h3>", html_table(tables["trivial_sites"])]
    parts.append("<h2 id=\"results\">Results</h2>")
    parts += _html_results(result, group, alpha)
    parts += _localization_html(result, group, alpha)
    shared = [f for f in result.figures if "site_kind" not in f.unit and not _is_localization(f)]
    if shared:
        parts.append("<h2 id=\"figures\">Across site kinds and modules</h2>")
        parts += [_figure(f) for f in shared]
    parts += html_sections(result)  # additivity check, clean-run ablation
    interactive = _interactive(result)
    if interactive:
        parts += ["<h2 id=\"interactive\">Interactive heatmaps</h2>", interactive]
    parts.append(
        f"<h2 id=\"files\">Files</h2><p>Tables (CSV, every column) and figures (PNG, SVG) are in "
        f"<code>{html.escape(str(result.out_dir))}</code>.</p>"
    )
    return html_page(f"clap report: {model}", parts)


def _html_caveats_and_findings(result: Analysis) -> list[str]:
    """The caveats list and the findings section, the first things a reader sees after the title."""
    if result.caveats:
        parts = [list_html(result.caveats, "caveats")]
    else:
        parts = ["<p>None detected.</p>"]
    parts.append("<h2 id=\"findings\">Findings</h2>")
    found = findings(result)
    if not found:
        parts.append("<p>No slice could be tested.</p>")
    for heading, lines in found:
        parts.append(f"<h3>{html.escape(heading)}</h3>" + list_html(lines, "findings"))
    return parts


def _html_results(result: Analysis, group: str | None, alpha: float) -> list[str]:
    """One section per tested slice: its statistics tables, the tests not run and the slice's own figures."""
    tables = result.tables
    units = _units(result)
    parts = [] if units else ["<p>No slice with at least two layers to test.</p>"]
    for i, unit in enumerate(units):
        parts.append(f"<h3 id=\"unit-{i}\">{html.escape(slice_title(unit))}</h3>")
        for name in slice_tables(result):
            part = slice_rows(tables[name], unit)
            if part.empty:
                continue
            parts.append(stat_table_html(TITLES.get(name, name), _shown(name, part, group), alpha))
        skipped = slice_rows(tables["skipped"], unit)
        if len(skipped):
            parts.append("<h4>Not run</h4>" + html_table(skipped[["test", "reason"]]))
        for fig in result.figures:
            if fig.unit and all(unit.get(k) == v for k, v in fig.unit.items()) and "site_kind" in fig.unit:
                parts.append(_figure(fig))
    return parts


# ------------------------------------------------------------------------------------------------ Markdown


def _noise_markdown(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The noise draws table (studies with ``samples`` > 1), after the Methods."""
    if not len(tables.get("noise_samples", ())):
        return []
    return ["", "### Noise draws", "", markdown_table(tables["noise_samples"])]


def render_markdown(result: Analysis) -> str:
    """The report as Markdown; figures are linked relative to the report's folder."""
    meta, tables, o = result.meta, result.tables, result.options
    group = o.get("group")
    model = study_title(meta)
    out = [f"# Activation-patching study: {model}", "",
           f"Results: `{result.results_dir}`. {int(meta.get('n_probes', 0))} probes; "
           f"created {meta.get('created')}.", "",
           "## Caveats", ""]
    out += [f"- {c}" for c in result.caveats] or ["None detected."]
    out += ["", "## Findings", ""]
    found = findings(result)
    for heading, lines in found:
        out += [f"### {heading}", "", *[f"- {x}" for x in lines], ""]
    if not found:
        out += ["No slice could be tested.", ""]
    out += ["", "## Model", "", markdown_table(pd.DataFrame(_model_rows(meta), columns=["field", "value"])),
            "## Package versions", "",
            markdown_table(pd.DataFrame([(k, str(v)) for k, v in meta.get("versions", {}).items()],
                                        columns=["package", "version"])),
            "## Probe counts", "", markdown_table(tables["probe_counts"]),
            *(["### Probe validity", "", markdown_table(tables["probe_validity"])]
              if len(tables.get("probe_validity", ())) else []),
            "## Study spec", "", "```yaml", _spec_text(meta).rstrip(), "```", "",
            "## Methods", ""]
    out += [f"- {m}" for m in _methods(result)] + _noise_markdown(tables)
    if len(tables["trivial_sites"]):
        out += ["", "### Sites that recover by construction", "", markdown_table(tables["trivial_sites"])]
    out += ["", "## Results", ""]
    for unit in _units(result):
        out += [f"### {slice_title(unit)}", ""]
        for name in slice_tables(result):
            part = slice_rows(tables[name], unit)
            if len(part):
                out += [f"#### {TITLES.get(name, name)}", "",
                        *stat_table_markdown(_shown(name, part, group), o.get("alpha", 0.05), TABLE_FILES.get(name))]
        skipped = slice_rows(tables["skipped"], unit)
        if len(skipped):
            out += ["#### Not run", "", markdown_table(skipped[["test", "reason"]])]
        for fig in result.figures:
            if "site_kind" in fig.unit and all(unit.get(k) == v for k, v in fig.unit.items()):
                out += figure_markdown(fig.title, fig.caption, fig.png, result.out_dir)
    out += _localization_markdown(result, group)
    shared = [f for f in result.figures if "site_kind" not in f.unit and not _is_localization(f)]
    if shared:
        out += ["## Across site kinds and modules", ""]
        for fig in shared:
            out += figure_markdown(fig.title, fig.caption, fig.png, result.out_dir)
    out += markdown_sections(result)  # additivity check, clean-run ablation
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- Localization profiles


def _localization_findings(result: Analysis) -> list[str]:
    o = result.options
    return localization_findings(result.tables, o.get("group"), o.get("alpha", 0.05))


def _is_localization(fig: FigureFile) -> bool:
    """Figures of :mod:`analyses.localization_figures` have a section of their own."""
    return fig.name.startswith("localization_")


def localization_display(tables: dict[str, pd.DataFrame], group: str | None) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                          pd.DataFrame]:
    """The three localization tables as shown: group means (``mean [low, high]`` per measure), the group comparison
    (difference with its interval, p-values) and the per-probe measures; slice columns that do not vary are left
    out (the CSV files keep every column)."""
    summary, tests, measures = (tables.get(k, pd.DataFrame()) for k in
                                ("localization_groups", "localization_tests", "localization"))
    source = measures if len(measures) else summary
    keys = [c for c in SELECT_COLUMNS if c in source.columns and (c == "site_kind" or source[c].nunique() > 1)]
    g = [group] if group and len(summary) and group in summary.columns else []
    shown_means = pd.DataFrame()
    if len(summary):
        summary = summary.assign(value=[f"{fmt(r.mean)} {interval(r.ci_low, r.ci_high)}"
                                        for r in summary.itertuples()])
        shown_means = summary.pivot_table(index=[*keys, *g], columns="measure", values="value", aggfunc="first")
        counts = summary.groupby([*keys, *g])["n"].max().rename("n")
        shown_means = pd.concat([counts, shown_means[[m for m in MEASURES if m in shown_means.columns]]], axis=1)
        shown_means = shown_means.reset_index()
    shown_tests = pd.DataFrame()
    if len(tests):
        shown_tests = tests.assign(interval=[interval(r.ci_low, r.ci_high) for r in tests.itertuples()])
        shown_tests = shown_tests[[*keys, "measure", "A", "B", "diff", "interval", "p_perm", "p_perm_holm",
                                   "hl_shift", "p_mwu_holm", "more_localized"]]
    shown_probes = pd.DataFrame()
    if len(measures):
        subject = measures.columns[0]
        shown_probes = measures[[*keys, subject, *g, "eff_layers_pr", "eff_layers_entropy", "peak_layer",
                                 "peak_share", "window_start", "window_end", "centre_of_mass", "negative_share"]]
    return shown_means, shown_tests, shown_probes


#: The first lines of the report's localization section.
LOCALIZATION_INTRO = ("Per probe, one contribution per layer (attention and MLP outputs, heads summed per layer, the "
                      "residual stream converted to layer-to-layer increments; see Methods); fewer effective layers, "
                      "a larger peak share and a narrower window mean more localized. Centre of mass and peak in "
                      "relative depth (layer / n_layers).")


def _localization_html(result: Analysis, group: str | None, alpha: float) -> list[str]:
    """The section of the localization profiles: group means, the comparison (rows with Holm-corrected permutation
    p < alpha bold; folded when long), the per-probe measures (folded) and the two figures per slice."""
    means, tests, probes = localization_display(result.tables, group)
    if not len(probes):
        return []
    parts = ["<h2 id=\"localization\">Localization profiles</h2>", f"<p>{html.escape(LOCALIZATION_INTRO)}</p>",
             "<h4>Localization measures: mean [95 % t interval] per group</h4>", html_table(means)]
    if len(tests):
        p = tests["p_perm_holm"].astype(float)
        table = html_table(tests, alpha, p)
        title = "<h4>Group comparison (Welch interval of the difference; permutation and Mann-Whitney, Holm)</h4>"
        if len(tests) > FOLD_ROWS:
            table = folded(table, f"{len(tests)} rows ({int((p < alpha).sum())} with p_perm_holm &lt; {alpha}; bold)",
                           is_open=True)
        parts += [title, table]
    parts.append("<h4>Per probe</h4>" + folded(html_table(probes), f"{len(probes)} profiles"))
    parts += [_figure(f) for f in result.figures if _is_localization(f)]
    return parts


def _localization_markdown(result: Analysis, group: str | None) -> list[str]:
    """The Markdown twin of :func:`_localization_html`."""
    means, tests, probes = localization_display(result.tables, group)
    if not len(probes):
        return []
    out = ["## Localization profiles", "", LOCALIZATION_INTRO, "",
           "#### Localization measures: mean [95 % t interval] per group", "", markdown_table(means)]
    if len(tests):
        out += ["#### Group comparison (Welch interval of the difference; permutation and Mann-Whitney, Holm)", "",
                markdown_table(tests)]
    out += ["#### Per probe", "", markdown_table(probes)]
    for fig in result.figures:
        if _is_localization(fig):
            out += figure_markdown(fig.title, fig.caption, fig.png, result.out_dir)
    return out


def _figure(fig: FigureFile) -> str:
    return figure_html(fig.name, fig.title, fig.caption, fig.png)
