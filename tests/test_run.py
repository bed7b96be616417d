"""``clap run``: a whole study (two tiny GPT-2 models) through every stage, caching, reruns, interruption, and the
YAML / Python / CLI equivalence; plus unit tests of the stage hashes."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from clap.app.pipeline import _Planner, load_study, run_study, stage_record
from clap.app.stages import StageStore, digest, file_digest, locked, tree_digest
from clap.app.study_file import StudyFile
from clap.errors import ClapError
from tests.tiny_tokenizer import tiny_tokenizer

HAS_COMPARE = importlib.util.find_spec("analyses.compare") is not None

PROBES = [
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Migraine is a chronic disorder of the",
     "answer": " brain", "wrong": " head", "knowledge_type": "definitional"},
    {"id": "fr", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
     "answer": " Paris", "wrong": " Madrid", "knowledge_type": "definitional"},
    {"id": "vpa", "clean": "Valproate treats", "corrupted": "Aspirin treats",
     "answer": " seizures", "wrong": " pain", "knowledge_type": "associative"},
    {"id": "eth", "clean": "Ethosuximide is a drug used to treat", "corrupted": "Amlodipine is a drug used to treat",
     "answer": " epilepsy", "wrong": " hypertension", "knowledge_type": "associative"},
]


def write_probes(path: Path, probes: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in probes), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory):
    """A tiny GPT-2 and a perturbed copy (every weight plus seeded noise), saved as model folders."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for probe in PROBES:  # the test's probes are token-aligned under the test tokenizer
        assert len(tokenizer(probe["clean"]).input_ids) == len(tokenizer(probe["corrupted"]).input_ids)
    torch.manual_seed(7)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=len(tokenizer))
    model = GPT2LMHeadModel(config).eval()
    root = tmp_path_factory.mktemp("models")
    base, perturbed = root / "base", root / "perturbed"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(perturbed)
    tokenizer.save_pretrained(perturbed)
    return base, perturbed


def study_text(base: Path, perturbed: Path, compare: bool = HAS_COMPARE, figures: bool = False) -> str:
    return f"""
name: tiny-run
models:
  base: {{source: {base}}}
  perturbed: {{source: {perturbed}}}
probes:
  file: probes.jsonl
patches:
  - sites: ["layers[*].resid_pre", "layers[*].mlp_out"]
    positions: [last]
metrics: [logit_diff]
seed: 3
execution: {{max_rows: 64, progress: false}}
analysis: {{position_reduction: last}}
report: {{figures: {str(figures).lower()}}}
""" + ("compare: [base, perturbed]\n" if compare else "")


@pytest.fixture
def study(tmp_path, model_dirs):
    write_probes(tmp_path / "probes.jsonl", PROBES)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs), encoding="utf-8")
    return path


def lines() -> tuple[list[str], callable]:
    seen: list[str] = []
    return seen, seen.append


