"""Numbers, tables and pages for people: the one place where a value becomes text.

Every report clap writes (a model's analysis, a comparison, the derived runs' sections, the causal trace's section
and ``clap run``'s study page) formats its numbers with :func:`fmt`, renders its tables with :func:`html_table` /
:func:`markdown_table` (statistics tables with :func:`stat_table_html` / :func:`stat_table_markdown`, which fold
long ones the same way in both), embeds figures with :func:`figure_html` / :func:`figure_markdown` and styles its
HTML with :data:`CSS` (:func:`html_page`), so the same number reads the same everywhere and a change of style is
made once.

Slices are named here too: :func:`slice_title` (headings: ``metric logit_diff · site_kind mlp_out``),
:func:`selection_words` (figure titles: ``metric=logit_diff, site_kind=mlp_out``) and :func:`slug` (file names).
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.figures import COLUMN_WIDTH_IN

#: Statistics tables longer than this are folded (HTML: a closed ``<details>``; Markdown: the rows with the smallest
#: p-values and a link to the CSV), so a page stays readable; the CSV files keep every row.
FOLD_ROWS = 12

#: The style of every HTML page clap writes. Figures are shown at the width they were drawn at
#: (:data:`analyses.figures.COLUMN_WIDTH_IN`), so 9 pt in a figure stays 9 pt on the page.
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


# ------------------------------------------------------------------------------------------------- numbers


def fmt(value: Any) -> str:
    """Numbers for humans: small p-values in scientific notation, others to 3-4 significant digits.

    >>> [fmt(v) for v in (3.95e-4, 0.12345, 12, 2.0, 1234.5, float("nan"), None, True)]
    ['3.95e-04', '0.123', '12', '2', '1234', '–', '–', 'yes']
    """
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if np.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e6:
            return f"{int(v)}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
        if abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}"
    return str(value)


def interval(low: Any, high: Any) -> str:
    """``[low, high]`` in :func:`fmt`'s numbers."""
    return f"[{fmt(low)}, {fmt(high)}]"


