"""``report.md`` folds long statistics tables as the HTML does: the pairs-of-layers table of a 30-layer slice has
435 rows; the Markdown gives its count, the number of significant rows, the most significant rows and a link to
the CSV that holds every row."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from analyses.report import FOLD_ROWS, write_report
from analyses.synthetic import write_synthetic


def test_markdown_folds_the_pairs_of_layers_table(tmp_path):
    run = write_synthetic(tmp_path / "run", n_probes=8, n_layers=30, site_kinds=("resid_pre", "mlp_out"),
                          metrics=("logit_diff",), tokens=("x",), trivial_sites=False, layer_effect=1.5)
    files = write_report(run, out_dir=tmp_path / "analysis", figures=False, n_boot=100)
    text = files.markdown.read_text(encoding="utf-8")
    full = pd.read_csv(tmp_path / "analysis" / "posthoc_layers.csv")
    assert text.count("#### Post-hoc: pairs of layers (paired t, Holm)") == 2  # one per slice
    for kind, rows in full.groupby("site_kind", sort=True):
        assert len(rows) == 435
        unit = [u for u in text.split("\n### ")[1:] if f"site_kind {kind} " in u][-1]  # the Results section
        body = unit.split("#### Post-hoc: pairs of layers (paired t, Holm)")[1].split("####")[0]
        table_rows = [line for line in body.splitlines()
                      if line.startswith("| ") and not line.startswith(("| A ", "| ---"))]
        assert len(table_rows) == FOLD_ROWS
        hits = int((rows["p_corr"] < 0.05).sum())
        assert f"435 rows, {hits} with p_corr < 0.05; the {FOLD_ROWS} with the smallest p_corr are shown" in body
        assert "[posthoc_layers.csv](posthoc_layers.csv)" in body
        shown = [float(re.split(r"\s*\|\s*", line)[9]) for line in table_rows]  # the p_corr column
        smallest = sorted(rows["p_corr"].nsmallest(FOLD_ROWS))
        assert sorted(shown) == pytest.approx(smallest, rel=5e-3)  # printed to 3 digits
    assert len(text.splitlines()) < 650  # over 1,200 lines with both 435-row tables printed (other sections grow)
