"""Fine-tuning on a real slice of the shared PubMed data with a tiny GPT-2-architecture model.

The corpus is built by ``corpora.build`` from the shared 2021 update file (its ~240 epilepsy-related abstracts);
the model has GPT-2's real tokenizer and a random 2-layer body, so a few dozen optimiser steps move the validation
loss measurably. Losses are checked against an independent plain-torch computation of the mean token NLL.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from clap.app.cli import main
from clap.errors import ClapError
from clap.models import ModelLoadError, load_hf_model
from finetuning.config import PRESETS, FinetuneConfigError, from_preset, load_config
from finetuning.data import (
    FinetuneDataError,
    load_corpus,
    make_collator,
    prepare_datasets,
    training_tokenizer,
)
from finetuning.train import FinetuneError, finetune, training_arguments

MAX_LEN = 64
N_VALID = 6  # validation records used (eval_subset): ~20 chunks, so each evaluation is quick


@pytest.fixture(scope="module")
def corpus_dir(shared_data: Path, tmp_path_factory) -> Path:
    """The epilepsy-related abstracts of the shared 2021 update file, built and split 80/20 by corpora.build."""
    from corpora.build import BuildConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus")
    report = build_corpus(BuildConfig(inputs=[shared_data / "pubmed" / "pubmed21n1298.xml.gz"], out=out, figure=False))
    assert report.train > 150 and report.validation > 30
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(shared_data: Path, tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer, saved as an ordinary model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok_dir = shared_data / "gpt2-tokenizer"
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = GPT2Tokenizer(
        vocab=json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")),
        merges=[tuple(line.split(" ")) for line in merges[1:] if line],
    )
    assert len(tokenizer) == 50257
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=len(tokenizer),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fast(**changes):
    """Config II at test scale: 64-token chunks, evaluation and checkpoint every few steps."""
    base = dict(max_length=MAX_LEN, batch_size=4, eval_batch_size=16, grad_accumulation=1, warmup_steps=0,
                learning_rate=1e-3, eval_strategy="steps", eval_steps=3, logging_steps=1, eval_subset=N_VALID,
                max_steps=6)
    base.update(changes)
    return from_preset("config-ii", **base)


def read_log(out: Path) -> list[dict]:
    with open(out / "training_log.csv", newline="") as handle:
        return [{**row, "step": int(row["step"]), "loss": float(row["loss"])} for row in csv.DictReader(handle)]


def validation_blocks(corpus_dir: Path, tokenizer, n_records: int, block: int) -> torch.Tensor:
    """The validation token stream cut into ``block``-token rows, computed here without the package's helpers."""
    import datasets

    texts = datasets.load_from_disk(str(corpus_dir / "dataset"))["validation"]["text"][:n_records]
    stream = [t for text in texts for t in tokenizer(text)["input_ids"]]
    usable = len(stream) // block * block
    return torch.tensor(stream[:usable]).view(-1, block)