def row_p_values(table: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The p-value that decides each row, and a label for it; ``(None, "")`` for a table without p-values.

    Post-hoc tables: the corrected ``p_corr``. ANOVA tables: the Greenhouse-Geisser ``p_GG_corr`` where the row has
    one, else ``p_unc`` (the between-groups row of a mixed ANOVA needs no sphericity correction, so its corrected
    column is empty by design and must not hide its result). Other tables: ``p_unc``.
    """
    if "p_corr" in table.columns:
        return table["p_corr"].astype(float), "p_corr"
    if "p_GG_corr" in table.columns and "p_unc" in table.columns:
        gg = table["p_GG_corr"].astype(float)
        label = "p_GG_corr" if gg.notna().all() else "p_GG_corr (p_unc where not corrected)"
        return gg.fillna(table["p_unc"].astype(float)), label
    if "p_unc" in table.columns:
        return table["p_unc"].astype(float), "p_unc"
    return None, ""


# ------------------------------------------------------------------------------------------------- names


def slice_title(unit: Mapping[str, Any]) -> str:
    """A slice as a heading: ``metric logit_diff · site_kind mlp_out``."""
    return " · ".join(f"{k} {v}" for k, v in unit.items())


def selection_words(selection: Mapping[str, Any]) -> str:
    """A selection as figure titles name it: ``metric=logit_diff, site_kind=mlp_out``."""
    return ", ".join(f"{k}={v}" for k, v in selection.items())


def slug(selection: Mapping[str, Any]) -> str:
    """A selection's values as a file-name part: ``logit-diff-mlp-out`` (every run of other characters is ``-``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(v) for v in selection.values())).strip("-")


def relative_link(path: Path, base: Path) -> str:
    """``path`` as a link from a page in ``base`` (``../`` where it lies outside), with forward slashes."""
    return Path(os.path.relpath(path, base)).as_posix()


# ------------------------------------------------------------------------------------------------- HTML


def inline_html(text: str) -> str:
    """Escaped text with its `code` spans (the caveat, method and finding sentences use them) as ``<code>``."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def list_html(items: Iterable[str], css_class: str | None = None) -> str:
    """A bullet list of sentences (:func:`inline_html` each)."""
    attr = f" class=\"{css_class}\"" if css_class else ""
    return f"<ul{attr}>" + "".join(f"<li>{inline_html(x)}</li>" for x in items) + "</ul>"


def html_table(table: pd.DataFrame, alpha: float | None = None, p: pd.Series | None = None) -> str:
    """A table; with ``alpha`` and ``p`` (one p-value per row, aligned on the index), rows with p < alpha are bold."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for idx, row in table.iterrows():
        sig = alpha is not None and p is not None and pd.notna(p.get(idx)) and float(p[idx]) < alpha
        cells = "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row.tolist())
        attr = ' class="sig"' if sig else ""
        body.append(f"<tr{attr}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def folded(content: str, summary: str, *, is_open: bool = False) -> str:
    """``content`` behind a ``<details>`` whose ``summary`` (HTML) says what is folded."""
    return f"<details{' open' if is_open else ''}><summary>{summary}</summary>{content}</details>"


def stat_table_html(title: str, shown: pd.DataFrame, alpha: float, *, fold: int = FOLD_ROWS) -> str:
    """A statistics table under its title, rows with p < ``alpha`` bold (:func:`row_p_values`); one longer than
    ``fold`` rows is folded, its summary counting only real p-values."""
    p, label = row_p_values(shown)
    table_html = html_table(shown, alpha if p is not None else None, p)
    heading = f"<h4>{html.escape(title)}</h4>"
    if len(shown) <= fold:
        return heading + table_html
    summary = f"{len(shown)} rows"
    if p is not None:
        summary += f" ({int((p < alpha).sum())} with {html.escape(label)} &lt; {alpha}; bold)"
    return heading + folded(table_html, summary)


def kv_table_html(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table of names and values (model identity, package versions)."""
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"meta\"><tbody>{body}</tbody></table>"


def figure_html(name: str, title: str, caption: str, png: Path) -> str:
    """A figure with the PNG embedded as a ``data:`` URI, so the page is one self-contained file."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (f"<figure id=\"fig-{html.escape(name)}\"><img alt=\"{html.escape(title)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption><b>{html.escape(title)}.</b> "
            f"{html.escape(caption)}</figcaption></figure>")


def html_page(title: str, parts: Iterable[str]) -> str:
    """A whole HTML page in clap's style (:data:`CSS`) around ``parts``."""
    return "\n".join([f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                      f"</title><style>{CSS}</style></head><body>", *parts, "</body></html>"])


# ------------------------------------------------------------------------------------------------ Markdown


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured pipe table (no extra dependency)."""
    if table.empty:
        return "_(empty)_\n"

    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


def stat_table_markdown(shown: pd.DataFrame, alpha: float, csv: str | None = None, *,
                        fold: int = FOLD_ROWS) -> list[str]:
    """A statistics table; a test table longer than ``fold`` rows is folded as the HTML folds it: the row count, how
    many rows are significant, the ``fold`` rows with the smallest p-values, and a link to ``csv`` (the file beside
    the report that holds every row; a pairs-of-layers table of 30 layers has 435 rows per slice)."""
    p, label = row_p_values(shown)
    if len(shown) <= fold or p is None:  # descriptive tables (one row per layer and group) stay whole
        return [markdown_table(shown)]
    where = f"[{csv}]({csv})" if csv else "the CSV tables"
    hits = int((p < alpha).sum())
    top = shown.loc[p.sort_values(kind="stable", na_position="last").index[:fold]]
    return [f"{len(shown)} rows, {hits} with {label} < {alpha}; the {len(top)} with the smallest {label} are shown, "
            f"every row is in {where} (filter by this slice's columns).", "", markdown_table(top)]


def figure_markdown(title: str, caption: str, png: Path, base: Path) -> list[str]:
    """A figure linked relative to the page's folder ``base``, with its caption."""
    link = f"![{title}]({relative_link(png, base)})"
    return [link, "", f"*{title}.* {caption}", ""] if caption else [link, ""]
