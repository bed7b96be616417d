"""`clap probes check --study` on a `clap run` study file: every model it runs (a model it trains is named and left
out), probes from several files with their own files and lines, a probe valid only where it is valid on every
model, and `clap run`'s probe errors pointing to this command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clap.app.cli import main
from clap.app.study_file import StudyFile
from tests.interventions.test_probe_check import reference_logit_diff
from tests.test_run import PROBES, model_dirs, tokenizer, write_probes  # noqa: F401 - fixtures

MISMATCH = {"id": "mig", "clean": "Migraine is a chronic disorder of the",
            "corrupted": "Hypertension is a chronic disorder of the", "answer": " head", "wrong": " heart",
            "knowledge_type": "definitional"}


def study_file(folder: Path, base: Path, perturbed: Path, extra: str = "") -> Path:
    path = folder / "study.yaml"
    path.write_text(f"name: tiny\nmodels:\n  base: {{source: {base}}}\n  perturbed: {{source: {perturbed}}}\n"
                    f"probes:\n  files: [a.jsonl, b.jsonl]\nsites: ['layers[0].resid_pre']\nmetrics: [logit_diff]\n"
                    f"execution: {{progress: false}}\n{extra}")
    return path


def test_every_model_of_a_study_file_is_checked(tmp_path, model_dirs, tokenizer, capsys):  # noqa: F811
    from transformers import GPT2LMHeadModel

    base, perturbed = model_dirs
    write_probes(tmp_path / "a.jsonl", PROBES[:2])
    write_probes(tmp_path / "b.jsonl", PROBES[2:])
    study = study_file(tmp_path, base, perturbed)
    out, valid = tmp_path / "check.csv", tmp_path / "valid.jsonl"
    assert main(["probes", "check", "--study", str(study), "-o", str(out), "--write-valid", str(valid)]) == 0
    printed = capsys.readouterr().out
    assert f"== model base ({base}) ==" in printed and f"== model perturbed ({perturbed}) ==" in printed
    rows = list(csv.DictReader(out.open()))
    assert [(r["model"], r["id"]) for r in rows] == [(m, p["id"]) for m in ("base", "perturbed") for p in PROBES]
    assert [r["origin"] for r in rows[:4]] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2",
                                               f"{tmp_path / 'b.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:2"]
    for name, folder in (("base", base), ("perturbed", perturbed)):
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        for row, probe in zip([r for r in rows if r["model"] == name], PROBES, strict=True):
            for which in ("clean", "corrupted"):
                expected = reference_logit_diff(hf, tokenizer, probe[which], probe["answer"], probe["wrong"])
                assert float(row[f"{which}_logit_diff"]) == pytest.approx(expected, abs=1e-5)
    on_both = [p["id"] for p in PROBES if all(r["valid"] == "True" for r in rows if r["id"] == p["id"])]
    assert [json.loads(line)["id"] for line in valid.read_text().splitlines()] == on_both


def test_a_probe_is_written_valid_only_when_valid_on_every_model(tmp_path):
    import pandas as pd

    from interventions.probe_check_cli import write_valid
    from interventions.probes import read_probe_specs
    from interventions.spec import ProbeSetSpec

    path = write_probes(tmp_path / "a.jsonl", [p | {"pmids": [1, 2]} for p in PROBES[:3]])
    records = read_probe_specs(ProbeSetSpec(file=str(path)), tmp_path)
    origins = [origin for origin, _ in records]
    frame = pd.DataFrame({"model": ["base"] * 3 + ["tuned"] * 3, "origin": origins * 2,
                          "valid": [True, True, None, True, False, True]}, index=[0, 1, 2] * 2)  # record positions
    assert write_valid(records, frame, tmp_path / "v.jsonl") == 1
    assert [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()] == \
        [PROBES[0] | {"pmids": [1, 2]}]  # the source record, every field kept


def test_a_problem_names_its_own_file_and_line_and_clap_run_points_here(tmp_path, model_dirs, capsys):  # noqa: F811
    base, perturbed = model_dirs
    write_probes(tmp_path / "a.jsonl", PROBES[:2])
    write_probes(tmp_path / "b.jsonl", [PROBES[2], MISMATCH])
    study = study_file(tmp_path, base, perturbed)
    assert main(["run", str(study), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"clap probes check --study {study}" in err
    assert main(["probes", "check", "--study", str(study), "--structural-only", "-o", str(tmp_path / "c.csv")]) == 0
    rows = [r for r in csv.DictReader((tmp_path / "c.csv").open()) if r["model"] == "base"]
    assert [r["structural_ok"] for r in rows] == ["True", "True", "True", "False"]
    assert rows[3]["origin"] == f"{tmp_path / 'b.jsonl'}:2" and "clean is 7 tokens" in rows[3]["problems"]


def test_a_model_the_study_trains_is_named_and_left_out(tmp_path, model_dirs):  # noqa: F811
    from clap.app.probes import study_file_runs

    base, _ = model_dirs
    write_probes(tmp_path / "a.jsonl", PROBES[:2])
    write_probes(tmp_path / "b.jsonl", PROBES[2:])
    path = tmp_path / "study.yaml"
    path.write_text(f"name: tiny\nmodels:\n  base: {{source: {base}}}\n  tuned: {{finetuned: true}}\n"
                    f"probes:\n  files: [a.jsonl, b.jsonl]\nsites: ['layers[0].resid_pre']\n"
                    f"corpus: {{path: ./corpus}}\nfinetune: {{model: base}}\n")
    runs, notes = study_file_runs(path)
    assert [r.label for r in runs] == ["base"] and len(notes) == 1 and "'tuned' is trained" in notes[0]


def test_a_study_file_may_name_a_source_model(tmp_path):
    """`source_model:` (cross-model patching of each model) is a spec field a study file inherits; it loaded into a
    TypeError before."""
    (tmp_path / "p.jsonl").write_text(json.dumps(PROBES[0]) + "\n")
    path = tmp_path / "s.yaml"
    path.write_text("model: {source: gpt2}\nprobes: {file: p.jsonl}\nsites: [embed]\nsource_model: {source: distil}\n")
    study = StudyFile.from_yaml(path)
    assert study.source_model.source == "distil"


def test_probe_files_a_run_cannot_merge_are_refused_as_the_run_refuses_them(tmp_path, model_dirs, capsys):  # noqa: F811
    base, perturbed = model_dirs
    write_probes(tmp_path / "a.jsonl", PROBES[:2])
    (tmp_path / "b.jsonl").unlink(missing_ok=True)
    (tmp_path / "b.yaml").write_text("probes:\n" + "".join(f"  - {json.dumps(p)}\n" for p in PROBES[2:]))
    study = study_file(tmp_path, base, perturbed).read_text().replace("b.jsonl", "b.yaml")
    (tmp_path / "study.yaml").write_text(study)
    assert main(["probes", "check", "--study", str(tmp_path / "study.yaml"), "--structural-only"]) == 2
    assert "several probe files are concatenated line by line; use JSONL" in capsys.readouterr().err


def test_probes_on_one_yaml_line_keep_their_own_verdicts(tmp_path):
    """A flow-style YAML list gives every probe one origin line; the valid one is still the one written."""
    import pandas as pd

    from interventions.probe_check_cli import write_valid
    from interventions.probes import read_probe_specs
    from interventions.spec import ProbeSetSpec

    path = tmp_path / "p.yaml"
    path.write_text("probes: [" + ", ".join(json.dumps(p) for p in PROBES[:2]) + "]\n")
    records = read_probe_specs(ProbeSetSpec(file=str(path)), tmp_path)
    assert records[0][0] == records[1][0]
    frame = pd.DataFrame({"origin": [o for o, _ in records], "valid": [False, True]})
    assert write_valid(records, frame, tmp_path / "v.jsonl") == 1
    assert json.loads((tmp_path / "v.jsonl").read_text())["id"] == PROBES[1]["id"]