def hf_logit_diff(folder: Path, tokenizer, probe: dict, prompt: str) -> float:
    """Independent: a plain transformers forward of the unpadded prompt."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(probe[prompt]).input_ids])).logits[0, -1]
    answer, wrong = tokenizer(probe["answer"]).input_ids[0], tokenizer(probe["wrong"]).input_ids[0]
    return float(logits[answer] - logits[wrong])


def test_whole_study_runs_then_skips_then_reruns_what_changed(study, tmp_path, model_dirs, tokenizer):
    out = tmp_path / "out"
    seen, echo = lines()
    result = run_study(study, out, echo=echo)
    expected = ["patch[base]", "patch[perturbed]", "analyze[base]", "analyze[perturbed]"]
    expected += ["compare[base-vs-perturbed]"] if HAS_COMPARE else []
    expected += ["report"]
    assert list(result.stages) == expected
    assert set(result.stages.values()) == {"ran"}
    assert any(line.startswith(f"stage 1/{len(expected)} patch[base]: done in") for line in seen)
    for name, folder in zip(("base", "perturbed"), model_dirs, strict=True):  # each stage patched its own model
        frame = result.frame(name)
        for probe in PROBES:
            rows = frame[frame.probe_id == probe["id"]]
            assert rows["clean"].iloc[0] == pytest.approx(hf_logit_diff(folder, tokenizer, probe, "clean"), abs=1e-4)
            assert rows["corrupted"].iloc[0] == pytest.approx(hf_logit_diff(folder, tokenizer, probe, "corrupted"),
                                                              abs=1e-4)
    assert (out / "models" / "base" / "analysis" / "report.html").is_file()
    assert (out / "report.html").is_file() and "analysis/report.html" in (out / "report.md").read_text()
    # the localization measures of both models, from each model's own table
    study_md = (out / "report.md").read_text()
    for name in ("base", "perturbed"):
        groups = pd.read_csv(out / "models" / name / "analysis" / "localization_groups.csv")
        pr = groups[(groups["measure"] == "eff_layers_pr") & (groups["site_kind"] == "mlp_out")].iloc[0]
        assert f"### {name}" in study_md
        assert f"{pr['mean']:.3f} [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]" in study_md
    records = stage_record(out)
    assert all(records[s]["status"] == "done" for s in expected)

    seen.clear()  # a second run: nothing changed, nothing runs
    again = run_study(study, out, echo=echo)
    assert set(again.stages.values()) == {"up to date"}
    assert f"stage 1/{len(expected)} patch[base]: up to date" in seen
    assert stage_record(out) == records

    os.utime(study.parent / "probes.jsonl")  # a touch without a change of content changes no hash
    assert set(run_study(study, out, echo=echo).stages.values()) == {"up to date"}

    changed = [dict(PROBES[0], wrong=" skin"), *PROBES[1:]]  # a changed probe file: patching and everything after
    write_probes(study.parent / "probes.jsonl", changed)
    third = run_study(study, out, echo=echo)
    assert [s for s, status in third.stages.items() if status == "ran"] == expected
    ep = third.frame("base").query("probe_id == 'ep'")
    assert ep["clean"].iloc[0] == pytest.approx(hf_logit_diff(model_dirs[0], tokenizer, changed[0], "clean"), abs=1e-4)

    text = study.read_text().replace("position_reduction: last", "position_reduction: max")
    study.write_text(text)  # an analysis option: the analyses and the report only, not the patching
    fourth = run_study(study, out, echo=echo)  # compare reduces each probe by the same options, so it reruns too
    assert {s for s, status in fourth.stages.items() if status == "ran"} == {
        "analyze[base]", "analyze[perturbed]", "report"} | ({"compare[base-vs-perturbed]"} if HAS_COMPARE else set())


def test_interrupted_run_keeps_finished_stages(study, tmp_path, monkeypatch):
    import analyses.report

    out = tmp_path / "out"
    real = analyses.report.write_report

    def failing(results_dir, *args, **kwargs):
        if Path(results_dir).name == "perturbed":
            raise RuntimeError("interrupted")
        return real(results_dir, *args, **kwargs)

    monkeypatch.setattr(analyses.report, "write_report", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_study(study, out, echo=lambda line: None)
    records = stage_record(out)
    assert {s for s, r in records.items() if r["status"] == "done"} == {"patch[base]", "patch[perturbed]",
                                                                        "analyze[base]"}
    assert records["analyze[perturbed]"]["status"] == "running"
    monkeypatch.setattr(analyses.report, "write_report", real)
    seen, echo = lines()
    result = run_study(study, out, echo=echo)
    ran = {s for s, status in result.stages.items() if status == "ran"}
    assert ran == {"analyze[perturbed]", "report"} | ({"compare[base-vs-perturbed]"} if HAS_COMPARE else set())
    assert any("analyze[perturbed]: resuming" in line for line in seen)


def test_force_and_until(study, tmp_path):
    out = tmp_path / "out"
    first = run_study(study, out, until="patch", echo=lambda line: None)
    assert list(first.stages) == ["patch[base]", "patch[perturbed]"]
    forced = run_study(study, out, force=["patch[perturbed]"], until="analyze", echo=lambda line: None)
    assert forced.stages == {"patch[base]": "up to date", "patch[perturbed]": "ran", "analyze[base]": "ran",
                             "analyze[perturbed]": "ran"}
    with pytest.raises(ClapError, match=r"--force pach: no such stage.*did you mean.*patch"):
        run_study(study, out, force=["pach"], echo=lambda line: None)


def test_yaml_python_and_cli_give_identical_results(study, tmp_path, model_dirs):
    from clap.app.cli import main

    yaml_run = run_study(study, tmp_path / "yaml", until="patch", echo=lambda line: None)
    assert main(["run", str(study), "-o", str(tmp_path / "cli"), "--until", "patch", "--no-progress"]) == 0
    base, perturbed = model_dirs
    spec = StudyFile(
        name="tiny-run", models={"base": {"source": str(base)}, "perturbed": {"source": str(perturbed)}},
        probes={"file": str(study.parent / "probes.jsonl")}, metrics=["logit_diff"], seed=3,
        patches=[{"sites": ["layers[*].resid_pre", "layers[*].mlp_out"], "positions": ["last"]}],
        execution={"max_rows": 64, "progress": False},
    )
    python_run = run_study(spec, tmp_path / "python", until="patch", echo=lambda line: None)
    for name in ("base", "perturbed"):
        frame = yaml_run.frame(name)
        assert len(frame) == len(PROBES) * 4
        pd.testing.assert_frame_equal(frame, pd.read_parquet(tmp_path / "cli" / "models" / name / "results.parquet"))
        pd.testing.assert_frame_equal(frame, python_run.frame(name))
    assert not yaml_run.frame("base")["patched"].equals(yaml_run.frame("perturbed")["patched"])


# ----------------------------------------------------------------------------------------------- stage hashes
def test_digest_is_canonical():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_file_and_tree_digests_follow_content(tmp_path):
    import hashlib

    f = tmp_path / "x.txt"
    f.write_text("one")
    assert file_digest(f) == hashlib.sha256(b"one").hexdigest()
    os.utime(f, (1, 1))
    assert file_digest(f) == hashlib.sha256(b"one").hexdigest()
    f.write_text("two")
    assert file_digest(f) == hashlib.sha256(b"two").hexdigest()
    before = tree_digest(tmp_path)
    (tmp_path / ".hidden").write_text("ignored")
    assert tree_digest(tmp_path) == before
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y").write_text("y")
    assert tree_digest(tmp_path) != before


def test_stage_store_round_trip_and_lock(tmp_path):
    store = StageStore(tmp_path)
    store.mark_running("patch[a]", "h1")
    assert not StageStore(tmp_path).is_done("patch[a]", "h1")
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "a" / "results.parquet").write_bytes(b"rows")
    store.mark_done("patch[a]", "h1", 1.5, [tmp_path / "models" / "a"])
    again = StageStore(tmp_path)
    assert again.stages["patch[a]"]["outputs"] == ["models/a"]
    assert again.stages["patch[a]"]["files"]["models/a/results.parquet"]["size"] == 4
    assert again.is_done("patch[a]", "h1") and not again.is_done("patch[a]", "h2")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "stages.json").write_text("{broken")
    with pytest.raises(ClapError, match="unreadable stage record"):
        StageStore(tmp_path)
    with locked(tmp_path):
        with pytest.raises(ClapError, match="another `clap run` is writing"):
            with locked(tmp_path):
                pass


def _hashes(text: str, folder: Path) -> dict[str, str]:
    path = folder / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return {s.name: s.hash for s in _Planner(StudyFile.from_yaml(path), folder / "out", False).plan()}


def test_stage_hashes_change_with_their_inputs_only(tmp_path, model_dirs):
    write_probes(tmp_path / "probes.jsonl", PROBES)
    text = study_text(*model_dirs, compare=False)
    base = _hashes(text, tmp_path)
    rows = _hashes(text.replace("max_rows: 64", "max_rows: 8"), tmp_path)
    assert rows == base  # batch size does not change results
    metric = _hashes(text.replace("metrics: [logit_diff]", "metrics: [logit_diff, prob]"), tmp_path)
    assert all(metric[s] != base[s] for s in base)
    analysis = _hashes(text.replace("position_reduction: last", "position_reduction: max"), tmp_path)
    assert {s for s in base if analysis[s] != base[s]} == {"analyze[base]", "analyze[perturbed]", "report"}
    swapped = _hashes(text.replace(f"perturbed: {{source: {model_dirs[1]}}}",
                                   f"perturbed: {{source: {model_dirs[0]}}}"), tmp_path)
    assert {s for s in base if swapped[s] != base[s]} == {"patch[perturbed]", "analyze[perturbed]", "report"}


def test_study_file_errors_name_file_line_and_field(tmp_path, model_dirs):
    write_probes(tmp_path / "probes.jsonl", PROBES)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs, compare=False) + "compare: [base, perturbd]\n")
    with pytest.raises(ClapError, match=r"study.yaml:\d+: compare: unknown model 'perturbd'; did you mean 'perturbed'"):
        StudyFile.from_yaml(path)
    text = study_text(*model_dirs, compare=False).replace("metrics:", "metrix:")
    path.write_text(text)
    line = text.splitlines().index("metrix: [logit_diff]") + 1
    with pytest.raises(ClapError, match=rf"study.yaml:{line}: metrix: unknown field 'metrix'; did you mean 'metrics'"):
        StudyFile.from_yaml(path)
    path.write_text(study_text(*model_dirs, compare=False) + "cross_model: {source: base, target: perturbd}\n")
    with pytest.raises(ClapError, match=r"study.yaml:\d+: cross_model.target: unknown model 'perturbd'; did you "
                                        r"mean 'perturbed'"):
        StudyFile.from_yaml(path)
    path.write_text(study_text(*model_dirs, compare=False)
                    + "cross_model: {source: base, target: perturbed, operations: [zero]}\n")
    with pytest.raises(ClapError, match=r"study.yaml:\d+: cross_model: source_model: operation 'zero' does not read "
                                        r"the source run"):
        StudyFile.from_yaml(path)
    path.write_text(study_text(*model_dirs, compare=False))
    with pytest.raises(ClapError, match=r"--model bse=x: the study has no model 'bse'; did you mean 'base'"):
        load_study(path, {"bse": "x"})


@pytest.mark.slow
def test_full_study_with_figures_and_comparison(tmp_path, model_dirs):
    write_probes(tmp_path / "probes.jsonl", PROBES)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs, compare=True, figures=True), encoding="utf-8")
    result = run_study(path, tmp_path / "out", echo=lambda line: None)
    assert set(result.stages.values()) == {"ran"} and "compare[base-vs-perturbed]" in result.stages
    out = tmp_path / "out"
    assert list((out / "models" / "base" / "analysis" / "figures").glob("*.png"))
    paired = pd.read_csv(out / "compare" / "base-vs-perturbed" / "paired_differences.csv")
    assert len(paired) and "compare/base-vs-perturbed/compare.html" in (out / "report.md").read_text()


def test_study_file_errors_found_later_name_the_file_and_line(tmp_path):
    """A study file keeps its path and line map like a patching spec, so a device error (checked when the stage
    runs) names ``file:line: execution.device``; the study file's own reader used to drop them."""
    from clap.app.study_file import StudyFile

    path = tmp_path / "study.yaml"
    path.write_text("name: s\nmodels:\n  a: {source: smollm2-135m}\nprobes:\n  inline:\n"
                    "    - {id: p, clean: x y, corrupted: x z, answer: ' y', wrong: ' z'}\n"
                    "sites: ['layers[0].resid_pre']\nexecution:\n  device: gpu\n", encoding="utf-8")
    study = StudyFile.from_yaml(path)
    assert study.where(("execution", "device")) == f"{path}:9: execution.device"


