"""One options object for an analysis (analyses.options) and one formatting module (analyses.formatting): the names
callers pass map onto the object or are refused with the nearest valid ones, the object and the keywords give the
same tables (checked against a hand reduction and pingouin), and the shared renderers fold and mark rows as the
reports rely on. Also the design caveats and the trace peaks, which moved into analyses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pingouin as pg
import pytest

from analyses.caveats import design_caveats
from analyses.formatting import (
    FOLD_ROWS,
    fmt,
    interval,
    relative_link,
    slice_title,
    slug,
    stat_table_html,
    stat_table_markdown,
)
from analyses.io import save_results
from analyses.options import AnalyzeOptions, analyze_options
from analyses.pipeline import analyze
from analyses.select import slice_mask, slice_rows
from analyses.synthetic import make_meta, make_results
from analyses.trace import trace_peaks
from clap.analysis_options import AnalysisOptions
from clap.errors import ClapError


def test_names_map_onto_the_options_object_or_are_refused_with_the_nearest():
    opts = analyze_options(group="knowledge_type", n_boot=200, figures=False, position_reduction="max")
    assert opts.overrides == {"group": "knowledge_type", "position_reduction": "max"}
    assert (opts.n_boot, opts.figures, opts.analysis) == (200, False, None)
    merged = analyze_options(opts, subject="clean_prompt", n_boot=300)
    assert merged.overrides == {"group": "knowledge_type", "position_reduction": "max", "subject": "clean_prompt"}
    assert merged.n_boot == 300 and merged.figures is False  # the base's settings are kept
    assert analyze_options(analysis={"group": "g"}).analysis == AnalysisOptions(group="g")
    with pytest.raises(ClapError, match=r"unknown analysis option 'grup' \(did you mean group\?\)"):
        analyze_options(grup="knowledge_type")
    with pytest.raises(ClapError, match=r"'n_bot' \(did you mean n_boot\?\)"):
        analyze_options(n_bot=100)
    with pytest.raises(ClapError, match=r"analysis option ss_type: Input should be 2 or 3"):
        analyze_options(ss_type=4)
    with pytest.raises(ClapError, match=r"analysis option alpha"):
        analyze_options(alpha=1.5)
    with pytest.raises(ClapError, match=r"expected AnalyzeOptions .* out_dir="):
        analyze_options(Path("somewhere"))  # the old analyze(dir, out_dir) call


@pytest.fixture(scope="module")
def positions_run(tmp_path_factory):
    data = make_results(n_probes=8, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        tokens=("a", " b", " c"), trivial_sites=False, seed=3)
    root = tmp_path_factory.mktemp("positions")
    save_results(data, make_meta(data, seed=3), root / "run")
    return root


def test_the_object_and_the_keywords_give_the_same_tables_as_a_hand_reduction(positions_run):
    run = positions_run / "run"
    by_object = analyze(run, AnalyzeOptions(out_dir=positions_run / "a", figures=False, n_boot=100,
                                            analysis=AnalysisOptions(position_reduction="sum"),
                                            overrides={"position_reduction": "max"}))
    by_names = analyze(run, out_dir=positions_run / "b", figures=False, n_boot=100,
                       analysis={"position_reduction": "sum"}, position_reduction="max")
    assert by_object.out_dir == positions_run / "a" and (positions_run / "b" / "rm_anova.csv").is_file()
    rm = by_object.tables["rm_anova"]
    assert set(rm["reduction"]) == {"max over positions"}  # the override wins over the given section
    pd.testing.assert_frame_equal(rm, by_names.tables["rm_anova"])
    # independent: each probe's max over positions per layer, then pingouin's repeated-measures ANOVA
    data = pd.read_parquet(run / "results.parquet")
    rows = data[data["recovery_defined"] & ~data["trivial"]]
    per = rows.groupby(["probe_id", "layer"], observed=True)["recovery"].max().reset_index()
    ref = pg.rm_anova(per, dv="recovery", within="layer", subject="probe_id", detailed=True)
    assert rm["F"].iloc[0] == pytest.approx(ref["F"].iloc[0], rel=1e-9)
    assert by_object.options["analysis"]["position_reduction"] == "max"


def test_numbers_intervals_and_names():
    assert fmt(math.inf) == "inf" and fmt(-math.inf) == "-inf"  # used to overflow in int()
    assert fmt(np.float32(0.25)) == "0.250" and interval(0.1234, np.nan) == "[0.123, –]"
    sel = {"metric": "logit_diff", "site_kind": "mlp_out", "positions": "last"}
    assert slice_title(sel) == "metric logit_diff · site_kind mlp_out · positions last"
    assert slug(sel) == "logit-diff-mlp-out-last" and slug({"positions": "[0, -1]"}) == "0-1"
    assert relative_link(Path("/s/models/a/x.png"), Path("/s")) == "models/a/x.png"
    assert relative_link(Path("/s/x.png"), Path("/s/compare")) == "../x.png"


def test_slices_match_missing_values_and_ignore_absent_columns():
    frame = pd.DataFrame({"metric": ["m", "m", "k"], "positions": ["last", None, None], "v": [1, 2, 3]})
    assert slice_mask(frame, {"metric": "m", "positions": None}).tolist() == [False, True, False]
    assert slice_mask(frame, {"metric": "m", "positions": np.nan}).tolist() == [False, True, False]
    assert slice_rows(frame, {"metric": "k", "head": 3})["v"].tolist() == [3]  # no head column: ignored
    assert slice_rows(None, {"metric": "k"}).empty


def _tests(n: int) -> pd.DataFrame:
    p = np.linspace(0.001, 0.2, n)[::-1]
    return pd.DataFrame({"layer": range(n), "T": np.arange(n) * 0.5, "p_unc": p})


def test_statistics_tables_fold_and_mark_rows_alike_in_html_and_markdown():
    short = _tests(FOLD_ROWS)
    page = stat_table_html("Tests", short, 0.05)
    assert "<details>" not in page and page.startswith("<h4>Tests</h4><table>")
    assert page.count('<tr class="sig">') == int((short["p_unc"] < 0.05).sum())
    long = _tests(FOLD_ROWS + 5)
    hits = int((long["p_unc"] < 0.05).sum())
    page = stat_table_html("Tests", long, 0.05)
    assert f"<summary>{FOLD_ROWS + 5} rows ({hits} with p_unc &lt; 0.05; bold)</summary>" in page
    assert page.count('<tr class="sig">') == hits
    text = stat_table_markdown(long, 0.05, "tests.csv")
    assert text[0].startswith(f"{FOLD_ROWS + 5} rows, {hits} with p_unc < 0.05; the {FOLD_ROWS} with the smallest")
    assert "[tests.csv](tests.csv)" in text[0]
    shown = [line.split(" | ")[0].strip("| ") for line in text[2].splitlines()[2:]]
    assert sorted(map(int, shown)) == sorted(long.nsmallest(FOLD_ROWS, "p_unc")["layer"])
    assert stat_table_markdown(long.drop(columns="p_unc"), 0.05)[0].count("\n") == len(long) + 2  # no p: whole


def test_design_caveats_name_the_trivial_and_whole_run_sites_and_gpt2_conv1d():
    rows = []
    for probe in ("p0", "p1"):
        for site, module, trivial, patched in (("lm_head", "lm_head", True, 5.0), ("transformer.h.0", "transformer.h.0",
                                               False, 2.0), ("h.0.mlp", "transformer.h.0.mlp.c_fc", False, 1.0)):
            rows.append({"probe_id": probe, "site": site, "module": module, "trivial": trivial, "patched": patched,
                         "clean": 2.0, "direction": "denoising", "recovery_defined": True})
    notes = design_caveats(pd.DataFrame(rows), {"model": {"architecture": "GPT2LMHeadModel"}})
    assert notes[0].startswith("1 site(s) recover 100 % by construction (lm_head)")
    assert notes[1].startswith("1 further site(s) reproduce the clean run exactly for every probe (transformer.h.0)")
    assert "GPT-2's `c_attn`, `c_proj` and `c_fc` modules (1 patched)" in notes[2]
    assert len(design_caveats(pd.DataFrame(rows), {"model": {"architecture": "LlamaForCausalLM"}})) == 2


def test_trace_peaks_are_each_groups_largest_mean_effect():
    table = pd.DataFrame({"kind": "resid_post", "window": 1, "layer": [0, 1, 2, 0, 1, 2],
                          "token_group": ["last"] * 3 + ["first subject"] * 3,
                          "effect": [0.1, 0.4, 0.2, 0.3, 0.05, 0.01], "n_probes": 4, "n_samples": 3,
                          "sample_sd": 0.01, "sample_ci_low": [0, 0.35, 0, 0.25, 0, 0],
                          "sample_ci_high": [0, 0.45, 0, 0.35, 0, 0]})
    peaks = trace_peaks(table).set_index("token group")
    assert peaks.loc["last", "layer"] == 1 and peaks.loc["last", "peak effect"] == 0.4
    assert peaks.loc["first subject", "layer"] == 0
    assert peaks.loc["first subject", "95 % t interval over draws"] == "[0.250, 0.350]"
