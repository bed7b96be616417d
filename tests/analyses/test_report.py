"""`clap analyze` and `clap report` end to end: files, tables that match the API, a self-contained HTML page."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import lxml.html
import numpy as np
import pandas as pd
import pytest

from analyses import load_results, rm_anova
from analyses.formatting import fmt as _fmt
from analyses.io import save_results
from analyses.synthetic import make_meta, make_results
from analyses.tables import TABLE_FILES
from clap.app.cli import main

from .conftest import GROUP

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = main(["--quiet", "report", str(small_dir), "-o", str(out), "--n-boot", "300"])
    assert rc == 0
    return small_dir, out


def test_analyze_writes_every_table_and_figure(small_dir, tmp_path, capsys):
    rc = main(["--quiet", "analyze", str(small_dir), "-o", str(tmp_path), "--n-boot", "200", "--seed", "7"])
    assert rc == 0
    assert f"to {tmp_path}" in capsys.readouterr().out
    for name in TABLE_FILES.values():
        assert (tmp_path / name).is_file(), name
    rm = pd.read_csv(tmp_path / "rm_anova.csv")
    assert sorted(rm["site_kind"]) == ["mlp_out", "resid_pre"] and (rm["metric"] == "logit_diff").all()
    data, _ = load_results(small_dir)
    for _, row in rm.iterrows():
        ref = rm_anova(data, metric="logit_diff", site_kind=row["site_kind"]).iloc[0]
        assert row["F"] == pytest.approx(ref["F"], rel=1e-9)
        assert row["p_GG_corr"] == pytest.approx(ref["p_GG_corr"], rel=1e-9)
        assert row["n_dropped"] == 1 and row["n_undefined"] > 0
    mixed = pd.read_csv(tmp_path / "mixed_anova.csv")
    assert list(mixed["Source"][:3]) == [GROUP, "layer", "Interaction"]
    post = pd.read_csv(tmp_path / "posthoc_layers.csv")
    assert len(post) == 2 * 6 and (post["p_adjust"] == "holm").all()  # 2 site kinds x C(4, 2) pairs
    groups = pd.read_csv(tmp_path / "posthoc_groups.csv")
    assert len(groups) == 2 * 4
    ci = pd.read_csv(tmp_path / "bootstrap_ci.csv")
    assert len(ci) == 2 * 4 * 2 and (ci["method"] == "t").all()  # t intervals by default
    counts = pd.read_csv(tmp_path / "probe_counts.csv").set_index(GROUP)
    assert counts.loc["all", "n_probes"] == 10 and counts.loc["all", "n_probes_undefined"] == 1
    triv = pd.read_csv(tmp_path / "trivial_sites.csv")
    assert set(triv["site"]) == {"lm_head", "final_norm"} and (triv["mean_recovery"] == 1).all()
    figs = sorted(p.name for p in (tmp_path / "figures").iterdir())
    stems = sorted({Path(f).stem for f in figs})
    # site-kind map, 2 x (line, position map), per-site bars, the group contrast, the per-module bars and the
    # localization profiles and measures
    assert len(figs) == 2 * len(stems) and len(stems) == 10
    assert {"contrast_logit-diff-replace-denoising-all", "module_bars_logit-diff-replace-denoising-all",
            "localization_profiles_logit-diff-replace-denoising-all",
            "localization_measures_logit-diff-replace-denoising-all"} <= set(stems)
    assert all((tmp_path / "figures" / f"{s}.svg").is_file() for s in stems)
    caveats = (tmp_path / "caveats.md").read_text()
    for phrase in ("by construction", "undefined", "Small samples", "Missing cells"):
        assert phrase in caveats


def test_same_seed_same_intervals(small_dir, tmp_path):
    for sub in ("a", "b"):
        assert main(["--quiet", "analyze", str(small_dir), "-o", str(tmp_path / sub), "--n-boot", "200", "--no-figures",
                     "--interval", "percentile"]) == 0
    a = pd.read_csv(tmp_path / "a" / "bootstrap_ci.csv")
    b = pd.read_csv(tmp_path / "b" / "bootstrap_ci.csv")
    pd.testing.assert_frame_equal(a, b)
    assert not (tmp_path / "a" / "figures").exists()
    assert main(["--quiet", "analyze", str(small_dir), "-o", str(tmp_path / "c"), "--n-boot", "200", "--seed", "99",
                 "--no-figures", "--interval", "percentile"]) == 0
    c = pd.read_csv(tmp_path / "c" / "bootstrap_ci.csv")
    assert not np.allclose(a["ci_low"], c["ci_low"]) and np.allclose(a["mean"], c["mean"])


def test_html_report_is_self_contained_with_tables_and_images(reported):
    results_dir, out = reported
    page = (out / "report.html").read_text(encoding="utf-8")
    doc = lxml.html.fromstring(page)
    # Images: every one embedded as a PNG data URI that decodes to a real PNG; nothing fetched from elsewhere.
    srcs = [img.get("src") for img in doc.iter("img")]
    assert len(srcs) == 10  # 6 from `clap analyze`, the group contrast, the module bars, 2 localization figures
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1])
        assert raw.startswith(PNG_MAGIC) and len(raw) > 10_000
    assert not doc.xpath("//link[@href] | //script[@src] | //*[@src][not(self::img)]")
    # figures are shown at the width they were drawn at, so their 9 pt text is 9 pt on the page
    from analyses.figures import COLUMN_WIDTH_IN

    assert f"figure img{{width:{COLUMN_WIDTH_IN}in;" in page
    # Headings and the tables the issue asks for.
    text = doc.text_content()
    for phrase in ("Caveats", "Model", "Package versions", "Probe counts", "Study spec", "Methods",
                   "Repeated-measures ANOVA across layers", "Friedman test across layers", "Mixed ANOVA: layer x group",
                   "Post-hoc: pairs of layers", "Post-hoc: groups at each layer",
                   "Mean recovery with its confidence interval (t by default; see Methods)"):
        assert phrase in text, phrase
    tables = doc.xpath("//table")
    assert len(tables) >= 4 + 2 * 6
    # The ANOVA F shown equals the CSV value (formatted to 3 decimals).
    rm = pd.read_csv(out / "rm_anova.csv")
    assert len(rm) == 2
    for f, p in zip(rm["F"], rm["p_GG_corr"], strict=True):
        assert f"<td>{_fmt(f)}</td>" in page and f"<td>{_fmt(p)}</td>" in page
    # Model identity, versions, spec and counts come from run.json and the data.
    _, meta = load_results(results_dir)
    for key, value in meta["versions"].items():
        assert f"<td>{key}</td><td>{value}</td>" in page
    assert "metrics:" in page and "- logit_diff" in page
    caveats = doc.xpath("//ul[@class='caveats']/li")
    assert any("by construction" in li.text_content() for li in caveats)
    assert any("undefined" in li.text_content() for li in caveats)
    assert any("Small samples" in li.text_content() for li in caveats)


def test_markdown_report_links_existing_figures(reported):
    _, out = reported
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Caveats" in md and "#### Repeated-measures ANOVA across layers" in md
    assert re.search(r"^\| Source \| F \| ddof1 \| ddof2 \| p_unc \|", md, re.M)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 10  # as in the HTML report
    for link in links:
        assert (out / link).is_file()


def test_single_probe_report_explains_instead_of_failing(tmp_path):
    data = make_results(n_probes=1, n_layers=3, metrics=("logit_diff",), site_kinds=("resid_pre",), tokens=("a", "b"))
    save_results(data, make_meta(data), tmp_path / "res")
    assert main(["--quiet", "report", str(tmp_path / "res"), "--n-boot", "100"]) == 0
    out = tmp_path / "res" / "analysis"
    skipped = pd.read_csv(out / "skipped.csv")
    assert {"rm_anova", "friedman", "posthoc_layers"} <= set(skipped["test"])
    layer_tests = skipped[skipped["test"].isin(["rm_anova", "friedman", "posthoc_layers"])]
    assert layer_tests["reason"].str.contains("at least 2 probes").all()
    rm = pd.read_csv(out / "rm_anova.csv")
    assert rm.empty and {"F", "p_GG_corr", "np2", "n_subjects"} <= set(rm.columns)
    page = (out / "report.html").read_text()
    assert "Only 1 probe: no test across layers is possible" in page
    doc = lxml.html.fromstring(page)  # (base64 image data may spell anything: read the rendered text)
    assert "Not run" in doc.text_content()
    assert not [td.text_content() for td in doc.iter("td") if "NaN" in td.text_content()]


def test_cli_errors_are_clear(tmp_path, small_dir, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "results directory not found" in capsys.readouterr().err
    assert main(["analyze", str(small_dir), "-o", str(tmp_path / "o"), "--metric", "kl"]) == 2
    assert "no rows with metric kl; the results hold logit_diff" in capsys.readouterr().err
    assert main(["analyze", str(small_dir), "--dpi", "72"]) == 2
    assert "200 dpi" in capsys.readouterr().err
    assert main(["report", str(small_dir), "--group", "nope"]) == 2
    assert "group (--group, analysis.group): 'nope' is not a label of the probes" in capsys.readouterr().err
    assert main(["analyze", str(small_dir), "-o", str(tmp_path / "o"), "--site-kind", "attn_out"]) == 2
    assert ("no testable slice with site_kind attn_out; site kinds with 2+ layers in the results: mlp_out, resid_pre"
            in capsys.readouterr().err)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(reported, tmp_path):
    browser = _chromium()
    if not browser:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); cannot render the report")
    _, out = reported
    shot = tmp_path / "shot.png"
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}", (out / "report.html").as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), proc.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    assert img.std() > 0.05  # not a blank page
    non_white = (img.min(axis=2) < 0.9).mean()
    assert non_white > 0.02  # text, tables and figures cover part of the page
    # Some pixels carry the diverging palette's red or blue (a rendered figure, not only black text).
    coloured = (np.abs(img[..., 0] - img[..., 2]) > 0.25).mean()
    assert coloured > 0.001


def test_number_formatting_and_markdown_tables():
    from analyses.report import markdown_table

    assert _fmt(3.95e-4) == "3.95e-04" and _fmt(0.12345) == "0.123" and _fmt(12) == "12" and _fmt(2.0) == "2"
    assert _fmt(float("nan")) == "–" and _fmt(None) == "–" and _fmt(True) == "yes" and _fmt(1234.5) == "1234"
    table = markdown_table(pd.DataFrame({"a": ["x|y"], "p": [0.5]}))
    assert table.splitlines() == ["| a | p |", "| --- | --- |", "| x\\|y | 0.500 |"]


def test_report_title_names_the_study_and_model():
    from analyses.report import study_title

    run = {"spec": {"name": "epilepsy"}, "model": {"source": "smollm2-135m"}}
    assert study_title(run) == "epilepsy on smollm2-135m"
    assert study_title({"model": {"architecture": "GPT2LMHeadModel"}}) == "GPT2LMHeadModel"
    assert study_title({}) == "results"


# ------------------------------------------------------------------------------------- regressions of the tables


@pytest.fixture(scope="module")
def group_effect_analysis(tmp_path_factory):
    """One slice, 8 layers (so the bootstrap table of 16 rows is folded) and a planted group main effect."""
    from analyses.pipeline import analyze

    data = make_results(n_probes=12, n_layers=8, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", "b"),
                        trivial_sites=False, seed=5)
    data.loc[data[GROUP] == "definitional", "recovery"] += 0.8
    root = tmp_path_factory.mktemp("group_effect")
    save_results(data, make_meta(data, seed=5, group_columns=[GROUP]), root)
    return analyze(root, out_dir=root / "analysis", n_boot=200, figures=False)


def test_folded_table_without_p_values_claims_no_test(group_effect_analysis):
    from analyses.report import render_html

    doc = lxml.html.fromstring(render_html(group_effect_analysis))
    summaries = {s.getparent().getprevious().text_content(): s.text_content() for s in doc.iter("summary")}
    boot = summaries["Mean recovery with its confidence interval (t by default; see Methods)"]
    assert boot == "16 rows"  # no "0 with p_unc < 0.05": the table has no p column at all
    layers = summaries["Post-hoc: pairs of layers (paired t, Holm)"]
    post = group_effect_analysis.tables["posthoc_layers"]
    assert layers == f"{len(post)} rows ({int((post['p_corr'] < 0.05).sum())} with p_corr < 0.05; bold)"


def test_between_group_row_of_mixed_anova_is_bold(group_effect_analysis):
    from analyses.report import render_html

    mixed = group_effect_analysis.tables["mixed_anova"].set_index("Source")
    assert mixed.loc[GROUP, "p_unc"] < 1e-4 and pd.isna(mixed.loc[GROUP, "p_GG_corr"])
    doc = lxml.html.fromstring(render_html(group_effect_analysis))
    heading = next(h for h in doc.iter("h4") if h.text_content() == "Mixed ANOVA: layer x group")
    rows = heading.getnext().xpath(".//tbody/tr")
    bold = {r.xpath("./td")[0].text_content(): r.get("class") == "sig" for r in rows}
    assert bold[GROUP] is True
    # the within rows follow their corrected p
    for source in ("layer", "Interaction"):
        assert bold[source] == bool(mixed.loc[source, "p_GG_corr"] < 0.05)


def test_false_positive_caveat_counts_every_reported_test(group_effect_analysis):
    tables = group_effect_analysis.tables
    # one slice: rm 1 + Friedman 1 + mixed 3 rows (each its own family), two Holm families of post-hoc tests, the
    # one-sample tests across layers (one Holm family) and per group (one family per group)
    n_groups = tables["one_sample_groups"][GROUP].nunique()
    assert n_groups == 2
    n_tests = (1 + 1 + 3 + len(tables["posthoc_layers"]) + len(tables["posthoc_groups"]) + len(tables["one_sample"])
               + len(tables["one_sample_groups"]))
    caveat = next(c for c in group_effect_analysis.caveats if "false positives" in c)
    assert caveat.startswith(f"{n_tests} tests in 1 slice(s)")
    assert "in 10 separately corrected families" in caveat and "about 0.5 false positives" in caveat


# ------------------------------------------------------------------------------------------------ findings


def _findings_for(data):
    from analyses.findings import unit_findings
    from analyses.tables import compute_tables

    tables = compute_tables(data, group=GROUP, n_boot=300, seed=0)
    unit = {"metric": "logit_diff", "site_kind": "resid_pre", "operation": "replace", "direction": "denoising",
            "positions": "all"}
    return tables, unit_findings(tables, unit, GROUP)


def test_findings_name_the_planted_layers_and_direction():
    data = make_results(n_probes=20, n_layers=6, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", "b"),
                        layer_effect=[0, 0, 0, 1.0, 0, 0], trivial_sites=False, seed=2)
    data.loc[(data[GROUP] == "definitional") & (data["layer"] == 5), "recovery"] += 0.3
    tables, lines = _findings_for(data)
    text = "\n".join(lines)
    ci = tables["bootstrap_ci"]
    for g in ("associative", "definitional"):
        best = ci[(ci[GROUP] == g) & (ci["layer"] == 3)].iloc[0]
        assert (f"`{GROUP}` = {g}: recovery is highest at layer 3 (mean {_fmt(best['mean'])}, 95 % CI "
                f"[{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}], n = 10)") in text
    assert "Recovery differs across layers (repeated-measures ANOVA" in text
    differ = re.search(rf"`{GROUP}` = definitional recovers more than associative at layers? ([0-9, and]+) \(Welch t",
                       text)
    assert differ and "5" in re.split(r", | and ", differ.group(1))
    assert "associative recovers more than definitional" not in text
    # every layer named as "above 0" has a CI above 0 in the table, and only those
    for g in ("associative", "definitional"):
        line = next(x for x in lines if x.startswith(f"`{GROUP}` = {g}:"))
        above = ci[(ci[GROUP] == g) & (ci["ci_low"] > 0)]["layer"].tolist()
        assert 3 in above
        assert (f"lies above 0 at layer {above[0]}" in line if len(above) == 1
                else "lies above 0 at layers" in line)


def test_findings_say_no_evidence_when_there_is_none():
    data = make_results(n_probes=20, n_layers=6, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", "b"),
                        layer_effect=0.0, probe_sd=0.0, trivial_sites=False, seed=5)
    tables, lines = _findings_for(data)
    text = "\n".join(lines)
    # no test rejects the null on this seed (checked on the tables, independently of the text)
    assert tables["rm_anova"]["p_GG_corr"].iloc[0] > 0.05 and (tables["mixed_anova"]["p_unc"] > 0.05).all()
    assert (tables["posthoc_groups"]["p_corr"] > 0.05).all()
    assert "No evidence that recovery differs across layers" in text
    assert "No evidence that mean recovery differs between the `knowledge_type` groups" in text
    assert "No evidence that the groups' layer profiles differ" in text
    assert "No evidence of a group difference at any single layer" in text
    assert "recovers more than" not in text


def test_report_has_a_findings_section(reported):
    _, out = reported
    doc = lxml.html.fromstring((out / "report.html").read_text(encoding="utf-8"))
    heads = [h.text_content() for h in doc.iter("h2")]
    assert heads.index("Findings") == heads.index("Caveats") + 1
    items = doc.xpath("//ul[@class='findings']/li")
    assert any("is highest at layer" in li.text_content() for li in items)
    assert "## Findings" in (out / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------- interactive heatmaps


def _heatmap_json(page: str):
    import json

    doc = lxml.html.fromstring(page)
    (blob,) = doc.xpath("//script[@id='clap-heatmaps']")
    assert blob.get("type") == "application/json"
    scripts = doc.xpath("//script[not(@type)]")
    assert scripts and all(s.get("src") is None for s in scripts)  # inline only: works offline
    return json.loads(blob.text), doc


def test_interactive_heatmap_data_match_the_results(reported):
    results_dir, out = reported
    maps, doc = _heatmap_json((out / "report.html").read_text(encoding="utf-8"))
    assert [m["title"].split("(")[1].split(" · ")[1] for m in maps] == ["site_kind mlp_out", "site_kind resid_pre"]
    assert all(doc.xpath(f"//div[@id='clap-heatmap-{i}']") for i in range(len(maps)))
    data, _ = load_results(results_dir)
    m = maps[1]
    rows = data[(data.site_kind == "resid_pre") & data.recovery_defined & ~data.trivial & data.layer.notna()]
    g_idx = [g["name"] for g in m["groups"]].index(f"{GROUP} = definitional")
    group = m["groups"][g_idx]
    assert group["rows"] == ["Paris [0]", "is [1]", "in [2]"] and m["layers"] == [0, 1, 2, 3]
    for r in range(3):
        for c in range(4):
            cell = group["cells"][r][c]
            part = rows[(rows[GROUP] == "definitional") & (rows.position == r) & (rows.layer == c)]
            x = part.groupby("probe_id").recovery.mean()
            assert cell["n"] == len(x) and cell["v"] == pytest.approx(x.mean(), abs=1e-6)
            assert cell["tok"] == group["rows"][r]
            lo, hi = __import__("scipy.stats", fromlist=["t"]).t.interval(0.95, len(x) - 1, loc=x.mean(), scale=x.sem())
            assert (cell["lo"], cell["hi"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
            assert sorted(p[0] for p in cell["p"]) == sorted(x.index)
            assert dict(cell["p"]) == pytest.approx(x.round(6).to_dict(), abs=1e-6)


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_args(tmp_path):
    return [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000"]


@pytest.mark.slow
def test_interactive_heatmap_in_headless_chromium(reported, tmp_path):
    if not _browser():
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    _, out = reported
    maps, _ = _heatmap_json((out / "report.html").read_text(encoding="utf-8"))
    url = (out / "report.html").as_uri() + "#cell=1-0-2-3"
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([*_chromium_args(tmp_path), "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          env=env)
    dom = lxml.html.fromstring(proc.stdout)
    assert dom.body.get("data-heatmaps") == "ready", proc.stderr[-2000:]
    cells = dom.xpath("//div[@id='clap-heatmap-1']//*[local-name()='rect' and @class='cell']")
    n_cells = sum(c is not None for g in maps[1]["groups"] for row in g["cells"] for c in row)
    assert len(cells) == n_cells
    cell = maps[1]["groups"][0]["cells"][2][3]
    (tip,) = dom.xpath("//div[@id='clap-tip']")
    assert tip.get("data-cell") == "1-0-2-3" and f"n = {cell['n']}" in tip.text_content()
    assert cell["tok"] in tip.text_content() and "layer 3" in tip.text_content() and "95 % CI [" in tip.text_content()
    (detail,) = dom.xpath("//div[@id='clap-detail']")
    probes = [tr.xpath("./td")[0].text_content() for tr in detail.xpath(".//tbody/tr")]
    assert sorted(probes) == sorted(p[0] for p in cell["p"])
    shot = tmp_path / "shot.png"
    subprocess.run([*_chromium_args(tmp_path), "--window-size=1200,3000", "--hide-scrollbars", f"--screenshot={shot}",
                    url], capture_output=True, timeout=120, env=env)
    assert shot.is_file()
    keep = os.environ.get("CLAP_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_tables_added_by_the_analysis_are_shown_and_used(group_effect_analysis):
    """A per-slice table the report does not know (e.g. one-sample tests per layer) and a probe validity table."""
    import copy

    from analyses.report import render_html, render_markdown

    result = copy.copy(group_effect_analysis)
    ci = result.tables["bootstrap_ci"]
    one = ci[["layer", GROUP, "metric", "site_kind", "operation", "direction", "positions"]].copy()
    one["T"] = 1.0
    one["p_unc"] = 0.5
    one["p_corr"] = np.where((one["layer"] == 4) & (one[GROUP] == "definitional"), 0.001, 0.9)
    validity = pd.DataFrame({"probe_id": ["p000", "p001"], "valid": [True, False],
                             "reason": ["", "clean == corrupted"]})
    result.tables = {**result.tables, "one_sample": one, "probe_validity": validity}
    doc = lxml.html.fromstring(render_html(result))
    heading = next(h for h in doc.iter("h4") if h.text_content() == "one_sample")
    table = heading.getnext()
    table = table.xpath(".//table")[0] if table.tag == "details" else table
    bold = table.xpath(".//tr[@class='sig']")
    assert len(bold) == 1 and bold[0].xpath("./td")[0].text_content() == "4"
    assert "clean == corrupted" in doc.text_content()
    findings = [li.text_content() for li in doc.xpath("//ul[@class='findings']/li")]
    assert ("knowledge_type = definitional: one-sample tests against 0 (p_corr < 0.05) are significant at layer 4."
            in findings)
    assert ("knowledge_type = associative: no evidence from the one-sample tests (p_corr < 0.05) at any layer."
            in findings)
    md = render_markdown(result)
    assert "#### one_sample" in md and "### Probe validity" in md