# ----------------------------------------------------------------------------------------------- cross-model
CROSS = "cross_model: {source: perturbed, target: base, sites: ['layers[*].resid_pre'], corrupted_prompt: clean}\n"


def test_cross_model_section_runs_end_to_end_and_equals_hooks(tmp_path, model_dirs, tokenizer):
    """`cross_model:` in a study file: patch[cross:...] and its analysis run; YAML, Python and CLI give identical
    frames; every number equals plain hooks (the perturbed model's block input at the last token written into the
    base model's run of the same prompt)."""
    from transformers import GPT2LMHeadModel

    from clap.app.cli import main
    from tests.interventions import reference as ref

    write_probes(tmp_path / "probes.jsonl", PROBES)
    path = tmp_path / "study.yaml"
    path.write_text(study_text(*model_dirs, compare=False) + CROSS, encoding="utf-8")
    yaml_run = run_study(path, tmp_path / "yaml", echo=lambda line: None)
    assert yaml_run.stages["patch[cross:perturbed-into-base]"] == "ran"
    assert yaml_run.stages["analyze[cross:perturbed-into-base]"] == "ran"
    folder = tmp_path / "yaml" / "cross" / "perturbed-into-base"
    assert (folder / "analysis" / "report.html").is_file()
    assert "cross:perturbed-into-base" in (tmp_path / "yaml" / "report.md").read_text()
    assert "Cross-model patching" in (folder / "analysis" / "report.html").read_text()
    frame = pd.read_parquet(folder / "results.parquet")
    meta = json.loads((folder / "run.json").read_text())
    assert meta["source_model"]["source"].endswith("perturbed") and meta["model"]["source"].endswith("base")

    base, perturbed = (GPT2LMHeadModel.from_pretrained(f).eval() for f in model_dirs)
    for probe in PROBES:
        ids = tokenizer(probe["clean"]).input_ids
        answer, wrong = tokenizer(probe["answer"]).input_ids, tokenizer(probe["wrong"]).input_ids
        base_ld = ref.metrics(ref.run(base, ids), answer, wrong, ref.run(base, ids))["logit_diff"]
        tuned_ld = ref.metrics(ref.run(perturbed, ids), answer, wrong, ref.run(perturbed, ids))["logit_diff"]
        for layer in range(2):
            path_ = f"transformer.h.{layer}"
            value = ref.capture(perturbed, ids, path_, "input")[[len(ids) - 1]]
            logits = ref.run(base, ids, [(path_, "input", ref.replace_edit(value, [len(ids) - 1], None, None))])
            patched = float(logits[answer].mean() - logits[wrong].mean())
            row = frame[(frame.probe_id == probe["id"]) & (frame.layer == layer)].iloc[0]
            assert row.patched == pytest.approx(patched, abs=1e-5)
            assert row.clean == pytest.approx(base_ld, abs=1e-5) and row.corrupted == pytest.approx(base_ld, abs=1e-5)
            assert row.source_model_clean == pytest.approx(tuned_ld, abs=1e-5)
            assert row.recovery == pytest.approx((patched - base_ld) / (tuned_ld - base_ld),
                                                 abs=4e-5 / abs(tuned_ld - base_ld))

    assert main(["run", str(path), "-o", str(tmp_path / "cli"), "--until", "patch", "--no-progress"]) == 0
    study = StudyFile(
        name="tiny-run", models={"base": {"source": str(model_dirs[0])}, "perturbed": {"source": str(model_dirs[1])}},
        probes={"file": str(tmp_path / "probes.jsonl")}, metrics=["logit_diff"], seed=3,
        patches=[{"sites": ["layers[*].resid_pre", "layers[*].mlp_out"], "positions": ["last"]}],
        execution={"max_rows": 64, "progress": False},
        cross_model={"source": "perturbed", "target": "base", "sites": ["layers[*].resid_pre"],
                     "corrupted_prompt": "clean"},
    )
    python_run = run_study(study, tmp_path / "python", until="patch", echo=lambda line: None)
    assert python_run.stages["patch[cross:perturbed-into-base]"] == "ran"
    for other in ("cli", "python"):
        pd.testing.assert_frame_equal(frame, pd.read_parquet(
            tmp_path / other / "cross" / "perturbed-into-base" / "results.parquet"))
    again = run_study(path, tmp_path / "yaml", echo=lambda line: None)
    assert again.stages["patch[cross:perturbed-into-base]"] == "up to date"


