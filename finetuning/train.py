"""Fine-tune a causal LM on a built corpus with validation-monitored early stopping (the seed study's configs I/II).

Why the Trainer and not a hand-written loop: checkpointing with optimizer, scheduler and RNG state, resumption,
gradient accumulation with correct token-count loss normalisation, ``load_best_model_at_end`` and
``EarlyStoppingCallback`` are exactly what the seed used and are easy to get subtly wrong by hand.

Output folder ``OUT``::

    OUT/config.yaml          resolved settings (written first; a rerun must agree with it to resume)
    OUT/checkpoints/         Trainer checkpoints (checkpoint-<step>/); a rerun resumes from the newest complete one
    OUT/checkpoints-incomplete/  checkpoints a rerun found half written (interrupted saves), moved out of the way
    OUT/training_log.csv     step, epoch, split (train|validation), loss, perplexity, learning_rate, grad_norm
    OUT/loss_curve.png       seaborn figure of the log, best checkpoint marked
    OUT/adapter/             LoRA runs only: the best adapter, unmerged (peft format)
    OUT/model/               the best model (LoRA merged) + tokenizer; present only once training finished
    OUT/finetune.json        summary: settings, data statistics, steps, best checkpoint and loss, throughput

``OUT/model`` is written under a temporary name and renamed when complete, so a folder named ``model`` is
always a whole model that :func:`clap.models.load_hf_model` (and ``clap patch``) loads directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap.devices import resolve_device
from clap.errors import ClapError
from finetuning.checkpoints import SkippedCheckpoint, find_resumable, set_aside
from finetuning.config import FinetuneConfig, load_config, resume_conflicts, write_yaml
from finetuning.data import (
    load_corpus,
    make_collator,
    prepare_datasets,
    training_tokenizer,
)
from finetuning.log import CsvLogCallback, write_log_csv, write_loss_figure

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
INCOMPLETE = "checkpoints-incomplete"
MODEL = "model"
ADAPTER = "adapter"
SUMMARY = "finetune.json"
CONFIG = "config.yaml"
RUN = "run.json"
LOG_CSV = "training_log.csv"
FIGURE = "loss_curve.png"
#: Files that mark a folder as a fine-tuning output (so ``overwrite`` never deletes an unrelated folder).
OWN_NAMES = (CHECKPOINTS, INCOMPLETE, MODEL, ADAPTER, SUMMARY, CONFIG, RUN, LOG_CSV, FIGURE)


class FinetuneError(ClapError):
    """Fine-tuning cannot start or resume (bad model, output folder in the way, settings that do not fit)."""


@dataclass
class FinetuneResult:
    """Where the run left its outputs, and what it achieved."""

    output_dir: Path
    model_dir: Path
    global_step: int
    best_checkpoint: str | None
    best_eval_loss: float | None
    initial_eval_loss: float | None
    stopped_early: bool
    resumed_from: str | None
    already_complete: bool = False
    #: newer checkpoints passed over on resume because they were incomplete (name, reason, where they were moved)
    skipped_checkpoints: list[SkippedCheckpoint] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def log_csv(self) -> Path:
        return self.output_dir / LOG_CSV

    @property
    def figure(self) -> Path:
        return self.output_dir / FIGURE


def model_context_length(hf_config: Any) -> int | None:
    """The longest input the model's position scheme supports (GPT-2: n_positions; Llama: max_position_embeddings)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_output_path(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be used; ``overwrite`` never deletes files that are not ours."""
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output path {out} exists and is not a folder")
    # the folder is created only after the model has loaded: check now that it can be (minutes earlier)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise FinetuneError(f"output path {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"output path {out} cannot be written: no write permission on {existing}")
    if overwrite and out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(OWN_NAMES))
        if foreign:
            raise FinetuneError(
                f"refusing to overwrite {out}: it holds files that are not fine-tuning outputs "
                f"({', '.join(foreign[:5])})"
            )


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out`` (emptied first under ``overwrite``) and drop leftovers of an interrupted final save."""
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model.partial-*"):  # a save interrupted before its rename: never a model
        shutil.rmtree(stale, ignore_errors=True)


def _check_resume(out: Path, config: FinetuneConfig, model_source: str) -> None:
    """A rerun into a folder with checkpoints must train the same model on the same data layout."""
    saved_path = out / CONFIG
    if not saved_path.is_file():
        return
    saved = load_config(None, saved_path)
    conflicts = resume_conflicts(saved, config)
    meta = out / RUN
    if meta.is_file():
        saved_source = json.loads(meta.read_text()).get("model")
        if saved_source and saved_source != model_source:
            conflicts.append(f"model ({saved_source!r} before, {model_source!r} now)")
    if conflicts:
        raise FinetuneError(
            f"{out} holds checkpoints of a run with different settings ({', '.join(conflicts)}); "
            "resume with the same settings, choose another output folder, or pass --overwrite to start again"
        )


def _summary_result(out: Path, summary: dict[str, Any], already: bool) -> FinetuneResult:
    return FinetuneResult(
        output_dir=out, model_dir=out / MODEL, global_step=summary["global_step"],
        best_checkpoint=summary.get("best_checkpoint"), best_eval_loss=summary.get("best_eval_loss"),
        initial_eval_loss=summary.get("initial_eval_loss"), stopped_early=summary.get("stopped_early", False),
        resumed_from=summary.get("resumed_from"), already_complete=already, summary=summary,
        skipped_checkpoints=[SkippedCheckpoint(**s) for s in summary.get("skipped_checkpoints", [])],
    )


def _declare_causal_lm_loss(model: Any) -> None:
    """Name the causal-LM loss explicitly on models whose class name does not reveal it (``GPT2LMHeadModel``).

    Why: transformers derives ``loss_type`` from the class name; for ``None`` the model still uses the causal-LM
    loss, but the Trainer then counts every label, not the shifted ones, when it normalises a batch's summed loss
    (``num_items_in_batch``). Losses and gradients come out scaled by (L-1)/L: a 64-token row reports 63/64 of its
    real mean token NLL. With ``ForCausalLM`` named, the training loss is the exact mean token NLL. The reported
    validation loss is the Trainer's mean of per-batch token means: exact for equal-length rows (config II chunks),
    approximate when rows differ in length (config I abstracts shorter than ``max_length``).
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    if getattr(model, "loss_type", None) not in LOSS_MAPPING:
        model.loss_type = "ForCausalLM"