def mean_token_nll(model, blocks: torch.Tensor) -> float:
    """Mean negative log-likelihood of every next token, plain torch."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for rows in blocks.split(8):
            logits = model(input_ids=rows).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, rows[:, 1:].unsqueeze(-1)).squeeze(-1)
            total += nll.sum().item()
            count += nll.numel()
    return total / count


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------------------------- settings


def test_presets_are_the_seed_configurations():
    one, two = from_preset("config-i"), from_preset("config-ii")
    assert (one.mode, one.max_length, one.epochs, one.learning_rate, one.batch_size, one.grad_accumulation,
            one.warmup_steps, one.weight_decay, one.eval_strategy, one.patience, one.seed) == (
        "truncate", 512, 30, 5e-5, 8, 4, 500, 0.01, "epoch", 3, 42)
    assert (two.mode, two.max_length, two.epochs, two.learning_rate, two.weight_decay, two.patience) == (
        "chunk", 512, 10, 2e-5, 0.1, 5)
    # "otherwise as I"
    for name in ("batch_size", "grad_accumulation", "warmup_steps", "eval_strategy", "seed"):
        assert getattr(one, name) == getattr(two, name)
    args = training_arguments(two, Path("unused"), "cpu", resuming=False, progress=False)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert str(args.save_strategy.value) == str(args.eval_strategy.value) == "epoch"
    assert args.gradient_accumulation_steps == 4 and args.warmup_steps == 500 and args.num_train_epochs == 10
    assert set(PRESETS) == {"config-i", "config-ii"}


def test_yaml_then_flags_override_the_preset(tmp_path: Path):
    yaml_file = tmp_path / "over.yaml"
    yaml_file.write_text("preset: config-ii\nepochs: 3\nlearning_rate: 1.0e-4\nlora: true\n")
    config = load_config(None, yaml_file, {"learning_rate": 3e-4, "subset": 50})
    assert (config.preset, config.mode, config.epochs, config.learning_rate, config.lora, config.subset) == (
        "config-ii", "chunk", 3.0, 3e-4, True, 50)
    assert load_config("config-i", yaml_file).mode == "truncate"  # an explicit preset wins over the file's

    yaml_file.write_text("epochs: 3\nlearnig_rate: 1.0e-4\n")
    with pytest.raises(FinetuneConfigError,
                       match=r"over\.yaml:2: learnig_rate: unknown field 'learnig_rate'; did you mean 'learning_rate'"):
        load_config(None, yaml_file)
    yaml_file.write_text("batch_size: eight\n")
    with pytest.raises(FinetuneConfigError,
                       match=r"over\.yaml:1: batch_size: Input should be a valid integer.*got 'eight'"):
        load_config(None, yaml_file)
    with pytest.raises(FinetuneConfigError, match="unknown fine-tuning preset 'config-iii'"):
        from_preset("config-iii")
    with pytest.raises(FinetuneConfigError,
                       match="^fine-tuning setting eval_steps: expected a positive integer when eval_strategy"):
        from_preset("config-i", eval_strategy="steps")


# --------------------------------------------------------------------------------------------- data layouts


def test_truncate_and_chunk_layouts(corpus_dir: Path, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = training_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    corpus = load_corpus(corpus_dir)
    texts = corpus["train"]["text"][:20]
    ids = [tok(t)["input_ids"] for t in texts]

    cut = 256  # abstracts run ~100-500 tokens: some are truncated, some padded
    one = from_preset("config-i", max_length=cut, subset=20, eval_subset=5)
    train, _, stats = prepare_datasets(corpus, tok, one)
    assert len(train) == 20 and [list(r) for r in train["input_ids"]] == [s[:cut] for s in ids]
    assert stats["train"].truncated == sum(len(s) > cut for s in ids) > 0
    batch = make_collator(tok, one)([train[0], train[1]])
    assert batch["input_ids"].shape == (2, cut)  # padded to max_length, as the seed did
    short = next(i for i, s in enumerate(ids) if len(s) < cut)
    row = make_collator(tok, one)([train[short]])
    n = len(ids[short])
    assert row["attention_mask"][0].sum() == n and (row["labels"][0, n:] == -100).all()
    assert torch.equal(row["labels"][0, :n], torch.tensor(ids[short]))
    longest = make_collator(tok, one.replace(padding="longest"))([train[short]])
    assert longest["input_ids"].shape == (1, n)

    two = from_preset("config-ii", max_length=MAX_LEN, subset=20, eval_subset=5)
    train2, _, stats2 = prepare_datasets(corpus, tok, two)
    stream = [t for s in ids for t in s]
    assert len(train2) == len(stream) // MAX_LEN
    assert all(len(r) == MAX_LEN for r in train2["input_ids"])
    assert [t for r in train2["input_ids"] for t in r] == stream[: len(train2) * MAX_LEN]
    assert stats2["train"].dropped_tokens == len(stream) % MAX_LEN


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(corpus_dir: Path, tiny_model_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    result = finetune(corpus_dir, str(tiny_model_dir), out,
                      fast(max_steps=20, eval_steps=10, batch_size=8, learning_rate=2e-3), progress=False)
    return result


def test_validation_loss_goes_down(trained, corpus_dir: Path, tiny_model_dir: Path):
    base, tok, _ = load_hf_model(str(tiny_model_dir))
    tuned, _, _ = load_hf_model(str(trained.model_dir))  # the saved folder loads like any model
    blocks = validation_blocks(corpus_dir, tok, N_VALID, MAX_LEN)
    before, after = mean_token_nll(base, blocks), mean_token_nll(tuned, blocks)
    assert after < before - 0.3, (before, after)
    # the Trainer's numbers are the same quantity (equal-length chunks: batch means = token mean)
    assert trained.initial_eval_loss == pytest.approx(before, abs=1e-4)
    assert trained.best_eval_loss == pytest.approx(after, abs=1e-4)
    log = read_log(trained.output_dir)
    evals = [r for r in log if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(b["loss"] < a["loss"] for a, b in zip(evals, evals[1:], strict=False))
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 21))
    assert trained.global_step == 20 and not trained.stopped_early
    png = trained.figure.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = json.loads((trained.output_dir / "finetune.json").read_text())
    assert summary["status"] == "complete" and summary["data"]["validation"]["rows"] == len(blocks)
    assert summary["train_tokens_seen"] == 20 * 8 * MAX_LEN


def test_best_checkpoint_is_the_one_reloaded(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    from transformers import TrainerCallback

    class Spoil(TrainerCallback):
        """After the first checkpoint, knock the weights off course so later evaluations are worse."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step > 3:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.05)

    out = tmp_path / "run"
    result = finetune(corpus_dir, str(tiny_model_dir), out, fast(max_steps=9, patience=5), progress=False,
                      callbacks=[Spoil()])
    evals = [r for r in read_log(out) if r["split"] == "validation" and r["step"] > 0]
    best = min(evals, key=lambda r: r["loss"])
    assert best["step"] == 3 and evals[-1]["step"] == 9 and evals[-1]["loss"] > best["loss"] + 0.1
    assert result.best_checkpoint == "checkpoint-3" and result.global_step == 9
    final = state_dict_of(out / "model")
    chosen = state_dict_of(out / "checkpoints" / "checkpoint-3")
    last = state_dict_of(out / "checkpoints" / "checkpoint-9")
    assert final.keys() == chosen.keys()
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)


