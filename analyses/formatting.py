"""Numbers and tables for people: one formatting of values (p-values, effects, counts) and one renderer each for
HTML and Markdown tables, shared by every report clap writes (a model's analysis, a comparison, the study page),
so the same number reads the same everywhere."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd


def fmt(value: Any) -> str:
    """Numbers for humans: small p-values in scientific notation, others to 3-4 significant digits."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == int(v) and abs(v) < 1e6:
            return f"{int(v)}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
        if abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}"
    return str(value)


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