def _wrap_lora(model: Any, config: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise FinetuneError(f"cannot attach LoRA adapters: {exc}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def training_arguments(config: FinetuneConfig, checkpoints: Path, device: str, resuming: bool,
                       progress: bool) -> Any:
    """The Trainer settings that implement ``config`` (evaluation and checkpoint on the same schedule)."""
    from transformers import TrainingArguments

    extra: dict[str, Any] = {}
    if config.gradient_checkpointing:  # only when asked: the argument was renamed in transformers 5
        extra["gradient_checkpointing"] = True
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        eval_strategy=config.eval_strategy,
        save_strategy=config.eval_strategy,
        eval_steps=config.eval_steps,
        save_steps=config.eval_steps,
        eval_on_start=config.eval_on_start and not resuming,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # the early-stopping patience count survives a resume
        include_num_input_tokens_seen="non_padding",
        seed=config.seed,
        use_cpu=device == "cpu",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        prediction_loss_only=True,
        **extra,
    )


def _save_final(trainer: Any, tokenizer: Any, config: FinetuneConfig, out: Path) -> None:
    """Write the best model (adapter merged) and the tokenizer as it was loaded; rename into place at the end."""
    model = trainer.model
    if config.lora:
        adapter_partial = out / f"{ADAPTER}.partial"
        shutil.rmtree(adapter_partial, ignore_errors=True)
        model.save_pretrained(str(adapter_partial))
        shutil.rmtree(out / ADAPTER, ignore_errors=True)
        adapter_partial.rename(out / ADAPTER)
        model = model.merge_and_unload()
    model.config.use_cache = True
    partial = out / f"{MODEL}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    (partial / "clap-finetune.json").write_text(json.dumps({"preset": config.preset, "lora_merged": config.lora}))
    target = out / MODEL
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "datasets": datasets.__version__, "python": platform.python_version()}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def finetune(
    corpus: str | Path,
    model: str,
    output_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` (any source :func:`clap.models.load_hf_model` accepts) on ``corpus``.

    Settings come from ``config`` or, when it is ``None``, from ``preset`` + ``config_file`` + ``overrides``. A
    rerun into the same ``output_dir`` resumes from its newest complete checkpoint (half-written newer ones are
    moved to ``checkpoints-incomplete/`` and reported); a finished run is not repeated (its summary is returned)
    unless ``overwrite`` is set. ``callbacks`` are extra ``TrainerCallback`` objects.

    Parameters
    ----------
    corpus : str or Path
        The output folder of ``clap corpus build`` (or its ``dataset`` sub-folder).
    model : str
        A hub id, model folder, ``.gguf`` file or built-in name.
    output_dir : str or Path
        Where checkpoints, the training log, the loss figure, ``finetune.json`` and ``model/`` are written.
    config : FinetuneConfig, optional
        The settings; when ``None`` they come from ``preset``, ``config_file`` and ``overrides``
        (:func:`~finetuning.config.load_config`).
    preset, config_file, overrides : optional
        Used only when ``config`` is ``None``.
    tokenizer : str, optional
        Where to load the tokenizer from, when not from ``model``.
    overwrite : bool, default False
        Start afresh in an ``output_dir`` that holds a previous run (never deletes files that are not ours).
    callbacks : iterable of transformers.TrainerCallback
        Extra callbacks.
    progress : bool, default True
        Show progress bars.

    Returns
    -------
    FinetuneResult
        ``model_dir`` (loads like any model folder, e.g. in ``clap patch``), ``best_eval_loss``,
        ``initial_eval_loss``, ``global_step``, ``stopped_early``, ``resumed_from``, ``log_csv``, ``figure``.

    Raises
    ------
    FinetuneError
        A model that cannot be loaded, an output folder in the way or a rerun with different data or model settings.
    FinetuneDataError, FinetuneConfigError
        An unusable corpus or bad settings, before any model is loaded.

    Examples
    --------
    >>> from finetuning import finetune, from_preset
    >>> result = finetune("corpus/", "gpt2-dir/", "run/", from_preset("config-ii", epochs=3))  # doctest: +SKIP
    >>> result.model_dir  # doctest: +SKIP
    PosixPath('run/model')
    """
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    from clap.models import load_hf_model

    if config is None:
        config = load_config(preset, config_file, overrides)
    config.validate()
    device = resolve_device(config.device, where=config.origin_of("device"))
    out = Path(output_dir).expanduser()
    _check_output_path(out, overwrite)
    summary_path = out / SUMMARY
    if not overwrite and (out / MODEL).is_dir() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "complete":
            log.info("%s already holds a finished fine-tuning run; pass --overwrite to train again", out)
            return _summary_result(out, summary, already=True)

    checkpoints = out / CHECKPOINTS
    resume, skipped = find_resumable(checkpoints) if not overwrite else (None, [])
    last = str(resume) if resume else None
    if last or skipped:
        _check_resume(out, config, model)

    # Everything that can be refused is checked before the output folder is created or changed.
    corpus_data = load_corpus(corpus, config.text_column)
    hf_model, tok, location = load_hf_model(
        model, tokenizer=tokenizer, dtype=config.dtype, device=device, attn_implementation=config.attn_implementation
    )
    context = model_context_length(hf_model.config)
    if context is not None and config.max_length > context:
        raise FinetuneError(
            f"max_length {config.max_length} is longer than the model's context of {context} tokens "
            f"({location}); set max_length to {context} or less"
        )
    train_tok = training_tokenizer(tok)
    train_ds, valid_ds, stats = prepare_datasets(corpus_data, train_tok, config)

    _prepare_output(out, overwrite)
    skipped = set_aside(checkpoints, skipped, out / INCOMPLETE)
    for entry in skipped:
        log.warning("skipping incomplete checkpoint %s: %s; moved to %s", entry.name, entry.reason, entry.moved_to)
    write_yaml(config, out / CONFIG)
    (out / RUN).write_text(json.dumps({"model": model, "location": location, "corpus": str(corpus)}, indent=2))

    _declare_causal_lm_loss(hf_model)
    hf_model.train()
    if config.lora:
        set_seed(config.seed)  # LoRA's A matrices are drawn here, before the Trainer seeds: same seed, same run
        hf_model = _wrap_lora(hf_model, config)
    early = EarlyStoppingCallback(config.patience, config.early_stopping_threshold)
    args = training_arguments(config, checkpoints, device, resuming=bool(last), progress=progress)
    trainer = Trainer(
        model=hf_model, args=args, train_dataset=train_ds, eval_dataset=valid_ds,
        data_collator=make_collator(train_tok, config), processing_class=train_tok,
        callbacks=[early, CsvLogCallback(out / LOG_CSV), *callbacks],
    )
    if last:
        log.info("resuming from %s", Path(last).name)
    elif skipped:
        log.warning("no complete checkpoint to resume from: training starts again from step 0")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - started

    _save_final(trainer, tok, config, out)
    summary = _summarise(trainer, output.metrics, wall, early, config, stats, last)
    summary["skipped_checkpoints"] = [asdict(entry) for entry in skipped]
    summary.update({"model": model, "model_location": location, "corpus": str(corpus), "device": device})
    write_loss_figure(out / LOG_CSV, out / FIGURE, title=f"{Path(str(model)).name} · {config.preset}",
                      best_step=summary["best_step"])
    partial = summary_path.with_name(SUMMARY + ".partial")
    partial.write_text(json.dumps(summary, indent=2, default=_json_default))
    partial.replace(summary_path)  # written last: "status: complete" means every output above is in place
    log.info(
        "fine-tuning finished at step %d (best %s, validation loss %s -> %s%s); model in %s", summary["global_step"],
        summary["best_checkpoint"], summary["initial_eval_loss"], summary["best_eval_loss"],
        ", stopped early" if summary["stopped_early"] else "", out / MODEL,
    )
    return _summary_result(out, summary, already=False)


def _summarise(trainer: Any, metrics: dict[str, Any], wall: float, early: Any, config: FinetuneConfig,
               stats: dict[str, Any], resumed_from: str | None) -> dict[str, Any]:
    """What ``finetune.json`` records about a finished run (the log CSV is rewritten from the final state too)."""
    state = trainer.state
    rows = write_log_csv(state.log_history, Path(trainer.args.output_dir).parent / LOG_CSV)
    evals = [r for r in rows if r["split"] == "validation"]
    tokens = int(state.num_input_tokens_seen or 0)
    runtime = metrics.get("train_runtime", wall)
    summary = {
        "status": "complete",
        "config": config.to_dict(),
        "data": {split: asdict(s) for split, s in stats.items()},
        "global_step": state.global_step,
        "epochs_done": state.epoch,
        "max_steps": state.max_steps,
        "stopped_early": early.early_stopping_patience_counter >= config.patience,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "best_step": getattr(state, "best_global_step", None) or _step_of(state.best_model_checkpoint),
        "best_eval_loss": state.best_metric,
        "initial_eval_loss": next((r["loss"] for r in evals if r["step"] == 0), None),
        "final_eval_loss": evals[-1]["loss"] if evals else None,
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "train_runtime_s": runtime,  # this call only (after a resume: the resumed part)
        "train_tokens_seen": tokens,  # since the start of training, including steps before a resume
        "train_loss": metrics.get("train_loss"),
        "versions": _versions(),
    }
    if not resumed_from and runtime > 0 and tokens:
        summary["tokens_per_second"] = tokens / runtime
    return summary


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
