"""Errors found before the weights load, each one line naming where it comes from: the output folder, the device,
site addresses (file, line, field), and model.source paths resolved against the spec's folder."""

from __future__ import annotations

import json
import re
import shutil
import textwrap

import pytest
import torch

from clap.app.cli import main
from clap.errors import ClapError
from interventions import resolved as resolved_module
from interventions.output import read_results
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-model")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the weights are loaded: the errors under test must come first."""
    monkeypatch.setattr(resolved_module, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))


def write_spec(folder, source, body="sites: [\"layers[*].resid_pre\"]\n", execution=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    spec = folder / "study.yaml"
    spec.write_text(f"name: s\nmodel:\n  source: {source}\nprobes:\n  file: probes.jsonl\n{body}"
                    f"execution:\n  progress: false\n{execution}")
    return spec


def run_cli(capsys, *argv):
    code = main(["patch", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return code, err


def test_output_path_that_is_a_file_is_refused_before_loading(tmp_path, model_dir, no_weights, capsys):
    spec = write_spec(tmp_path, model_dir)
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    code, err = run_cli(capsys, spec, "-o", taken)
    assert code == 2 and f"output folder {taken} is an existing file" in err
    code, err = run_cli(capsys, spec, "-o", taken / "sub")
    assert code == 2 and f"{taken} is a file" in err


def test_output_folder_without_write_permission_is_refused_before_loading(tmp_path, model_dir, no_weights, capsys,
                                                                          monkeypatch):
    import tempfile

    def denied(*args, **kwargs):  # tests run as root, where permission bits never deny a write
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    spec = write_spec(tmp_path, model_dir)
    code, err = run_cli(capsys, spec, "-o", tmp_path / "out")
    assert code == 2 and f"output folder {tmp_path / 'out'} is not writable: Permission denied" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_or_bad_device_names_the_setting(tmp_path, model_dir, no_weights, capsys):
    spec = write_spec(tmp_path, model_dir, execution="  device: cuda\n")
    code, err = run_cli(capsys, spec, "-o", tmp_path / "out")
    assert code == 2 and f"{spec}:9: execution.device: 'cuda' asks for CUDA, but no CUDA device" in err
    spec = write_spec(tmp_path, model_dir, execution="  device: gpu\n")
    code, err = run_cli(capsys, spec, "-o", tmp_path / "out")
    assert code == 2 and f"{spec}:9: execution.device: 'gpu' is not a device" in err
    spec = write_spec(tmp_path, model_dir)
    code, err = run_cli(capsys, spec, "-o", tmp_path / "out", "--device", "cuda:1")
    assert code == 2 and "--device: 'cuda:1' asks for CUDA" in err


@pytest.mark.parametrize(
    "address, line, field, message",
    [
        ("layers[1].mlpp", 10, "patches[1].sites[1]", r"unknown site 'layers\[1\].mlpp'"),
        ("layers[9].mlp_out", 10, "patches[1].sites[1]", r"layer 9 is out of range .* 3 layers"),
        ("layers[0].heads[4]", 10, "patches[1].sites[1]", r"head 4 is out of range .* 4 heads"),
        ("layers[2:1].attn_out", 10, "patches[1].sites[1]", r"layer selector '\[2:1\]' .* selects nothing"),
    ],
)
def test_site_errors_name_file_line_and_field_before_loading(tmp_path, model_dir, no_weights, address, line, field,
                                                             message):
    body = textwrap.dedent(f"""\
        patches:
          - sites: [embed]
          - sites:
              - layers[0].resid_pre
              - {address}
        """)
    spec = write_spec(tmp_path, model_dir, body=body)
    with pytest.raises(ClapError, match=rf"^{re.escape(str(spec))}:{line}: {re.escape(field)}: {message}"):
        Study(StudySpec.from_yaml(spec)).run(tmp_path / "out")


def test_site_errors_of_an_in_memory_study_name_the_field(tiny_gpt2):
    spec = StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": PROBES},
                                "sites": ["embed", "layers[3].resid_pre"], "execution": {"progress": False}})
    with pytest.raises(ClapError, match=r"^sites\[1\]: layer 3 is out of range"):
        Study(spec, model=tiny_gpt2).run()


def test_relative_model_source_resolves_against_the_spec_folder(tmp_path, model_dir, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(model_dir, project / "weights")
    spec = write_spec(project / "specs", "../weights")
    monkeypatch.chdir(tmp_path)  # ../weights from here does not exist
    code = main(["patch", str(spec), "-o", str(tmp_path / "out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    frame, sidecar = read_results(tmp_path / "out")
    assert sidecar["model"]["location"] == str(project / "specs" / "../weights")
    assert len(frame) == len(PROBES) * 3
    # a hub id or built-in name that is no path beside the spec is passed through unchanged
    study = Study(StudySpec.from_yaml(write_spec(project / "specs", "smollm2-135m")))
    assert study.model_source() == "smollm2-135m"
    study = Study(StudySpec.from_yaml(write_spec(project / "specs", "org/model-id")))
    assert study.model_source() == "org/model-id"
