"""`clap patch` end to end from a YAML file and a saved model directory."""

from __future__ import annotations

import json
import textwrap

from clap.app.cli import main
from interventions.output import read_results
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


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
