"""The study-level report of ``clap run``: one page that links each model's report and each comparison, gives their
headline findings, and states the caveats that concern the study's design rather than one model's statistics.

The findings are the sentences the per-model reports and the comparisons already wrote (their ``findings.json``,
:func:`analyses.report.findings_record`, :func:`analyses.compare.findings_record`), shown unchanged: this page
derives no number of its own.

Why a page of its own: ``analyses/report.py`` describes one results directory. Whether a study patched sites that
reproduce the clean run by construction, or modules whose names mislead (GPT-2's ``Conv1D``), is a property of the
design, visible across models, and a reader of the study should meet it first. The checks themselves are analyses
(:func:`analyses.caveats.design_caveats`), as are the causal trace's peaks (:mod:`analyses.trace`) and every number,
table and style on the page (:mod:`analyses.formatting`); this module only gathers a study's folders into one page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.additivity import TABLE_FILES as ADDITIVITY_FILES
from analyses.additivity import gap_display
from analyses.caveats import design_caveats
from analyses.formatting import html_page, html_table, inline_html, markdown_table, relative_link
from analyses.io import load_results
from analyses.localization import TABLE_FILES as LOCALIZATION_FILES
from analyses.report import localization_display
from analyses.trace import GROUPS_FIGURE, TABLE_FILE, trace_peaks, trace_sentence
from clap.contract import atomic_write_text, has_results


def _trace(results: Path) -> dict[str, Any] | None:
    """A model's causal-trace outputs, when its stage wrote them."""
    table = results / TABLE_FILE
    if not table.is_file():
        return None
    figure = results / GROUPS_FIGURE
    return {"peaks": trace_peaks(pd.read_csv(table)), "table": table, "figure": figure if figure.is_file() else None}


def read_findings(folder: Path) -> dict[str, Any] | None:
    """The ``findings.json`` a report or comparison wrote into ``folder``, or None (not analysed, unreadable)."""
    path = folder / "findings.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def headline(record: dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """``(slice, sentences)`` of a findings record's headline, then the lines across slices."""
    if not record:
        return []
    out = [(str(s.get("slice", "")), [str(x) for x in s.get("headline") or []]) for s in record.get("slices") or []]
    if record.get("overall"):
        out.append(("Across slices", [str(x) for x in record["overall"]]))
    return [(h, lines) for h, lines in out if lines]


#: the localization measures the study report shows per model (each model's report has all of them and the tests)
LOCALIZATION_SHOWN = ("eff_layers_pr", "peak_share", "window_width", "centre_of_mass", "negative_share")
LOCALIZATION_WORDS = ("Localization profiles per model, site kind and group: mean [95 % t interval] over probes of "
                      "the effective number of layers (participation ratio), the peak's share, the narrowest window "
                      "holding 80 % of |contribution| (layers), the centre of mass (relative depth) and the negative "
                      "share; the residual stream as layer-to-layer increments. The group comparison is in each "
                      "model's report.")


def _analysis_table(results: Path, name: str) -> pd.DataFrame | None:
    """One of a run's analysis tables (``<results>/analysis/<name>``), or None when it is missing or empty."""
    path = results / "analysis" / name
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    return None if table.empty else table


def _localization(results: Path) -> pd.DataFrame | None:
    """A run's localization measures per slice and group (``mean [low, high]``), from its analysis' own table."""
    table = _analysis_table(results, LOCALIZATION_FILES["localization_groups"])
    if table is None:
        return None
    group = table.columns[0] if table.columns[0] != "measure" else None
    means = localization_display({"localization_groups": table}, group)[0]
    return means[[c for c in means.columns if c not in set(table["measure"]) - set(LOCALIZATION_SHOWN)]]


CROSS_DOMAIN_WORDS = ("The localization analysis repeated within each domain (the probes' domain label), groups "
                      "compared there: A vs B as mean per group, the difference A - B with its 95 % Welch interval and "
                      "the permutation p Holm-corrected across the measures of the domain and site kind; the "
                      "additivity gap (joint - sum of single layers) of every layer patched together, per group; the "
                      "verdict from the concentration measures (effective layers, peak share, 80 % window). Every "
                      "number is in the linked cross_domain.csv.")


