"""`clap patch` end to end from a YAML file and a saved model directory; interrupted runs resume."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest

from clap.app.cli import main
from interventions.results import read_results
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-model")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


def write_spec(tmp_path, model_dir, extra=""):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({**{k: v for k, v in p.items() if k != "labels"}, **p["labels"]}) + "\n"
                              for p in PROBES))
    spec = tmp_path / "study.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: cli-study
        model:
          source: {model_dir}
        probes:
          file: probes.jsonl
        sites: ["layers[*].resid_pre", "layers[1].heads[*]"]
        positions: [last, all]
        operations: [replace, zero]
        metrics: [logit_diff, prob]
        execution:
          max_rows: 8
        """) + extra)
    return spec


def test_clap_patch_writes_results_and_sidecar(tmp_path, model_dir, tiny_gpt2, capsys):
    spec = write_spec(tmp_path, model_dir)
    out = tmp_path / "out"
    assert main(["patch", str(spec), "-o", str(out), "--no-progress"]) == 0
    assert "result rows" in capsys.readouterr().out
    frame, sidecar = read_results(out)
    n_cells = len(PROBES) * (3 + 4) * 2 * 2
    assert len(frame) == n_cells * 2
    assert sidecar["group_columns"] == ["knowledge_type"]
    assert sidecar["n_probes"] == 3 and sidecar["spec"]["name"] == "cli-study"
    assert sidecar["model"]["architecture"] == "GPT2LMHeadModel" and sidecar["versions"]["nnsight"]
    assert not (out / ".partial").exists()
    # the saved model gives the same numbers as the in-memory one (labels came from top-level JSONL keys)
    in_memory = Study(StudySpec.from_yaml(spec), model=tiny_gpt2).run()
    key = ["probe_id", "site", "positions", "operation", "metric"]
    merged = frame.merge(in_memory, on=key, suffixes=("", "_mem"))
    assert (merged.patched - merged.patched_mem).abs().max() < 1e-5
    assert (merged.knowledge_type == merged.knowledge_type_mem).all()


def test_interrupted_run_resumes_without_redoing_finished_batches(tmp_path, tiny_gpt2, batches):
    spec = StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre", "layers[*].mlp_out"],
        "positions": ["each"], "metrics": ["logit_diff"], "execution": {"max_rows": 10, "progress": False},
    })
    out = tmp_path / "out"
    batches.reset(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        Study(spec, model=tiny_gpt2).run(out)
    finished = sorted((out / ".partial").glob("*/batch-*.parquet"))
    assert len(finished) == 2
    batches.reset()
    resumed = Study(spec, model=tiny_gpt2).run(out)
    assert 0 not in batches.calls and 1 not in batches.calls and batches.calls[0] == 2
    fresh = Study(spec, model=tiny_gpt2).run()
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), fresh.reset_index(drop=True))


def test_yaml_probe_file_and_memory_budget_chunking(tmp_path, tiny_gpt2):
    import yaml

    probes = tmp_path / "probes.yaml"
    probes.write_text(yaml.safe_dump({"probes": PROBES}, sort_keys=False))
    base = {"model": {"source": "m"}, "probes": {"file": str(probes)}, "sites": ["layers[*].resid_pre"],
            "positions": ["each"], "metrics": ["logit_diff"]}
    one_pass = Study(StudySpec.from_dict({**base, "execution": {"max_rows": 500, "progress": False}}), model=tiny_gpt2)
    reference = one_pass.run(tmp_path / "one")
    # a budget of 0.5 MB allows only a few rows per pass (logits of 7 tokens x the vocabulary, activations of 3
    # layers): many passes, same numbers
    budget = Study(StudySpec.from_dict({**base, "execution": {"memory_budget_mb": 0.5, "progress": False}}),
                   model=tiny_gpt2)
    chunked = budget.run(tmp_path / "budget")
    _, sidecar = read_results(tmp_path / "budget")
    _, single = read_results(tmp_path / "one")
    assert single["n_batches"] == 1 and sidecar["n_batches"] > 5 and sidecar["max_rows"] < 10
    pd.testing.assert_frame_equal(chunked.drop(columns="recovery"), reference.drop(columns="recovery"), atol=1e-5)
    # recovery = (patched - corrupted) / (clean - corrupted), where the denominator is small for random weights: the
    # 1e-5 allowed on those values, divided by it
    np.testing.assert_array_equal(chunked.recovery.isna(), reference.recovery.isna())
    tolerance = 2e-5 / (reference.clean - reference.corrupted).abs() + 1e-4 * reference.recovery.abs()
    assert ((chunked.recovery - reference.recovery).abs().dropna() <= tolerance.dropna()).all()
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes:\n  - id: a\n    clean: x y\n    corupted: x z\n    answer: ' z'\n")
    with pytest.raises(Exception, match=rf"{bad}:4: corupted: unknown field 'corupted'; did you mean 'corrupted'"):
        Study(StudySpec.from_dict({**base, "probes": {"file": str(bad)}}), model=tiny_gpt2).run()


def test_remote_model_is_built_on_meta_without_weights_and_resolves_sites(model_dir):
    """remote: true never loads weights locally; the site machinery still works on the meta device."""
    from clap.models import load_remote_model
    from interventions.sites import SiteResolver

    model = load_remote_model(str(model_dir))
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}
    assert model.identity["weights_fingerprint"] is None and model.identity["architecture"] == "GPT2LMHeadModel"
    sites = SiteResolver(model.hf).resolve(["unembed", "layers[*].heads[0]", "layers[0].resid_pre"])
    assert [s.name for s in sites] == ["layers.0.resid_pre", "layers.0.heads.0", "layers.1.heads.0",
                                       "layers.2.heads.0", "unembed"]
    assert model.tokenizer.padding_side == "left"
