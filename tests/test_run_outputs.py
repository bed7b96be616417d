"""What ``clap run`` leaves for a reader: the analysis group (never a provenance field), the study page's headline
findings (the reports' own sentences), and no lock file after the run."""

from __future__ import annotations

import json

import pytest

from clap.app.cli import main
from clap.app.pipeline import run_study
from clap.app.stages import LOCK_FILE, locked
from clap.errors import ClapError
from tests.test_run import HAS_COMPARE, PROBES, model_dirs, study_text, tokenizer, write_probes  # noqa: F401

#: The test probes with a provenance id that sorts before knowledge_type (as BioASQ-derived probe files carry).
WITH_IDS = [{**p, "bioasq_id": f"5e{i:02d}", "pmids": [30000000 + i]} for i, p in enumerate(PROBES)]


def test_run_lock_is_removed_and_names_its_holder(tmp_path):
    with locked(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] > 0
        with pytest.raises(ClapError, match=rf"another `clap run` is writing to this folder \(pid {holder['pid']} "):
            with locked(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError):  # a failed run releases and removes it too
        with locked(tmp_path):
            raise RuntimeError("stage failed")
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.skipif(not HAS_COMPARE, reason="needs analyses.compare")
def test_study_groups_by_knowledge_type_and_its_page_gives_the_findings(tmp_path, model_dirs):  # noqa: F811
    write_probes(tmp_path / "probes.jsonl", WITH_IDS)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs, compare=True), encoding="utf-8")
    out = tmp_path / "out"
    run_study(path, out, echo=lambda line: None)
    assert not (out / LOCK_FILE).exists()
    meta = json.loads((out / "models" / "base" / "run.json").read_text())
    assert meta["group_columns"] == ["knowledge_type", "bioasq_id"]  # was alphabetical: bioasq_id first
    page_md = (out / "report.md").read_text(encoding="utf-8")
    page_html = (out / "report.html").read_text(encoding="utf-8")
    assert "## Headline findings" in page_md and "<h2>Headline findings</h2>" in page_html
    for name in ("base", "perturbed"):
        record = json.loads((out / "models" / name / "analysis" / "findings.json").read_text())
        assert record["group"] == "knowledge_type"
        assert f"### Model {name} (groups: `knowledge_type`)" in page_md
        report = (out / "models" / name / "analysis" / "report.md").read_text(encoding="utf-8")
        for block in record["slices"]:
            assert block["headline"] and set(block["headline"]) <= set(block["findings"])
            for sentence in block["headline"]:  # the very sentences of the model's own report
                assert f"- {sentence}" in report
            assert f"- **{block['slice']}**: {' '.join(block['headline'])}" in page_md
    compared = json.loads((out / "compare" / "base-vs-perturbed" / "findings.json").read_text())
    assert compared["group"] == "knowledge_type" and compared["slices"]
    compare_md = (out / "compare" / "base-vs-perturbed" / "compare.md").read_text(encoding="utf-8")
    for block in compared["slices"]:
        assert f"- **{block['slice']}**: {' '.join(block['headline'])}" in page_md
        assert all(f"- {x}" in compare_md for x in block["headline"])
    assert "Design:" not in page_md

    # --group on the command line: the analyses and the comparison rerun grouped by the id; the page says why
    # that is a poor grouping (one probe per group), and the patching is not redone
    assert main(["run", str(path), "-o", str(out), "--group", "bioasq_id", "--no-progress"]) == 0
    record = json.loads((out / "models" / "base" / "analysis" / "findings.json").read_text())
    assert record["group"] == "bioasq_id"
    assert json.loads((out / "compare" / "base-vs-perturbed" / "findings.json").read_text())["group"] == "bioasq_id"
    page_md = (out / "report.md").read_text(encoding="utf-8")
    assert f"- **base**: Design: {len(PROBES)} of {len(PROBES)} `bioasq_id` group(s) have fewer than 2 complete " \
           "probes" in page_md
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert stages["patch[base]"]["finished"] < stages["analyze[base]"]["finished"]
    assert not (out / LOCK_FILE).exists()


def test_unknown_group_stops_the_run_before_patching(tmp_path, model_dirs, capsys):  # noqa: F811
    write_probes(tmp_path / "probes.jsonl", WITH_IDS)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs, compare=False).replace(
        "analysis: {position_reduction: last}", "analysis: {position_reduction: last, group: knowlege_type}"),
        encoding="utf-8")
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "analysis.group: 'knowlege_type' is not a label of the probes; did you mean 'knowledge_type'?" in err
    assert not (tmp_path / "out" / "models" / "base" / "results.parquet").exists()
    assert not list((tmp_path / "out").glob("models/*/.partial/*/*.parquet"))
    assert not (tmp_path / "out" / LOCK_FILE).exists()
