"""``clap report``: one self-contained HTML page (and a Markdown twin) that states what a study found.

The HTML embeds its figures as base64 ``data:`` URIs and its style inline, so the single file can be mailed,
archived or attached to a paper's supplement and still show everything. The Markdown version links the PNG files
written by :func:`analyses.pipeline.analyze` beside it (relative paths), for repositories and wikis.

Both give: the caveats first, then the study spec, model identity, package versions and seed, probe counts, the
methods (selection and aggregation rules, corrections), and per tested slice the repeated-measures ANOVA,
Friedman test, mixed ANOVA, post-hoc tables and the figures.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.figures import COLUMN_WIDTH_IN
from analyses.formatting import fmt as _fmt
from analyses.formatting import html_table as _html_table
from analyses.formatting import markdown_table, row_p_values
from analyses.pipeline import TABLE_FILES, Analysis, FigureFile, analyze
from analyses.select import SELECT_COLUMNS
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

#: Post-hoc tables longer than this are folded (HTML) so the page stays readable; all rows remain in it.
FOLD_ROWS = 12

#: Figures are shown at the width they were drawn at (:data:`analyses.figures.COLUMN_WIDTH_IN`), so 9 pt stays 9 pt.
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;
color:#1a1a1a;line-height:1.45;background:#fff}
h1{font-size:1.7rem;border-bottom:2px solid #2166ac;padding-bottom:.3rem}
h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #ccc}
h3{font-size:1.1rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .5rem;text-align:right}
th{background:#f0f4f8}
td:first-child,th:first-child{text-align:left}
tr.sig td{font-weight:600}
.caveats{background:#fff8e6;border-left:4px solid #b35806;padding:.5rem 1rem}
.caveats li{margin:.4rem 0}
pre{background:#f6f8fa;padding:.75rem;overflow-x:auto;font-size:.8rem}
figure{margin:1rem 0}
figure img{width:FIGWIDTHin;max-width:100%;height:auto;border:1px solid #eee}
.findings li{margin:.3rem 0}
figcaption{font-size:.85rem;color:#444}
.meta td:first-child{font-weight:600}
""".replace("FIGWIDTH", str(COLUMN_WIDTH_IN))


@dataclass
class ReportFiles:
    """The files :func:`write_report` wrote."""

    html: Path
    markdown: Path
    analysis: Analysis


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, **options: Any) -> ReportFiles:
    """Run :func:`analyses.pipeline.analyze` (``options`` go to it) and write ``report.html`` and ``report.md``
    into its output folder (default ``RESULTS_DIR/analysis``).

    The HTML report is self-contained (figures embedded); the Markdown one links the figures relative to its folder.

    Parameters
    ----------
    results_dir : str or Path
        A folder written by ``clap patch``.
    out_dir : str or Path, optional
        The analysis folder; default ``RESULTS_DIR/analysis``.
    **options
        Keywords of :func:`analyses.pipeline.analyze` (``group``, ``metrics``, ``figures``, ``n_boot``, ...).

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
    ...     files = write_report(run, Path(tmp) / "report", figures=False, n_boot=200)
    ...     written = sorted(p.name for p in files.html.parent.glob("report.*"))
    ...     title = "<html" in files.html.read_text(encoding="utf-8").lower()
    >>> written, title
    (['report.html', 'report.md'], True)
    """
    result = analyze(results_dir, out_dir, **options)
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
    from analyses.findings import unit_headline

    o = result.options
    group, alpha, dv = o.get("group"), o.get("alpha", 0.05), o.get("dv", "recovery")
    found = dict(findings(result))
    slices = [{"slice": _unit_title(u), "headline": unit_headline(result.tables, u, group, alpha, dv),
               "findings": found.get(_unit_title(u), [])} for u in _units(result)]
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


def _in_unit(table: pd.DataFrame, unit: dict[str, Any]) -> pd.DataFrame:
    if table.empty:
        return table
    mask = pd.Series(True, index=table.index)
    for k, v in unit.items():
        if k in table.columns:
            mask &= table[k] == v
    return table[mask]


