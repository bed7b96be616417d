"""``clap finetune``: fine-tune a causal LM on a built corpus with one of the seed study's presets.

Every setting of :class:`finetuning.config.FinetuneConfig` can be changed in a YAML file (``--config``) and
the common ones by flags; flags win over the file, the file over the preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: The presets' names (:data:`finetuning.config.PRESETS`, checked equal in the tests), written here so that
#: registering the command does not import pydantic and the schema.
PRESET_NAMES = ("config-i", "config-ii")

#: flag -> config field, for the settings worth a flag (the rest: --config YAML or --set NAME=VALUE).
FLAG_FIELDS = {
    "epochs": float, "max_steps": int, "max_length": int, "lr": float, "batch": int, "eval_batch": int,
    "grad_accum": int, "warmup": int, "weight_decay": float, "patience": int, "subset": int, "eval_subset": int,
    "seed": int, "eval_strategy": str, "eval_steps": int, "logging_steps": int, "mode": str, "padding": str,
    "device": str, "dtype": str, "lora_r": int, "lora_alpha": int, "lora_dropout": float,
}
RENAMED = {"lr": "learning_rate", "batch": "batch_size", "eval_batch": "eval_batch_size",
           "grad_accum": "grad_accumulation", "warmup": "warmup_steps"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a causal LM on a corpus (presets config-i / config-ii, early stopping, resumable)",
        description="Fine-tune a causal LM on a corpus built by `clap corpus build`. A rerun into the same output "
        "folder resumes from its newest complete checkpoint; OUT/model appears only when training has finished.",
    )
    p.add_argument("--corpus", required=True, type=Path, help="output folder of `clap corpus build` (or its dataset/)")
    p.add_argument("--model", required=True, help="model source: local folder, .gguf file, hub id or built-in name")
    p.add_argument("--tokenizer", help="tokenizer folder, when it is not stored with the model")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (checkpoints, log, figure, model/)")
    p.add_argument("--preset", choices=PRESET_NAMES, help="seed-study configuration (default: config-i)")
    p.add_argument("--config", type=Path, help="YAML file of settings overriding the preset")
    for flag, kind in FLAG_FIELDS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None,
                       help=f"override setting {RENAMED.get(flag, flag)}")
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters, merged into the saved model")
    p.add_argument("--lora-targets",
                   help="comma-separated module names for LoRA (default: peft's for the architecture)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override any other setting (repeatable), e.g. --set append_eos=true")
    p.add_argument("--overwrite", action="store_true", help="discard previous outputs in OUT and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """Flags that were given, under their setting names, and where each came from (``--lr``, ``--set NAME``).

    ``--set`` values stay strings; the schema converts and checks them like YAML values.
    """
    from finetuning.config import FinetuneConfigError

    changes: dict = {}
    origins: dict[str, str] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise FinetuneConfigError(f"--set {item!r}: expected NAME=VALUE")
        changes[name.strip()] = None if value.strip().lower() in ("null", "none") else value.strip()
        origins[name.strip()] = f"--set {name.strip()}"
    for flag in FLAG_FIELDS:
        value = getattr(args, flag)
        if value is not None:
            changes[RENAMED.get(flag, flag)] = value
            origins[RENAMED.get(flag, flag)] = f"--{flag.replace('_', '-')}"
    if args.lora:
        changes["lora"] = True
        origins["lora"] = "--lora"
    if args.lora_targets:
        changes["lora_target_modules"] = args.lora_targets
        origins["lora_target_modules"] = "--lora-targets"
    return changes, origins


def run(args: argparse.Namespace) -> int:
    from finetuning.config import load_config
    from finetuning.train import finetune

    changes, origins = overrides_from_args(args)
    config = load_config(args.preset, args.config, changes, origins)
    result = finetune(args.corpus, args.model, args.out, config, tokenizer=args.tokenizer,
                      overwrite=args.overwrite, progress=not args.no_progress)
    s = result.summary
    if result.already_complete:
        print(f"{args.out} already holds a finished run (use --overwrite to train again)")
    print(f"model:      {result.model_dir}")
    print(f"steps:      {s['global_step']} (best {s.get('best_checkpoint')}, validation loss "
          f"{s.get('initial_eval_loss') or float('nan'):.4f} -> {s.get('best_eval_loss') or float('nan'):.4f})"
          + ("; stopped early" if s.get("stopped_early") else ""))
    if result.resumed_from and not result.already_complete:
        print(f"resumed:    from {result.resumed_from}")
    for entry in result.skipped_checkpoints:
        print(f"skipped:    {entry.name} ({entry.reason}); moved to {entry.moved_to}")
    print(f"log:        {result.log_csv}")
    print(f"figure:     {result.figure}")
    return 0