def test_early_stopping_fires_on_a_plateau(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    # lr = 1e-30 (0 is refused): steps of 1e-30 vanish against float32 weights, so every evaluation after the first
    # fails to improve.
    result = finetune(corpus_dir, str(tiny_model_dir), tmp_path / "run",
                      fast(learning_rate=1e-30, eval_steps=1, patience=2, max_steps=40), progress=False)
    evals = [r for r in read_log(tmp_path / "run") if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]  # best at 1, then `patience` = 2 evaluations without gain
    assert len({r["loss"] for r in evals}) == 1
    assert result.stopped_early and result.global_step == 3 and result.best_checkpoint == "checkpoint-1"


class Interrupt(Exception):
    pass


def test_resume_continues_from_the_saved_step(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    from transformers import TrainerCallback

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt("simulated interruption")

    config = fast(max_steps=8)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False, callbacks=[StopAt5()])
    assert not (out / "model").exists() and not (out / "finetune.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    assert max(r["step"] for r in read_log(out)) == 4  # the log was kept current up to the interruption

    resumed = finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False)
    assert resumed.resumed_from == "checkpoint-3" and resumed.global_step == 8
    log = read_log(out)
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 9))  # nothing restarted
    assert [r["step"] for r in log if r["split"] == "validation"] == [0, 3, 6, 8]  # and at the end

    straight = finetune(corpus_dir, str(tiny_model_dir), tmp_path / "straight", config, progress=False)
    ref = read_log(tmp_path / "straight")
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    a, b = state_dict_of(out / "model"), state_dict_of(straight.model_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    again = finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False)
    assert again.already_complete and again.global_step == 8