def test_corruption_rules_do_not_empty_a_same_prompt_cross_model_analysis(tmp_path, model_dirs):
    """`require_flip` judges a probe's corruption; a same-prompt cross-model stage has none (clean == corrupted),
    so the rule would exclude every probe there: it applies to the per-model stages only. `min_abs_diff` judges the
    recovery's denominator, which across models is |source model - target model|, not |clean - corrupted| = 0."""
    write_probes(tmp_path / "probes.jsonl", PROBES)
    text = study_text(*model_dirs, compare=False).replace(
        "analysis: {position_reduction: last}", "analysis: {position_reduction: last, min_abs_diff: 1.0e-9}")
    assert "min_abs_diff" in text
    path = tmp_path / "study.yaml"
    path.write_text(text + CROSS, encoding="utf-8")
    run_study(path, tmp_path / "out", echo=lambda line: None)
    cross = pd.read_csv(tmp_path / "out" / "cross" / "perturbed-into-base" / "analysis" / "probe_validity.csv")
    assert len(cross) == len(PROBES) and not cross["excluded"].any()


def test_stage_with_missing_or_edited_outputs_is_not_up_to_date(study, tmp_path, model_dirs, tokenizer):
    """Deleting (or editing) a finished stage's output reruns that stage and what reads it; an edit that keeps
    size and mtime (``cp -p``) is caught by the stage record's digest."""
    out = tmp_path / "out"
    run_study(study, out, until="analyze", echo=lambda line: None)
    record = stage_record(out)["patch[base]"]
    assert set(record["files"]) == {"models/base/results.parquet", "models/base/run.json"}
    results = out / "models" / "base" / "results.parquet"
    results.unlink()
    seen, echo = lines()
    again = run_study(study, out, until="analyze", echo=echo)
    assert {s for s, status in again.stages.items() if status == "ran"} == {"patch[base]", "analyze[base]"}
    assert "stage 1/4 patch[base]: running (its outputs changed: models/base/results.parquet is missing)" in seen
    frame = again.frame("base")
    probe = PROBES[1]
    fr = frame[frame.probe_id == probe["id"]]
    assert fr["clean"].iloc[0] == pytest.approx(hf_logit_diff(model_dirs[0], tokenizer, probe, "clean"), abs=1e-4)

    report = out / "models" / "perturbed" / "analysis" / "report.md"
    stat = report.stat()
    text = report.read_text()
    report.write_text(text.replace("|", "!", 1))  # same size, mtime put back as `cp -p` / `touch -r` would
    os.utime(report, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    seen.clear()
    third = run_study(study, out, until="analyze", echo=echo)
    assert {s for s, status in third.stages.items() if status == "ran"} == {"analyze[perturbed]"}
    assert any("analyze[perturbed]: running (its outputs changed: models/perturbed/analysis/report.md changed)" in line
               for line in seen)
    assert report.read_text() == text
    assert set(run_study(study, out, until="analyze", echo=echo).stages.values()) == {"up to date"}


def test_patch_stage_whose_inputs_changed_never_resumes_stale_batches(study, tmp_path, model_dirs, tokenizer):
    """A patch stage interrupted, then its weights edited in place keeping size and mtime (``cp -p``): the stage
    hash changes, and the rerun must not pick up the batches of the old weights (it discards them)."""
    import shutil

    from clap.app import pipeline
    from interventions.study import Study

    base_copy = tmp_path / "base-model"
    shutil.copytree(model_dirs[0], base_copy)
    text = study.read_text().replace(str(model_dirs[0]), str(base_copy)).replace("max_rows: 64", "max_rows: 4")
    study.write_text(text)
    out = tmp_path / "out"
    real_run = Study._run

    def interrupted(self, folder):  # two batches finish, the third is interrupted
        calls = {"n": 0}
        real_batch = self.executor.run_batch

        def counting(batch, **options):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt
            return real_batch(batch, **options)

        self.executor.run_batch = counting  # this study's executor only
        return real_run(self, folder)

    Study._run = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(study, out, until="patch[base]", echo=lambda line: None)
    finally:
        Study._run = real_run
    partial = out / "models" / "base" / ".partial"
    assert len(list(partial.glob("*/batch-*.parquet"))) == 2

    weights = base_copy / "model.safetensors"  # new weights, same size, old mtime put back
    stat = weights.stat()
    edited = tmp_path / "edited"
    shutil.copytree(model_dirs[1], edited)
    shutil.copyfile(edited / "model.safetensors", weights)
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    pipeline.file_digest.__globals__["_FILE_MEMO"].clear()  # a new process would not have it either

    result = run_study(study, out, until="patch[base]", echo=lambda line: None)
    assert not partial.exists()
    frame = result.frame("base")
    for probe in PROBES:  # every row is the edited weights' (those of the perturbed model)
        rows = frame[frame.probe_id == probe["id"]]
        assert rows["clean"].iloc[0] == pytest.approx(hf_logit_diff(model_dirs[1], tokenizer, probe, "clean"),
                                                      abs=1e-4)
    perturbed = run_study(study, tmp_path / "ref", until="patch[perturbed]", echo=lambda line: None)
    pd.testing.assert_frame_equal(frame, perturbed.frame("perturbed"), check_exact=False, atol=1e-5)
