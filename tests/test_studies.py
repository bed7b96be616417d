"""The shipped studies in studies/: they validate, the causal trace has ROME's settings, pending sections are refused
clearly, and the runnable ones run on a tiny local GPT-2 (the real models need the network, NDIF or real weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clap.app.pipeline import run_study
from clap.app.study_file import StudyFile
from clap.contract import read_results
from clap.errors import ClapError
from tests.conftest import gpt2_tokenizer

STUDIES = Path(__file__).resolve().parents[1] / "studies"
NAMES = ["epilepsy-paper", "epilepsy-layers", "epilepsy-finetune", "epilepsy-trace", "ndif-llama-70b"]


@pytest.fixture(scope="module")
def tiny_dir(shared_data, tmp_path_factory):
    """A tiny GPT-2 with the real GPT-2 tokenizer: the shipped probe sets are token-aligned under it (not under the
    tests' tiny tokenizer, where some pairs differ in word count), so these tests need ``../shared``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer(shared_data)
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_shipped_study_validates_and_reads_both_probe_sets(name):
    study = StudyFile.from_yaml(STUDIES / f"{name}.yaml")
    assert [Path(f).name for f in study.probes.files] == ["definitional.jsonl", "associative.jsonl"]


def test_trace_study_has_romes_settings():
    from interventions.spec import ModelSpec

    study = StudyFile.from_yaml(STUDIES / "epilepsy-trace.yaml")
    assert study.pending() == []
    spec = study.patch_spec(ModelSpec(source="smollm2-135m"), Path("probes.jsonl"))
    assert spec.corrupted_prompt == "clean" and spec.samples == 10 and spec.metrics == ["prob"]
    noise = spec.baseline[0]
    assert noise.sites == ["embed"] and noise.positions[0].field == "subject"
    assert (noise.operation.name, noise.operation.scale, noise.operation.relative_to) == ("noise", 3, "selected_std")
    assert [(g.sites, g.window) for g in spec.patches] == [
        (["layers[*].resid_post"], 1), (["layers[*].mlp_out"], 10), (["layers[*].attn_out"], 10)]


def test_finetune_study_patches_the_finetuned_model_into_the_base_model(tmp_path):
    from clap.app.pipeline import _Planner

    study = StudyFile.from_yaml(STUDIES / "epilepsy-finetune.yaml")
    (section,) = study.cross_runs().values()
    assert (section.source, section.target, section.corrupted_prompt) == ("finetuned", "base", "clean")
    stages = [s.name for s in _Planner(study, tmp_path / "out", False).plan()]
    assert "patch[cross:finetuned-into-base]" in stages and "analyze[cross:finetuned-into-base]" in stages
    from interventions.spec import ModelSpec

    base, tuned = (ModelSpec(source=study.models[n].source) for n in ("base", "finetuned"))
    spec = study.cross_spec(section, base, tuned, Path("p.jsonl"))
    assert spec.source_model.source == "smollm2-135m-epilepsy" and spec.model.source == "smollm2-135m"
    assert spec.sites == ["layers[*].resid_pre"] and spec.patches is None and spec.positions == ["last"]


def test_paper_study_model_is_one_line_and_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines = [line for line in (STUDIES / "epilepsy-paper.yaml").read_text().splitlines()
             if "openai-community/gpt2" in line and not line.startswith("#")]
    assert lines == ["  paper: {source: openai-community/gpt2}"]
    with pytest.raises(ClapError, match="offline|network|hub"):
        run_study(STUDIES / "epilepsy-paper.yaml", tmp_path / "out", until="patch", echo=lambda line: None)


@pytest.mark.slow
def test_paper_study_on_tiny_gpt2_flags_the_traps(tiny_dir, tmp_path):
    from analyses.caveats import design_caveats
    from analyses.io import load_results

    # until patch: `clap analyze` refuses one layer test over raw modules of different roles (analyses/select.py)
    result = run_study(STUDIES / "epilepsy-paper.yaml", tmp_path / "out", models={"paper": str(tiny_dir)},
                       progress=False, until="patch", echo=lambda line: None)
    frame = result.frame("paper")
    assert set(frame["positions"]) == {"all"} and {"logit", "logit_diff"} == set(frame["metric"])
    lm_head = frame[(frame.site == "lm_head") & frame.recovery_defined]
    assert lm_head["trivial"].all() and lm_head["recovery"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    block = frame[(frame.site == "transformer.h.0") & frame.recovery_defined]  # the whole residual stream
    assert block["recovery"].to_numpy() == pytest.approx(1.0, abs=1e-4)
    report = "\n".join(design_caveats(*load_results(tmp_path / "out" / "models" / "paper")))
    assert "recover 100 % by construction (lm_head, transformer.h.1, transformer.ln_f)" in report  # h.1: last block
    assert "reproduce the clean run exactly for every probe (transformer.h.0, transformer.wte)" in report
    assert "`transformers.pytorch_utils.Conv1D`: a linear projection" in report


@pytest.mark.slow
def test_ndif_study_runs_under_local_simulation(tiny_dir, tmp_path):
    result = run_study(STUDIES / "ndif-llama-70b.yaml", tmp_path / "out", models={"model": str(tiny_dir)},
                       remote="local", until="patch", progress=False, echo=lambda line: None)
    local = run_study(STUDIES / "ndif-llama-70b.yaml", tmp_path / "plain", models={"model": str(tiny_dir)},
                      remote=False, until="patch", progress=False, echo=lambda line: None)
    remote_frame, plain = result.frame("model"), local.frame("model")
    assert len(remote_frame) == 93 * 3 * 2
    assert remote_frame["patched"].to_numpy() == pytest.approx(plain["patched"].to_numpy(), abs=1e-4)


@pytest.mark.slow
def test_layers_study_on_tiny_gpt2(tiny_dir, tmp_path):
    result = run_study(STUDIES / "epilepsy-layers.yaml", tmp_path / "out", models={"model": str(tiny_dir)},
                       progress=False, until="patch", echo=lambda line: None)
    frame = result.frame("model")
    assert set(frame["site_kind"]) == {"resid_pre", "attn_out", "mlp_out", "head"}
    assert set(frame["knowledge_type"]) == {"definitional", "associative"} and frame.probe_id.nunique() == 93


def test_additivity_ablation_study_validates_and_derives_its_ablation_spec():
    from interventions.derived import ablation_spec
    from interventions.spec import ModelSpec

    study = StudyFile.from_yaml(STUDIES / "epilepsy-additivity-ablation.yaml")
    assert study.probes.file == "package:clap/data/demo_probes.jsonl"
    assert study.additivity.kinds == ["attn_out", "mlp_out"] and study.additivity.top == [2, 3, 5]
    spec = ablation_spec(study.patch_spec(ModelSpec(source="smollm2-135m"), Path("probes.jsonl")), study.ablation)
    assert spec.ablates_clean_run and [op.name for op in spec.operations] == ["zero", "mean", "resample"]
    assert spec.patches[0].sites == ["layers[18:30].heads[*]", "layers[*].attn_out", "layers[*].mlp_out"]


DOMAIN_FILES = ["definitional.jsonl", "associative.jsonl", "encyclopedic.jsonl", "commonsense.jsonl",
                "compositional.jsonl"]


def test_domains_study_patches_every_layer_at_the_last_token_on_all_five_sets():
    from interventions.spec import ModelSpec

    study = StudyFile.from_yaml(STUDIES / "domains.yaml")
    assert [Path(f).name for f in study.probes.files] == DOMAIN_FILES and study.pending() == []
    spec = study.patch_spec(ModelSpec(source="smollm2-135m"), Path("probes.jsonl"))
    assert spec.model.source == "smollm2-135m" and spec.direction == "denoising" and spec.alignment == "strict"
    assert [(g.sites, g.positions) for g in spec.patches] == [
        (["layers[*].resid_pre", "layers[*].attn_out", "layers[*].mlp_out"], ["last"])]
    assert spec.analysis.require_flip and spec.analysis.min_clean_logit_diff == 0
    # the additivity check: each probe's top 3 and all 30 layers together, pairs among its top 3, no stacks
    assert (study.additivity.kinds, study.additivity.top, study.additivity.pairs, study.additivity.cumulative) == (
        ["attn_out", "mlp_out"], [3, 30], 3, False)


def test_small_domains_study_is_the_documented_subset_of_the_shipped_sets():
    """studies/domains-small.jsonl holds the lines its study file describes, unchanged: per topic and knowledge type
    8 probes (epilepsy: the demo's first 8 of each type; encyclopedic, commonsense: evenly spaced; compositional: 8
    evenly spaced two-hop probes and their one-hop parts); the study is domains.yaml with these probes."""
    import json

    import numpy as np

    from interventions.spec import ModelSpec

    data = STUDIES.parent / "clap" / "data"

    def lines(name: str) -> list[str]:
        return [line for line in (data / "probes" / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    def spaced(items: list[str]) -> list[str]:
        return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, 8).round().astype(int))]

    def kind(line: str) -> str:
        return json.loads(line)["knowledge_type"]

    demo = [json.loads(line)["id"] for line in (data / "demo_probes.jsonl").read_text().splitlines() if line.strip()]
    expected = []
    for name in ("definitional.jsonl", "associative.jsonl"):
        expected += [line for line in lines(name) if json.loads(line)["id"] in demo][:8]
    for name in ("encyclopedic.jsonl", "commonsense.jsonl"):
        for k in ("definitional", "associative"):
            expected += spaced([line for line in lines(name) if kind(line) == k])
    chains = lines("compositional.jsonl")
    composed = spaced([line for line in chains if kind(line) == "two_hop"])
    hops = {h for line in composed for h in json.loads(line)["composes"]}
    expected += [line for line in chains if json.loads(line)["id"] in hops] + composed
    assert (STUDIES / "domains-small.jsonl").read_text(encoding="utf-8").splitlines() == expected
    assert len(expected) == 69
    small, full = StudyFile.from_yaml(STUDIES / "domains-small.yaml"), StudyFile.from_yaml(STUDIES / "domains.yaml")
    model = ModelSpec(source="smollm2-135m")
    a = small.patch_spec(model, Path("probes.jsonl")).to_dict()
    b = full.patch_spec(model, Path("probes.jsonl")).to_dict()
    assert {k: v for k, v in a.items() if k not in ("name", "execution", "probes")} == {
        k: v for k, v in b.items() if k not in ("name", "execution", "probes")}
    assert small.additivity == full.additivity


def test_dry_run_checks_the_domains_study_on_a_tiny_gpt2_and_writes_nothing(tiny_dir, tmp_path, capsys):
    """Every probe of the five sets tokenises to equal lengths and one-token answers under GPT-2's tokenizer, the
    labels agree across files, and the sites resolve: the stages are listed, no output folder appears."""
    from clap.app.cli import main
    from clap.app.pipeline import check_study

    stages = check_study(STUDIES / "domains.yaml", models={"model": str(tiny_dir)})
    assert stages == ["patch[model]", "patch[additivity:model]", "analyze[model]", "report"]
    out = tmp_path / "out"
    assert main(["run", str(STUDIES / "domains.yaml"), "-o", str(out), "--model", f"model={tiny_dir}",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1/4 patch[model]" in printed and "4 stages would run (nothing ran)" in printed
    assert not out.exists()


def test_dry_run_refuses_probe_files_whose_labels_differ(tiny_dir, tmp_path):
    """A file whose probes carry other labels than the rest fails the dry run, before any stage could run."""
    import json

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x-1", "category": "misc", "clean": "The capital of France is",
                                 "corrupted": "The capital of Italy is", "answer": " Paris", "wrong": " Rome"}) + "\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: mixed\nmodel: {source: smollm2-135m}\n"
                     "probes: {files: [package:clap/data/probes/commonsense.jsonl, other.jsonl]}\n"
                     "sites: ['layers[*].mlp_out']\npositions: [last]\n")
    from clap.app.pipeline import check_study

    with pytest.raises(ClapError, match="x-1 lacks field.*same label fields"):
        check_study(study, models={"model": str(tiny_dir)})


@pytest.mark.slow
def test_domains_study_patches_on_tiny_gpt2(tiny_dir, tmp_path):
    result = run_study(STUDIES / "domains.yaml", tmp_path / "out", models={"model": str(tiny_dir)},
                       progress=False, until="patch", echo=lambda line: None)
    frame = result.frame("model")
    # label columns are sorted by name and the first is `clap analyze`'s default group: knowledge_type
    assert read_results(result.results_dir("model"), validate=False)[1]["group_columns"] == [
        "knowledge_type", "subject", "topic"]
    assert set(frame["site_kind"]) == {"resid_pre", "attn_out", "mlp_out"} and set(frame["positions"]) == {"last"}
    assert set(frame["topic"]) == {"epilepsy", "encyclopedic", "commonsense", "compositional"}
    assert set(frame["knowledge_type"]) == {"definitional", "associative", "one_hop", "two_hop"}
    assert frame.probe_id.nunique() == 93 + 142 + 102 + 122
    assert len(frame) == frame.probe_id.nunique() * 3 * 2 * 2  # site kinds x layers x metrics