def test_resume_skips_incomplete_checkpoints(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path, caplog):
    """A run killed while writing a checkpoint leaves a half-written checkpoint-N; the rerun must resume from the
    newest complete one, set the broken ones aside and say so."""
    import shutil

    from transformers import TrainerCallback

    from finetuning.checkpoints import checkpoint_problem

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt("simulated interruption")

    config = fast(max_steps=8)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False, callbacks=[StopAt5()])
    good = out / "checkpoints" / "checkpoint-3"
    assert checkpoint_problem(good) is None

    # every way a save can be cut short, checked on copies of the real checkpoint
    def broken(name: str, damage) -> Path:
        folder = tmp_path / "variants" / name
        shutil.copytree(good, folder)
        damage(folder)
        return folder

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    assert checkpoint_problem(broken("checkpoint-3", lambda f: truncate(f / "model.safetensors"))).startswith(
        "model.safetensors is unreadable")
    assert checkpoint_problem(broken("a/checkpoint-3", lambda f: (f / "model.safetensors").write_bytes(b""))) == (
        "model.safetensors is empty (0 bytes)")
    assert checkpoint_problem(broken("b/checkpoint-3", lambda f: (f / "model.safetensors").unlink())).startswith(
        "no model weights")
    assert checkpoint_problem(broken("c/checkpoint-3", lambda f: truncate(f / "optimizer.pt"))) == (
        "optimizer.pt is truncated or not a torch file")
    assert checkpoint_problem(broken("d/checkpoint-3", lambda f: (f / "scheduler.pt").unlink())) == (
        "scheduler.pt missing")
    assert checkpoint_problem(broken("e/checkpoint-3", lambda f: (f / "trainer_state.json").unlink())).startswith(
        "trainer_state.json missing")
    assert checkpoint_problem(broken("f/checkpoint-3", lambda f: (f / "trainer_state.json").write_text("{"))) == (
        "trainer_state.json is unreadable")

    # newer than the good checkpoint: one whose weights were cut off mid-write, and one that is still empty
    truncated = out / "checkpoints" / "checkpoint-4"
    shutil.copytree(good, truncated)
    state = json.loads((truncated / "trainer_state.json").read_text())
    (truncated / "trainer_state.json").write_text(json.dumps({**state, "global_step": 4}))
    truncate(truncated / "model.safetensors")
    (out / "checkpoints" / "checkpoint-6").mkdir()

    with caplog.at_level("INFO", logger="finetuning.train"):
        resumed = finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False)
    assert resumed.resumed_from == "checkpoint-3" and resumed.global_step == 8
    assert [(s.name, s.reason.split(" (")[0]) for s in resumed.skipped_checkpoints] == [
        ("checkpoint-6", "empty folder"), ("checkpoint-4", "model.safetensors is unreadable")]
    for entry in resumed.skipped_checkpoints:  # kept for inspection, out of the Trainer's way
        assert Path(entry.moved_to) == out / "checkpoints-incomplete" / entry.name and Path(entry.moved_to).is_dir()
    assert "resuming from checkpoint-3" in caplog.text
    assert "skipping incomplete checkpoint checkpoint-6: empty folder" in caplog.text
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["resumed_from"] == "checkpoint-3" and summary["status"] == "complete"
    assert [s["name"] for s in summary["skipped_checkpoints"]] == ["checkpoint-6", "checkpoint-4"]
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-6") is None  # saved afresh by the resumed run
    log = read_log(out)
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in log if r["split"] == "validation"] == [0, 3, 6, 8]
    again = finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False)
    assert again.already_complete and [s.name for s in again.skipped_checkpoints] == ["checkpoint-6", "checkpoint-4"]


