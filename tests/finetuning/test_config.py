"""Fine-tuning settings: every bad value is refused up front, in one line that says where it came from.

These tests need no model and no corpus: each bad setting must be refused before either is opened (the paths given
do not exist, and loading a model fails the test), so the message proves the order of the checks too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clap.app.cli import main
from finetuning.config import (
    FinetuneConfig,
    FinetuneConfigError,
    from_preset,
    load_config,
)


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load during these tests is a failure: settings must be checked first."""
    import clap.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(clap.models, "load_hf_model", refuse)


def run_cli(tmp_path: Path, capsys, *extra: str, config: Path | None = None) -> str:
    """``clap finetune`` with a missing corpus and model; returns stderr after asserting a one-line exit 2."""
    argv = ["finetune", "--corpus", str(tmp_path / "no-corpus"), "--model", str(tmp_path / "no-model"),
            "-o", str(tmp_path / "out"), *extra]
    if config is not None:
        argv += ["--config", str(config)]
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, captured)
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("clap: error: ")
    assert not (tmp_path / "out").exists()  # nothing written
    return err.removeprefix("clap: error: ")


@pytest.mark.parametrize("value, expected", [
    ("nan", "Input should be a finite number, got nan"),
    ("inf", "Input should be a finite number, got inf"),
    ("-1e-4", "Input should be greater than 0, got -0.0001"),
    ("0", "Input should be greater than 0, got 0.0"),
])
def test_cli_refuses_non_finite_and_non_positive_lr(tmp_path: Path, capsys, value: str, expected: str):
    assert run_cli(tmp_path, capsys, f"--lr={value}") == f"--lr: {expected}"


def test_set_values_are_checked_and_name_the_set_key(tmp_path: Path, capsys):
    err = run_cli(tmp_path, capsys, "--set", "lr_scheduler=cosin")
    assert err.startswith("--set lr_scheduler: 'cosin' is not a learning-rate schedule; did you mean 'cosine'")
    from transformers.trainer_utils import SchedulerType

    assert all(s.value in err for s in SchedulerType)  # the valid names are listed
    err = run_cli(tmp_path, capsys, "--set", "lr_scheduler=bogus")
    assert err.startswith("--set lr_scheduler: 'bogus' is not a learning-rate schedule")

    err = run_cli(tmp_path, capsys, "--set", "attn_implementation=sdp")
    assert err.startswith("--set attn_implementation: 'sdp' is not an attention implementation; did you mean 'sdpa'")
    assert "eager" in err and "flash_attention_2" in err
    err = run_cli(tmp_path, capsys, "--set", "attn_implementation=bogus")
    assert err.startswith("--set attn_implementation: 'bogus' is not an attention implementation")

    assert run_cli(tmp_path, capsys, "--set", "max_grad_norm=-5") == (
        "--set max_grad_norm: Input should be greater than or equal to 0, got '-5'")
    assert run_cli(tmp_path, capsys, "--set", "max_grad_norm=nan") == (
        "--set max_grad_norm: Input should be a finite number, got 'nan'")
    assert run_cli(tmp_path, capsys, "--set", "batch_size=eight") == (
        "--set batch_size: Input should be a valid integer, unable to parse string as an integer, got 'eight'")


@pytest.mark.parametrize("setting, value, expected", [
    ("batch_size", "0", "greater than or equal to 1"),
    ("eval_batch_size", "0", "greater than or equal to 1"),
    ("grad_accumulation", "0", "greater than or equal to 1"),
    ("epochs", "-1", "greater than or equal to 0"),
    ("epochs", "inf", "finite number"),
    ("max_steps", "-2", "greater than or equal to -1"),
    ("warmup_steps", "-1", "greater than or equal to 0"),
    ("weight_decay", "-0.1", "greater than or equal to 0"),
    ("lora_r", "0", "greater than or equal to 1"),
    ("lora_alpha", "0", "greater than or equal to 1"),
    ("lora_dropout", "1", "less than 1"),
    ("lora_dropout", "-0.1", "greater than or equal to 0"),
    ("seed", "-1", "greater than or equal to 0"),
    ("patience", "0", "greater than or equal to 1"),
    ("early_stopping_threshold", "-1", "greater than or equal to 0"),
    ("logging_steps", "0", "greater than or equal to 1"),
    ("save_total_limit", "0", "greater than or equal to 1"),
    ("dataloader_workers", "-1", "greater than or equal to 0"),
])
def test_numeric_settings_are_bounded(tmp_path: Path, capsys, setting: str, value: str, expected: str):
    err = run_cli(tmp_path, capsys, "--set", f"{setting}={value}")
    assert err.startswith(f"--set {setting}: Input should be") and expected in err, err