def _cross_domain(results: Path) -> dict[str, Any] | None:
    """A run's cross-domain table as shown (:func:`analyses.domains.display`), from its analysis' own CSV."""
    from analyses.domains import CROSS_DOMAIN_FILE, display

    table = _analysis_table(results, CROSS_DOMAIN_FILE)
    if table is None:
        return None
    contrast, composed = display(table)
    return {"file": results / "analysis" / CROSS_DOMAIN_FILE, "contrast": contrast, "composed": composed,
            "label": str(table["domain_label"].iloc[0])}


ADDITIVITY_WORDS = ("Additivity per model: the gap between patching each probe's top-m layers (by single-layer "
                    "recovery) together and the sum of their single-layer recoveries, and the mean gap over pairs "
                    "among its top 5 layers; mean [95 % t interval] over probes (0: the layers add up; below 0: "
                    "they overlap; above 0: synergy). The cumulative stacks and every table are in each model's "
                    "report.")


def _additivity(results: Path) -> pd.DataFrame | None:
    """A run's additivity gaps (top-m sets and pairs) per site kind and group, from its analysis' own table."""
    table = _analysis_table(results, ADDITIVITY_FILES["gaps"])
    shown = gap_display(table) if table is not None else None
    return shown if shown is not None and len(shown) else None


def _run_entry(name: str, source: str, results: Path) -> dict[str, Any] | None:
    """One patching run (a model's, or a cross-model one) as the report lists it; None while it has no results."""
    if not has_results(results):
        return None
    frame, meta = load_results(results)
    report = results / "analysis" / "report.html"
    found = read_findings(results / "analysis")
    design = [c for c in (found or {}).get("caveats") or [] if str(c).startswith("Design:")]
    return {
        "findings": headline(found), "group": (found or {}).get("group"),
        "name": name, "source": source, "architecture": (meta.get("model") or {}).get("architecture", ""),
        "probes": int(frame["probe_id"].nunique()), "sites": int(frame["site"].nunique()), "rows": len(frame),
        "results": results, "report": report if report.is_file() else None,
        "caveats": design_caveats(frame, meta) + design, "trace": _trace(results),
        "localization": _localization(results), "additivity": _additivity(results),
        "cross_domain": _cross_domain(results),
        "samples": ((meta.get("noise") or {}).get("samples")),
    }


def write_study_report(study: Any, out: Path, stages: Sequence[Any]) -> list[Path]:
    """Write ``<out>/report.html`` and ``<out>/report.md``; return their paths."""

    runs = [(name, "fine-tuned by the finetune stage" if entry.finetuned else str(entry.source), out / "models" / name)
            for name, entry in study.model_entries().items()]
    runs += [(f"cross:{name}", f"{section.source} activations patched into {section.target}", out / "cross" / name)
             for name, section in study.cross_runs().items()]
    models = [entry for entry in (_run_entry(*run) for run in runs) if entry is not None]
    comparisons = []
    for a, b in study.comparisons():
        folder = out / "compare" / f"{a}-vs-{b}"
        page = folder / "compare.html"
        found = read_findings(folder)
        comparisons.append({"pair": f"{b} - {a}", "page": page if page.is_file() else None, "folder": folder,
                            "findings": headline(found), "group": (found or {}).get("group")})
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))["stages"] if record_path.is_file() else {}
    stage_rows = [(s.name, s.hash[:12], (record.get(s.name) or {}).get("seconds")) for s in stages]
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, _html(study, out, models, comparisons, stage_rows))
    atomic_write_text(md_path, _markdown(study, out, models, comparisons, stage_rows))
    return [html_path, md_path]


def _markdown_model_tables(models: list[dict], key: str, title: str, words: str) -> list[str]:
    """A section with one table per model under ``key`` (none when no model has one): the Markdown twin of
    :func:`_html_model_tables`."""
    shown = [m for m in models if m.get(key) is not None]
    if not shown:
        return []
    lines = ["", f"## {title}", "", words]
    for m in shown:
        lines += ["", f"### {m['name']}", "", markdown_table(m[key])]
    return lines


def _localization_markdown(models: list[dict]) -> list[str]:
    """The study report's localization and additivity sections (none for what was not analysed)."""
    return (_markdown_model_tables(models, "localization", "Localization profiles", LOCALIZATION_WORDS)
            + _markdown_model_tables(models, "additivity", "Additivity", ADDITIVITY_WORDS))