def test_lora_merge_gives_the_adapter_models_logits(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    from peft import PeftModel

    out = tmp_path / "run"
    result = finetune(corpus_dir, str(tiny_model_dir), out, fast(lora=True, learning_rate=2e-2, max_steps=6,
                                                                  eval_steps=3), progress=False)
    base, tok, _ = load_hf_model(str(tiny_model_dir))
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged, _, _ = load_hf_model(str(result.model_dir))
    assert not any("lora" in k for k in merged.state_dict())
    blocks = validation_blocks(corpus_dir, tok, 4, MAX_LEN)[:4]
    with torch.no_grad():
        want = adapted(input_ids=blocks).logits
        got = merged(input_ids=blocks).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    moved = max((merged.state_dict()[k] - pristine[k]).abs().max().item() for k in pristine if "c_attn" in k)
    assert moved > 1e-3  # the adapter really changed the attention weights it targets


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    import datasets

    config = fast()
    with pytest.raises(FinetuneDataError, match="corpus not found"):
        finetune(tmp_path / "nope", str(tiny_model_dir), tmp_path / "o1", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneDataError, match="no saved Hugging Face dataset"):
        finetune(tmp_path / "empty", str(tiny_model_dir), tmp_path / "o2", config)
    rows = {"text": ["Seizures in rats.", "EEG of sleep."]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "trainonly"))
    with pytest.raises(FinetuneDataError, match="no 'validation' split"):
        finetune(tmp_path / "trainonly", str(tiny_model_dir), tmp_path / "o3", config)
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(FinetuneDataError, match="single split"):
        finetune(tmp_path / "single", str(tiny_model_dir), tmp_path / "o4", config)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict({"text": []})}).save_to_disk(str(tmp_path / "ev"))
    with pytest.raises(FinetuneDataError, match="'validation' split is empty"):
        finetune(tmp_path / "ev", str(tiny_model_dir), tmp_path / "o5", config)
    with pytest.raises(ModelLoadError, match="does not exist"):
        finetune(corpus_dir, str(tmp_path / "no-model"), tmp_path / "o6", config)
    with pytest.raises(FinetuneError, match="max_length 256 is longer than the model's context of 128"):
        finetune(corpus_dir, str(tiny_model_dir), tmp_path / "o7", fast(max_length=256))
    for n in range(1, 8):  # refused before anything was written
        assert not (tmp_path / f"o{n}").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match=r"refusing to overwrite .*notes\.txt"):
        finetune(corpus_dir, str(tiny_model_dir), tmp_path / "mine", config, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_resume_refuses_changed_settings(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise Interrupt()

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(corpus_dir, str(tiny_model_dir), out, fast(), progress=False, callbacks=[StopAt4()])
    with pytest.raises(FinetuneError, match=r"different settings \(max_length"):
        finetune(corpus_dir, str(tiny_model_dir), out, fast(max_length=32), progress=False)


# --------------------------------------------------------------------------------------------- command line


def test_cli_finetune_config_i(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys):
    overrides = tmp_path / "over.yaml"
    overrides.write_text("warmup_steps: 0\nlearning_rate: 1.0e-3\nmax_steps: 50\neval_strategy: steps\n")
    out = tmp_path / "run"
    argv = ["--quiet", "finetune", "--corpus", str(corpus_dir / "dataset"), "--model", str(tiny_model_dir),
            "--preset", "config-i", "--config", str(overrides), "--max-steps", "4", "--max-length", "48",
            "--batch", "4", "--grad-accum", "2", "--eval-steps", "2", "--subset", "40", "--eval-subset", "8",
            "--set", "padding=longest", "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "steps:      4 (best checkpoint-" in printed
    saved = load_config(None, out / "config.yaml")
    assert (saved.preset, saved.mode, saved.max_steps, saved.max_length, saved.weight_decay, saved.learning_rate,
            saved.padding, saved.subset) == ("config-i", "truncate", 4, 48, 0.01, 1e-3, "longest", 40)
    model, tok, _ = load_hf_model(str(out / "model"))
    assert model.config.model_type == "gpt2" and tok("EEG")["input_ids"]
    from clap.models import load_model

    wrapped = load_model(str(out / "model"))  # what `clap patch` does with a model folder
    assert wrapped.tokenizer.padding_side == "left" and wrapped.identity["n_layers"] == 2
    assert main(argv) == 0 and "already holds a finished run" in capsys.readouterr().out

    assert main(["finetune", "--corpus", str(tmp_path / "missing"), "--model", str(tiny_model_dir),
                 "-o", str(tmp_path / "x")]) == 2
    assert "corpus not found" in capsys.readouterr().err
    assert main(["finetune", "--corpus", str(corpus_dir), "--model", str(tiny_model_dir), "--set", "lr=1",
                 "-o", str(tmp_path / "y")]) == 2
    assert "--set lr: unknown field 'lr'" in capsys.readouterr().err
    assert issubclass(FinetuneError, ClapError) and issubclass(FinetuneDataError, ClapError)
    assert math.isfinite(json.loads((out / "finetune.json").read_text())["best_eval_loss"])


# --------------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_lora_finetune_round_trip(corpus_dir: Path, tmp_path: Path):
    """The Llama architecture of the built-in SmolLM2-135M: LoRA on q/v projections, merged, reloaded."""
    from peft import PeftModel

    from clap.models import builtin_gguf_path

    try:
        builtin_gguf_path("smollm2-135m")  # the package ships the weights; importing it would need `llm`
    except ModelLoadError as exc:
        pytest.skip(str(exc))

    config = from_preset("config-ii", max_length=32, batch_size=2, eval_batch_size=8, grad_accumulation=1,
                         warmup_steps=0, learning_rate=5e-3, eval_strategy="steps", eval_steps=2, max_steps=4,
                         logging_steps=1, subset=4, eval_subset=2, lora=True)
    result = finetune(corpus_dir, "smollm2-135m", tmp_path / "run", config, progress=False)
    assert result.global_step == 4 and result.best_eval_loss <= result.initial_eval_loss
    base, tok, _ = load_hf_model("smollm2-135m")
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    merged, _, _ = load_hf_model(str(result.model_dir))
    assert merged.config.model_type == "llama" and merged.config.num_hidden_layers == 30
    ids = tok("Levetiracetam reduced seizure frequency in children with focal epilepsy.", return_tensors="pt")
    with torch.no_grad():
        want = adapted(**ids).logits
        got = merged(**ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_an_evaluation_repeated_at_one_step_is_logged_once():
    from finetuning.log import history_rows

    history = [
        {"eval_loss": 3.0, "step": 0, "epoch": 0.0},
        {"loss": 2.9, "step": 1, "epoch": 0.5, "learning_rate": 1e-4, "grad_norm": 0.3},
        {"eval_loss": 2.8, "step": 2, "epoch": 1.0},
        {"eval_loss": 2.8, "step": 2, "epoch": 1.0},  # the final evaluation of the same weights
        {"train_runtime": 1.0, "step": 2},
    ]
    rows = history_rows(history)
    assert [(r["step"], r["split"]) for r in rows] == [(0, "validation"), (1, "train"), (2, "validation")]
    assert rows[2]["loss"] == 2.8 and math.isclose(rows[2]["perplexity"], math.exp(2.8))


def test_torn_rng_state_or_config_is_passed_over(corpus_dir: Path, tiny_model_dir: Path, tmp_path: Path, caplog):
    """A truncated ``rng_state.pth`` or ``config.json`` in the newest checkpoint said "resuming from checkpoint-N",
    then failed with a traceback on every rerun: every file a resume reads is checked, the torn checkpoint is moved
    aside and the run resumes from the previous complete one."""
    import shutil

    from transformers import TrainerCallback

    from finetuning.checkpoints import checkpoint_problem

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt("simulated interruption")

    config = fast(max_steps=8)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False, callbacks=[StopAt5()])
    good = out / "checkpoints" / "checkpoint-3"
    assert checkpoint_problem(good) is None and (good / "rng_state.pth").is_file()

    def torn(step: int, damage) -> Path:
        folder = out / "checkpoints" / f"checkpoint-{step}"
        shutil.copytree(good, folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
        damage(folder)
        return folder

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def flip_a_byte(path: Path) -> None:  # the zip directory intact, one stored byte changed
        import zipfile

        with zipfile.ZipFile(path) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        data = bytearray(path.read_bytes())
        at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))

    rng = torn(4, lambda f: truncate(f / "rng_state.pth"))
    assert checkpoint_problem(rng) == "rng_state.pth is truncated or not a torch file"
    config_file = torn(5, lambda f: truncate(f / "config.json"))
    assert checkpoint_problem(config_file).startswith("config.json is unreadable (")
    scratch = tmp_path / "scratch" / "checkpoint-3"
    shutil.copytree(good, scratch)
    flip_a_byte(scratch / "optimizer.pt")
    assert checkpoint_problem(scratch).startswith("optimizer.pt is damaged (") and "fails its checksum" in (
        checkpoint_problem(scratch))

    with caplog.at_level("INFO", logger="finetuning.train"):
        resumed = finetune(corpus_dir, str(tiny_model_dir), out, config, progress=False)
    assert resumed.resumed_from == "checkpoint-3" and resumed.global_step == 8
    assert [(s.name, s.reason.split(" (")[0]) for s in resumed.skipped_checkpoints] == [
        ("checkpoint-5", "config.json is unreadable"),
        ("checkpoint-4", "rng_state.pth is truncated or not a torch file")]
    assert all(Path(s.moved_to).parent == out / "checkpoints-incomplete" for s in resumed.skipped_checkpoints)
    assert "resuming from checkpoint-3" in caplog.text
    log = read_log(out)
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 9))
    straight = finetune(corpus_dir, str(tiny_model_dir), tmp_path / "straight", config, progress=False)
    a, b = state_dict_of(out / "model"), state_dict_of(straight.model_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the resumed run is the uninterrupted one