def test_cross_field_checks_name_their_origin(tmp_path: Path, capsys):
    assert run_cli(tmp_path, capsys, "--set", "epochs=0") == (
        "--set epochs: expected a positive number (or max_steps > 0), got 0")
    assert run_cli(tmp_path, capsys, "--max-steps", "0") == (
        "--max-steps: expected a positive number of steps, or -1 to train for 'epochs', got 0")
    assert from_preset("config-i", epochs=0, max_steps=5).max_steps == 5  # max_steps alone is enough


def test_yaml_errors_name_file_line_and_field(tmp_path: Path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("preset: config-ii\nepochs: 3\nlearning_rate: -1.0e-4\n")
    assert run_cli(tmp_path, capsys, config=path) == (
        f"{path}:3: learning_rate: Input should be greater than 0, got -0.0001")
    path.write_text("epochs: 3\nlr_scheduler: linaer\nmax_grad_norm: -5\n")
    err = run_cli(tmp_path, capsys, config=path)
    assert err.startswith(f"{path}:2: lr_scheduler: 'linaer' is not a learning-rate schedule; did you mean 'linear'")
    assert f"; {path}:3: max_grad_norm: Input should be greater than or equal to 0, got -5" in err
    # a value given on the command line wins and is reported as the command line's
    assert run_cli(tmp_path, capsys, "--set", "max_grad_norm=-1", "--set", "lr_scheduler=linear", config=path) == (
        "--set max_grad_norm: Input should be greater than or equal to 0, got '-1'")
    path.write_text("eval_strategy: steps\nbatch_size: true\n")
    assert run_cli(tmp_path, capsys, "--eval-steps", "2", config=path) == (
        f"{path}:2: batch_size: expected an integer, got True")
    path.write_text("device: gpu\n")
    assert run_cli(tmp_path, capsys, config=path).startswith(f"{path}:1: device: 'gpu' is not a device")


def test_device_is_checked_before_anything_is_loaded(tmp_path: Path, capsys):
    err = run_cli(tmp_path, capsys, "--device", "cuda:7")
    assert err.startswith("--device: 'cuda:7' ")
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in err
        assert run_cli(tmp_path, capsys, "--device", "cuda").startswith("--device: 'cuda' asks for CUDA")
    else:
        assert f"this machine has {torch.cuda.device_count()}" in err or torch.cuda.device_count() > 7
    assert run_cli(tmp_path, capsys, "--device", "cpu:x").startswith("--device: 'cpu:x' is not a device")
    assert run_cli(tmp_path, capsys, "--device", "gpu").startswith("--device: 'gpu' is not a device")


def test_python_api_uses_the_same_schema():
    with pytest.raises(FinetuneConfigError, match=r"^argument learning_rate: Input should be a finite number"):
        from_preset("config-i", learning_rate=float("nan"))
    with pytest.raises(FinetuneConfigError, match=r"^argument max_grad_norm: .*greater than or equal to 0"):
        from_preset("config-i").replace(max_grad_norm=-5.0)
    config = load_config(None, None, {"lora_target_modules": "q_proj, v_proj", "subset": "40"})
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.subset == 40
    assert isinstance(config, FinetuneConfig) and config.learning_rate == 5e-5


def test_set_null_clears_a_yaml_value(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("subset: 50\n")
    assert load_config(None, path).subset == 50
    assert load_config(None, path, {"subset": None}, {"subset": "--set subset"}).subset is None


def test_output_path_that_cannot_be_created_is_refused_up_front(tmp_path: Path, capsys):
    """Before the fix, 'OUT under a file' passed the checks and failed with a traceback after the model loaded."""
    import datasets

    corpus = tmp_path / "corpus"
    rows = {"text": ["Seizures in rats.", "EEG of sleep."]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(corpus))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    capsys.readouterr()  # the datasets progress bar

    def cli(out: Path, *extra: str) -> tuple[int, str]:
        code = main(["finetune", "--corpus", str(corpus), "--model", str(tmp_path / "no-model"), "-o", str(out),
                     *extra])
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.count("\n") == 0, err
        return code, err

    assert cli(blocker / "run") == (2, f"clap: error: output path {blocker / 'run'} cannot be created: {blocker} is a "
                                       "file, not a folder")
    assert cli(blocker) == (2, f"clap: error: output path {blocker} exists and is not a folder")
    code, err = cli(tmp_path / "out", "--set", "text_column=txt")
    assert code == 2 and err.endswith("split 'train' has no 'txt' column (columns: text); did you mean 'text'? "
                                      "(set text_column)")
    assert main(["finetune", "--corpus", str(blocker), "--model", "m", "-o", str(tmp_path / "o")]) == 2
    assert "holds no saved Hugging Face dataset" in capsys.readouterr().err