def _cross_domain_markdown(models: list[dict], out: Path) -> list[str]:
    """The study report's cross-domain section: each model's contrast per domain and site kind, and where composed
    probes sit relative to their parts (none without a domain label)."""
    lines = []
    for m in [m for m in models if m.get("cross_domain")]:
        cd = m["cross_domain"]
        lines += ["", f"## Across domains: {m['name']} (`{cd['label']}`)", "", CROSS_DOMAIN_WORDS, "",
                  markdown_table(cd["contrast"])]
        if len(cd["composed"]):
            lines += ["", "Composed probes vs their one-hop parts (paired; difference composed - part):", "",
                      markdown_table(cd["composed"])]
        lines += ["", f"Full table: [{cd['file'].name}]({relative_link(cd['file'], out)})"]
    return lines


def _markdown(study: Any, out: Path, models: list[dict], comparisons: list[dict], stages: list[tuple]) -> str:
    lines = [f"# Study: {study.name}", "", "## Models", "",
             "| model | source | architecture | probes | sites | rows | report |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        link = f"[report]({relative_link(m['report'], out)})" if m["report"] else "not analysed"
        lines.append(f"| {m['name']} | {m['source']} | {m['architecture']} | {m['probes']} | {m['sites']} | "
                     f"{m['rows']} | {link} |")
    if comparisons:
        lines += ["", "## Comparisons", ""]
        for c in comparisons:
            page = f"[compare.html]({relative_link(c['page'], out)})" if c["page"] else "not run"
            lines.append(f"- {c['pair']}: {page}")
    lines += _markdown_findings(models, comparisons)
    for m in models:
        if m.get("trace"):
            lines += ["", f"## Causal trace: {m['name']}", "", trace_sentence(m["samples"] or 1), ""]
            if m["trace"]["figure"]:
                lines += [f"![causal trace of {m['name']}]({relative_link(m['trace']['figure'], out)})", ""]
            lines += [markdown_table(m["trace"]["peaks"]), "",
                      f"Full table: [{m['trace']['table'].name}]({relative_link(m['trace']['table'], out)})"]
    lines += _localization_markdown(models)
    lines += _cross_domain_markdown(models, out)
    lines += ["", "## Design caveats", ""]
    any_caveat = False
    for m in models:
        for caveat in m["caveats"]:
            lines.append(f"- **{m['name']}**: {caveat}")
            any_caveat = True
    if not any_caveat:
        lines.append("None found.")
    lines += ["", "## Stages", "", "| stage | input hash | seconds |", "|---|---|---|"]
    lines += [f"| {name} | `{h}` | {'' if s is None else f'{s:.1f}'} |" for name, h, s in stages]
    return "\n".join(lines) + "\n"


def _findings_blocks(models: list[dict], comparisons: list[dict]) -> list[tuple[str, str | None, list]]:
    """(title, group, [(slice, sentences)]) for each model and comparison with findings."""
    blocks = [(f"Model {m['name']}", m.get("group"), m["findings"]) for m in models if m.get("findings")]
    blocks += [(f"Comparison {c['pair']}", c.get("group"), c["findings"]) for c in comparisons if c.get("findings")]
    return blocks


def _markdown_findings(models: list[dict], comparisons: list[dict]) -> list[str]:
    blocks = _findings_blocks(models, comparisons)
    if not blocks:
        return []
    lines = ["", "## Headline findings", "",
             "From each report's own findings (its tables; see the linked reports for every slice's detail)."]
    for title, group, found in blocks:
        lines += ["", f"### {title}" + (f" (groups: `{group}`)" if group else ""), ""]
        for heading, sentences in found:
            lines += [f"- **{heading}**: " + " ".join(sentences)]
    return lines


def _html_findings(models: list[dict], comparisons: list[dict]) -> list[str]:
    e = html.escape
    blocks = _findings_blocks(models, comparisons)
    if not blocks:
        return []
    parts = ["<h2>Headline findings</h2><p>From each report's own findings (its tables; the linked reports give "
             "every slice's detail).</p>"]
    for title, group, found in blocks:
        parts.append(f"<h3>{e(title)}" + (f" (groups: <code>{e(group)}</code>)" if group else "") + "</h3><ul>")
        parts += [f"<li><b>{e(heading)}</b>: {inline_html(' '.join(sentences))}</li>" for heading, sentences in found]
        parts.append("</ul>")
    return parts


def _cross_domain_html(models: list[dict], out: Path) -> list[str]:
    """The HTML twin of :func:`_cross_domain_markdown`."""
    e = html.escape
    parts = []
    for m in [m for m in models if m.get("cross_domain")]:
        cd = m["cross_domain"]
        parts.append(f"<h2>Across domains: {e(m['name'])} (<code>{e(cd['label'])}</code>)</h2>"
                     f"<p>{e(CROSS_DOMAIN_WORDS)}</p>" + html_table(cd["contrast"]))
        if len(cd["composed"]):
            parts.append("<p>Composed probes vs their one-hop parts (paired; difference composed - part):</p>"
                         + html_table(cd["composed"]))
        parts.append(f"<p>Full table: <a href='{e(relative_link(cd['file'], out))}'>{e(cd['file'].name)}</a></p>")
    return parts
def _html_model_tables(models: list[dict], key: str, title: str, words: str) -> list[str]:
    """A section with one table per model under ``key`` (none when no model has one)."""
    shown = [m for m in models if m.get(key) is not None]
    if not shown:
        return []
    return [f"<h2>{html.escape(title)}</h2><p>{html.escape(words)}</p>"] + [
        f"<h3>{html.escape(m['name'])}</h3>" + html_table(m[key]) for m in shown]


def _html(study: Any, out: Path, models: list[dict], comparisons: list[dict], stages: list[tuple]) -> str:
    e = html.escape
    parts = [f"<h1>Study: {e(study.name)}</h1>"]
    caveats = [(m["name"], c) for m in models for c in m["caveats"]]
    parts.append("<h2>Design caveats</h2><div class='caveats'><ul>"
                 + ("".join(f"<li><b>{e(n)}</b>: {inline_html(c)}</li>" for n, c in caveats) or "<li>None found.</li>")
                 + "</ul></div>")
    parts += _html_findings(models, comparisons)
    parts.append("<h2>Models</h2><table><tr><th>model</th><th>source</th><th>architecture</th><th>probes</th>"
                 "<th>sites</th><th>rows</th><th>report</th></tr>")
    for m in models:
        link = f"<a href='{e(relative_link(m['report'], out))}'>report</a>" if m["report"] else "not analysed"
        parts.append(f"<tr><td>{e(m['name'])}</td><td>{e(m['source'])}</td><td>{e(str(m['architecture']))}</td>"
                     f"<td>{m['probes']}</td><td>{m['sites']}</td><td>{m['rows']}</td><td>{link}</td></tr>")
    parts.append("</table>")
    for m in models:
        if m.get("trace"):
            words = trace_sentence(m["samples"] or 1)
            parts.append(f"<h2>Causal trace: {e(m['name'])}</h2><p>{e(words)}</p>")
            if m["trace"]["figure"]:
                figure = relative_link(m["trace"]["figure"], out)
                parts.append(f"<img src='{e(figure)}' alt='causal trace of {e(m['name'])}' style='max-width:100%'>")
            parts.append(html_table(m["trace"]["peaks"]))
            parts.append(f"<p>Full table: <a href='{e(relative_link(m['trace']['table'], out))}'>"
                         f"{e(m['trace']['table'].name)}</a></p>")
    parts += _html_model_tables(models, "localization", "Localization profiles", LOCALIZATION_WORDS)
    parts += _html_model_tables(models, "additivity", "Additivity", ADDITIVITY_WORDS)
    parts += _cross_domain_html(models, out)
    if comparisons:
        parts.append("<h2>Comparisons</h2><ul>")
        for c in comparisons:
            link = f"<a href='{e(relative_link(c['page'], out))}'>compare.html</a>" if c["page"] else "not run"
            parts.append(f"<li>{e(c['pair'])}: {link}</li>")
        parts.append("</ul>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>input hash</th><th>seconds</th></tr>")
    for name, h, s in stages:
        parts.append(f"<tr><td>{e(name)}</td><td><code>{h}</code></td><td>{'' if s is None else f'{s:.1f}'}</td></tr>")
    parts.append("</table>")
    return html_page(study.name, parts)