def _unit_title(unit: dict[str, Any]) -> str:
    return " · ".join(f"{k} {v}" for k, v in unit.items())


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
    from analyses.findings import overall_findings, unit_findings

    o = result.options
    out = [(_unit_title(u),
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


def _html_stat_table(name: str, shown: pd.DataFrame, alpha: float) -> str:
    """One statistics table under its title; long ones folded with a summary that counts only real p-values."""
    p, label = row_p_values(shown)
    table_html = _html_table(shown, alpha if p is not None else None, p)
    title = f"<h4>{html.escape(TITLES.get(name, name))}</h4>"
    if len(shown) <= FOLD_ROWS:
        return title + table_html
    summary = f"{len(shown)} rows"
    if p is not None:
        summary += f" ({int((p < alpha).sum())} with {html.escape(label)} &lt; {alpha}; bold)"
    return f"{title}<details><summary>{summary}</summary>{table_html}</details>"


def _html_kv(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"meta\"><tbody>{body}</tbody></table>"


def _html_figure(fig: FigureFile) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (
        f"<figure id=\"fig-{html.escape(fig.name)}\"><img alt=\"{html.escape(fig.title)}\" "
        f"src=\"data:image/png;base64,{data}\"><figcaption><b>{html.escape(fig.title)}.</b> "
        f"{html.escape(fig.caption)}</figcaption></figure>"
    )


def _md_inline(text: str) -> str:
    """The caveat and method sentences use `code` spans; show them as <code> in HTML."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def study_title(meta: dict) -> str:
    """"<study name> on <model source>" from the run sidecar (either part may be missing)."""
    name = (meta.get("spec") or {}).get("name")
    model = meta.get("model") or {}
    source = model.get("name") or model.get("source") or model.get("architecture")
    return " on ".join(str(part) for part in (name, source) if part) or "results"


def _interactive(result: Analysis) -> str:
    """The layer x position heatmaps of every slice with several positions per probe, as an interactive section."""
    import warnings

    from analyses import interactive
    from analyses.select import AnalysisWarning

    payloads = []
    o = result.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        for unit in _units(result):
            rows = _in_unit(result.data, unit)
            if rows.empty or rows.groupby("probe_id")["position"].nunique().max() < 2:
                continue
            title = f"Mean {o.get('dv', 'recovery')} by layer and position ({_unit_title(unit)})"
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
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>clap report: {html.escape(str(model))}</title><style>{CSS}</style></head><body>",
        f"<h1>Activation-patching study: {html.escape(str(model))}</h1>",
        f"<p>Results: <code>{html.escape(str(result.results_dir))}</code>. {int(meta.get('n_probes', 0))} probes; "
        f"created {html.escape(str(meta.get('created')))}.</p>",
        "<h2 id=\"caveats\">Caveats</h2>",
    ]
    parts += _html_caveats_and_findings(result)
    validity = tables.get("probe_validity", ())
    parts += [
        "<h2 id=\"model\">Model</h2>", _html_kv(_model_rows(meta)),
        "<h2 id=\"versions\">Package versions</h2>",
        _html_kv((k, str(v)) for k, v in meta.get("versions", {}).items()),
        "<h2 id=\"probes\">Probe counts</h2>", _html_table(tables["probe_counts"]),
        *(["<h3>Probe validity</h3>", _html_table(validity)] if len(validity) else []),
        "<h2 id=\"spec\">Study spec</h2>", f"<pre>{html.escape(_spec_text(meta))}</pre>",
        "<h2 id=\"methods\">Methods</h2><ul>" + "".join(f"<li>{_md_inline(m)}</li>" for m in _methods(result))
        + "</ul>",
    ]
    if len(tables.get("noise_samples", ())):
        parts += ["<h3>Noise draws</h3>", _html_table(tables["noise_samples"])]
    if len(tables["trivial_sites"]):
        parts += ["<h3>Sites that recover by construction</h3>", _html_table(tables["trivial_sites"])]
    parts.append("<h2 id=\"results\">Results</h2>")
    parts += _html_results(result, group, alpha)
    parts += _localization_html(result, group, alpha)
    shared = [f for f in result.figures if "site_kind" not in f.unit and not _is_localization(f)]
    if shared:
        parts.append("<h2 id=\"figures\">Across site kinds and modules</h2>")
        parts += [_html_figure(f) for f in shared]
    from analyses.derived import html_sections

    parts += html_sections(result)  # additivity check, clean-run ablation
    interactive = _interactive(result)
    if interactive:
        parts += ["<h2 id=\"interactive\">Interactive heatmaps</h2>", interactive]
    parts.append(
        f"<h2 id=\"files\">Files</h2><p>Tables (CSV, every column) and figures (PNG, SVG) are in "
        f"<code>{html.escape(str(result.out_dir))}</code>.</p></body></html>"
    )
    return "\n".join(parts)


def _html_caveats_and_findings(result: Analysis) -> list[str]:
    """The caveats list and the findings section, the first things a reader sees after the title."""
    if result.caveats:
        parts = ["<ul class=\"caveats\">" + "".join(f"<li>{_md_inline(c)}</li>" for c in result.caveats) + "</ul>"]
    else:
        parts = ["<p>None detected.</p>"]
    parts.append("<h2 id=\"findings\">Findings</h2>")
    found = findings(result)
    if not found:
        parts.append("<p>No slice could be tested.</p>")
    for heading, lines in found:
        parts.append(f"<h3>{html.escape(heading)}</h3><ul class=\"findings\">"
                     + "".join(f"<li>{_md_inline(x)}</li>" for x in lines) + "</ul>")
    return parts


def _html_results(result: Analysis, group: str | None, alpha: float) -> list[str]:
    """One section per tested slice: its statistics tables, the tests not run and the slice's own figures."""
    tables = result.tables
    units = _units(result)
    parts = [] if units else ["<p>No slice with at least two layers to test.</p>"]
    for i, unit in enumerate(units):
        parts.append(f"<h3 id=\"unit-{i}\">{html.escape(_unit_title(unit))}</h3>")
        for name in slice_tables(result):
            part = _in_unit(tables[name], unit)
            if part.empty:
                continue
            parts.append(_html_stat_table(name, _shown(name, part, group), alpha))
        skipped = _in_unit(tables["skipped"], unit)
        if len(skipped):
            parts.append("<h4>Not run</h4>" + _html_table(skipped[["test", "reason"]]))
        for fig in result.figures:
            if fig.unit and all(unit.get(k) == v for k, v in fig.unit.items()) and "site_kind" in fig.unit:
                parts.append(_html_figure(fig))
    return parts


# ------------------------------------------------------------------------------------------------ Markdown


def _markdown_stat_table(name: str, shown: pd.DataFrame, alpha: float) -> list[str]:
    """A statistics table; a test table longer than :data:`FOLD_ROWS` is folded as the HTML folds it: the row
    count, how many rows are significant, the :data:`FOLD_ROWS` rows with the smallest p-values, and a link to the
    CSV beside the report that holds every row (a pairs-of-layers table of 30 layers has 435 rows per slice)."""
    p, label = row_p_values(shown)
    if len(shown) <= FOLD_ROWS or p is None:  # descriptive tables (one row per layer and group) stay whole
        return [markdown_table(shown)]
    csv = TABLE_FILES.get(name)
    where = f"[{csv}]({csv})" if csv else "the CSV tables"
    hits = int((p < alpha).sum())
    order = p.sort_values(kind="stable", na_position="last").index[:FOLD_ROWS]
    top = shown.loc[order]
    return [f"{len(shown)} rows, {hits} with {label} < {alpha}; the {len(top)} with the smallest {label} are shown, "
            f"every row is in {where} (filter by this slice's columns).", "", markdown_table(top)]


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
        out += [f"### {_unit_title(unit)}", ""]
        for name in slice_tables(result):
            part = _in_unit(tables[name], unit)
            if len(part):
                out += [f"#### {TITLES.get(name, name)}", "",
                        *_markdown_stat_table(name, _shown(name, part, group), o.get("alpha", 0.05))]
        skipped = _in_unit(tables["skipped"], unit)
        if len(skipped):
            out += ["#### Not run", "", markdown_table(skipped[["test", "reason"]])]
        for fig in result.figures:
            if "site_kind" in fig.unit and all(unit.get(k) == v for k, v in fig.unit.items()):
                out += [f"![{fig.title}]({_rel(fig.png, result.out_dir)})", "", f"*{fig.title}.* {fig.caption}", ""]
    out += _localization_markdown(result, group)
    shared = [f for f in result.figures if "site_kind" not in f.unit and not _is_localization(f)]
    if shared:
        out += ["## Across site kinds and modules", ""]
        for fig in shared:
            out += [f"![{fig.title}]({_rel(fig.png, result.out_dir)})", "", f"*{fig.title}.* {fig.caption}", ""]
    from analyses.derived import markdown_sections

    out += markdown_sections(result)  # additivity check, clean-run ablation
    return "\n".join(out) + "\n"


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


# ------------------------------------------------------------------------------------- Localization profiles


def _localization_findings(result: Analysis) -> list[str]:
    from analyses.findings import localization_findings

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
    from analyses.localization import MEASURES

    summary, tests, measures = (tables.get(k, pd.DataFrame()) for k in
                                ("localization_groups", "localization_tests", "localization"))
    source = measures if len(measures) else summary
    keys = [c for c in SELECT_COLUMNS if c in source.columns and (c == "site_kind" or source[c].nunique() > 1)]
    g = [group] if group and len(summary) and group in summary.columns else []
    shown_means = pd.DataFrame()
    if len(summary):
        summary = summary.assign(value=[f"{_fmt(r.mean)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
                                        for r in summary.itertuples()])
        shown_means = summary.pivot_table(index=[*keys, *g], columns="measure", values="value", aggfunc="first")
        counts = summary.groupby([*keys, *g])["n"].max().rename("n")
        shown_means = pd.concat([counts, shown_means[[m for m in MEASURES if m in shown_means.columns]]], axis=1)
        shown_means = shown_means.reset_index()
    shown_tests = pd.DataFrame()
    if len(tests):
        shown_tests = tests.assign(interval=[f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" for r in tests.itertuples()])
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
             "<h4>Localization measures: mean [95 % t interval] per group</h4>", _html_table(means)]
    if len(tests):
        p = tests["p_perm_holm"].astype(float)
        table = _html_table(tests, alpha, p)
        title = "<h4>Group comparison (Welch interval of the difference; permutation and Mann-Whitney, Holm)</h4>"
        if len(tests) > FOLD_ROWS:
            table = (f"<details open><summary>{len(tests)} rows ({int((p < alpha).sum())} with p_perm_holm &lt; "
                     f"{alpha}; bold)</summary>{table}</details>")
        parts += [title, table]
    parts.append(f"<h4>Per probe</h4><details><summary>{len(probes)} profiles</summary>{_html_table(probes)}"
                 "</details>")
    parts += [_html_figure(f) for f in result.figures if _is_localization(f)]
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
            out += [f"![{fig.title}]({_rel(fig.png, result.out_dir)})", "", f"*{fig.title}.* {fig.caption}", ""]
    return out
