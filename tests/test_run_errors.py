"""``clap run``'s own faults end in one line, before any stage runs: a damaged ``stages.json``, a folder held by
another run (named), ``--max-rows 0``, invalid ``finetune.settings`` (file and line)."""

from __future__ import annotations

import json
import os
import re

import pytest

from clap.app.cli import main
from clap.app.stages import StageStore, locked
from clap.app.study_file import StudyFile
from clap.errors import ClapError

STUDY = """name: s
model: {source: ./no-such-model}
probes:
  inline:
    - {id: a, clean: 'The capital of France is', corrupted: 'The capital of Spain is',
       answer: ' Paris', wrong: ' Madrid'}
sites: ['layers[0].resid_pre']
"""


@pytest.fixture
def study(tmp_path):
    """A study whose model folder passes the checks made before any stage (a config, no weights are read)."""
    model = tmp_path / "no-such-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8,
                                                   "vocab_size": 50257, "architectures": ["GPT2LMHeadModel"]}))
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    return path


def one_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("content, reason", [
    (b"\xff\xfe\x00garbage\x80", "unreadable stage record"),
    (b'{"stages": {"patch[model]": "done"}}', "stage record(s) 'patch[model]' are not JSON objects"),
    (b'"a string"', "not a clap stage record"),
    (None, "is a folder, not clap's stage record"),
])
def test_damaged_stage_record_is_one_line(study, tmp_path, capsys, content, reason):
    out = tmp_path / "out"
    out.mkdir()
    if content is None:
        (out / "stages.json").mkdir()
    else:
        (out / "stages.json").write_bytes(content)
    with pytest.raises(ClapError, match=re.escape(reason)):
        StageStore(out)
    err = one_line(capsys, ["run", study, "-o", out])
    assert f"{out / 'stages.json'}" in err and reason in err
    assert sorted(p.name for p in out.iterdir()) == ["stages.json"]  # nothing else written, no lock left


def test_a_held_run_folder_names_its_holder(study, tmp_path, capsys):
    out = tmp_path / "out"
    with locked(out):
        err = one_line(capsys, ["run", study, "-o", out])
    assert f"{out}: another `clap run` is writing to this folder (pid {os.getpid()} on host" in err
    assert not (out / ".clap-run.lock").exists()


@pytest.mark.parametrize("value", ["0", "2", "-5", "many"])
def test_max_rows_is_refused_while_parsing(study, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(study), "-o", str(tmp_path / "out"), "--max-rows", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --max-rows:" in err
    assert not (tmp_path / "out").exists()


def test_finetune_settings_are_checked_when_the_study_file_is_read(tmp_path):
    text = STUDY.replace("model: {source: ./no-such-model}\n", "models:\n  base: {source: ./no-such-model}\n"
                         "  tuned: {finetuned: true}\n") + (
        "corpus: {path: ./corpus}\n"
        "finetune:\n"
        "  model: base\n"
        "  settings:\n"
        "    epochs: many\n"
        "    lr: 0.001\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    lines = text.splitlines()
    epochs, lr = lines.index("    epochs: many") + 1, lines.index("    lr: 0.001") + 1
    with pytest.raises(ClapError) as error:
        StudyFile.from_yaml(path)
    message = str(error.value)
    assert f"{path}:{epochs}: finetune.settings.epochs: Input should be a valid number" in message
    assert f"{path}:{lr}: finetune.settings.lr: unknown field 'lr'" in message
    path.write_text(text.replace("  model: base\n", "  model: base\n  preset: config-iii\n")
                    .replace("    epochs: many\n    lr: 0.001\n", "    epochs: 1\n"))
    with pytest.raises(ClapError, match=r"study.yaml:\d+: finetune.preset: unknown fine-tuning preset 'config-iii'; "
                                        r"did you mean 'config-ii'"):
        StudyFile.from_yaml(path)
    path.write_text(text.replace("    epochs: many\n    lr: 0.001\n", "    epochs: 1\n    learning_rate: 0.001\n"))
    assert StudyFile.from_yaml(path).finetune.settings == {"epochs": 1, "learning_rate": 0.001}
