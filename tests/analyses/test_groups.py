"""The analysis group: declared (``analysis.group``, ``--group``), ``knowledge_type`` by default, never a
provenance label (ids, PMIDs, lists), and a caveat when a group has fewer than 2 complete probes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analyses.compare import compare
from analyses.io import save_results
from analyses.pipeline import analyze
from analyses.synthetic import make_meta, make_results
from clap.app.cli import main
from clap.errors import ClapError
from clap.groups import default_group, ordered_labels, provenance_reason, resolve_group

N_PROBES = 8


def with_provenance(data: pd.DataFrame, *, extra: dict[str, list] | None = None) -> pd.DataFrame:
    """``data`` plus a per-probe question id and a PMID list per probe, as BioASQ-derived probe files carry."""
    ids = sorted(data["probe_id"].unique())
    bioasq = {p: f"5e{i:02d}f" for i, p in enumerate(ids)}
    pmids = {p: str([30000000 + (i % 2), 31000000]) for i, p in enumerate(ids)}
    data = data.assign(bioasq_id=data["probe_id"].map(bioasq), pmids=data["probe_id"].map(pmids))
    for name, values in (extra or {}).items():
        data[name] = data["probe_id"].map(dict(zip(ids, values, strict=True)))
    return data


def write_run(root: Path, data: pd.DataFrame, labels: list[str], seed: int = 0, **spec) -> Path:
    """A results folder whose run.json lists the labels alphabetically, as clap patch wrote it before."""
    return save_results(data, make_meta(data, seed=seed, group_columns=sorted(labels), **spec), root)


def synthetic(seed: int = 0, groups: dict | None = None, **kw) -> pd.DataFrame:
    return make_results(n_probes=N_PROBES, n_layers=4, site_kinds=("mlp_out",), metrics=("logit_diff",),
                        tokens=("x",), trivial_sites=False, seed=seed,
                        groups=groups if groups is not None else {"knowledge_type": ("definitional", "associative")},
                        **kw)


def test_provenance_labels_are_recognised():
    for name in ("bioasq_id", "pmids", "pmid_terms", "id", "sourceURL", "doi", "question-id", "PMIDs"):
        assert provenance_reason(name), name
    for name in ("knowledge_type", "category", "subject", "difficulty", "idiom_kind", "valid"):
        assert provenance_reason(name) is None, name
    assert provenance_reason("evidence", ["[1, 2]", "[3]"]) == "its values are lists (provenance, not a grouping)"


def test_default_group_prefers_knowledge_type_and_never_provenance():
    labels = {"bioasq_id": ["a", "b", "c", "d"], "knowledge_type": ["d", "a", "d", "a"],
              "pmids": ["[1]", "[2]", "[1]", "[2]"]}
    assert default_group(labels) == "knowledge_type"
    assert ordered_labels(labels) == ["knowledge_type", "bioasq_id", "pmids"]
    without = {k: v for k, v in labels.items() if k != "knowledge_type"}
    assert default_group(without) is None  # an id and a PMID list: no group at all rather than a wrong one
    without["category"] = ["x", "x", "y", "y"]
    without["subject"] = ["Epilepsy", "Valproate", "Epilepsy", "Aspirin"]
    without["author"] = ["q", "r", "s", "t"]  # a value of its own per probe: no group of two
    without["batch"] = ["1", "1", "1", "1"]  # a single value
    assert default_group(without) == "category"
    assert resolve_group("subject", without) == "subject"  # declared: used as declared
    with pytest.raises(ClapError, match=r"analysis.group: 'categry' is not a label of the probes; did you mean "
                                        r"'category'\?"):
        resolve_group("categry", without)


def test_analyze_does_not_group_by_a_provenance_label(tmp_path):
    """run.json lists bioasq_id first (alphabetical, as clap patch wrote it): the analysis still groups by
    knowledge_type, and says so in its Methods."""
    data = with_provenance(synthetic())
    run = write_run(tmp_path / "run", data, ["knowledge_type", "bioasq_id", "pmids"])
    result = analyze(run, figures=False, n_boot=100)
    assert result.options["group"] == "knowledge_type"
    assert set(result.tables["mixed_anova"]["Source"]) >= {"knowledge_type", "Interaction"}
    methods = " ".join(result.methods)
    assert "Groups: `knowledge_type`, the default `knowledge_type`." in methods
    assert "`bioasq_id` (its name says `id` (provenance, not a grouping))" in methods
    assert not any("Design:" in c for c in result.caveats)


def test_declared_group_from_the_spec_and_the_command_line(tmp_path, capsys):
    data = with_provenance(synthetic(), extra={"difficulty": ["easy", "hard"] * (N_PROBES // 2)})
    labels = ["knowledge_type", "bioasq_id", "pmids", "difficulty"]
    run = write_run(tmp_path / "run", data, labels, analysis={"group": "difficulty"})
    declared = analyze(run, figures=False, n_boot=100)
    assert declared.options["group"] == "difficulty"
    assert "Groups: `difficulty`, declared (`analysis.group` or `--group`)." in " ".join(declared.methods)
    assert analyze(run, figures=False, n_boot=100, analysis={"group": "knowledge_type"}).options["group"] \
        == "knowledge_type"
    assert main(["analyze", str(run), "--group", "knowledge_type", "--no-figures", "--n-boot", "100",
                 "-o", str(tmp_path / "cli")]) == 0
    assert pd.read_csv(tmp_path / "cli" / "mixed_anova.csv")["Source"].isin(["knowledge_type"]).any()
    assert main(["analyze", str(run), "--group", "knowlege_type", "--no-figures", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'knowlege_type' is not a label of the probes; did you mean 'knowledge_type'?" in err


def test_declared_id_group_gets_a_design_caveat(tmp_path):
    """Grouping by a per-probe id makes one-probe groups: the caveat says so (today: nothing)."""
    data = with_provenance(synthetic())
    run = write_run(tmp_path / "run", data, ["knowledge_type", "bioasq_id", "pmids"])
    result = analyze(run, figures=False, n_boot=100, group="bioasq_id")
    caveat = next(c for c in result.caveats if c.startswith("Design:"))
    assert f"{N_PROBES} of {N_PROBES} `bioasq_id` group(s) have fewer than 2 complete probes" in caveat
    assert "5e00f (1)" in caveat and "analysis: {group: NAME}" in caveat


def test_group_caveat_counts_complete_probes(tmp_path):
    """A group of 3 probes of which 2 lack a layer has 1 complete probe: flagged; the other group is not."""
    data = synthetic(groups={"knowledge_type": ("definitional", "associative", "rare")})
    keep = data["knowledge_type"] != "rare"
    rare = sorted(data.loc[~keep, "probe_id"].unique())
    assert len(rare) == 2
    drop = data["probe_id"].isin(rare[:1]) & (data["layer"] == 2)
    run = write_run(tmp_path / "run", data[~drop], ["knowledge_type"])
    caveat = next(c for c in analyze(run, figures=False, n_boot=100).caveats if c.startswith("Design:"))
    assert "1 of 3 `knowledge_type` group(s)" in caveat and "rare (1)" in caveat


def test_compare_defaults_to_knowledge_type_not_the_first_label(tmp_path):
    a = write_run(tmp_path / "a", with_provenance(synthetic(seed=1)), ["knowledge_type", "bioasq_id", "pmids"])
    b = write_run(tmp_path / "b", with_provenance(synthetic(seed=2)), ["knowledge_type", "bioasq_id", "pmids"])
    assert compare(a, b, tmp_path / "cmp", figures=False).group == "knowledge_type"
    assert compare(a, b, tmp_path / "cmp2", figures=False, group="bioasq_id").group == "bioasq_id"
    with pytest.raises(ClapError, match="not a label of the probes"):
        compare(a, b, tmp_path / "cmp3", figures=False, group="nope")


def test_findings_say_a_one_probe_group_has_no_interval(tmp_path):
    """One-probe groups have no interval: the findings say so, never "every 95 % CI includes 0"."""
    data = with_provenance(synthetic())
    run = write_run(tmp_path / "run", data, ["knowledge_type", "bioasq_id", "pmids"])
    from analyses.report import findings

    result = analyze(run, figures=False, n_boot=100, group="bioasq_id")
    lines = [x for _, sentences in findings(result) for x in sentences]
    about_one = [x for x in lines if x.startswith("`bioasq_id` = 5e00f:")]
    assert about_one and not any("includes 0" in x for x in lines if x.startswith("`bioasq_id`"))
    assert "(mean " in about_one[0] and "no 95 % CI (one probe), n = 1)" in about_one[0]
    assert "no 95 % interval at any layer (1 probe(s): an interval needs at least 2)" in about_one[0]
    # groups that have intervals keep the wording that is true of them
    normal = analyze(run, figures=False, n_boot=100)
    text = " ".join(x for _, sentences in findings(normal) for x in sentences)
    assert "`knowledge_type` = associative:" in text and "no interval" not in text


def test_one_sample_findings_without_a_test_say_so():
    from analyses.findings import _one_sample_findings

    table = pd.DataFrame({"layer": [0, 1, 0, 1], "g": ["a", "a", "b", "b"], "p_unc": [0.01, 0.2, None, None]})
    assert _one_sample_findings(table, "g", 0.05) == [
        "`g` = a: one-sample tests against 0 (p_unc < 0.05) are significant at layer 0.",
        "`g` = b: no one-sample test could run (an interval and a test need at least 2 probes).",
    ]
