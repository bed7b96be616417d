"""Fine-tuning settings: the seed study's two configurations by name, overridable field by field.

Why a dataclass of plain fields: the same object is filled from a preset, then from a YAML file, then from the
command line (each layer overriding the one before), and is written back next to the model so a run is
reproducible from its output folder alone. Every field is checked once, here, with a message that names the
field (and, for YAML, the file and line).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from clap.errors import ClapError, closest
from clap.yamlio import SourceError, load_yaml


class FinetuneConfigError(ClapError):
    """A fine-tuning setting is unknown or out of range."""


#: How texts become training rows. ``truncate``: one abstract per row, cut/padded to ``max_length`` (config I).
#: ``chunk``: all abstracts tokenised, concatenated and cut into ``max_length`` blocks (config II).
MODES = ("truncate", "chunk")
STRATEGIES = ("epoch", "steps")
PADDINGS = ("max_length", "longest")


@dataclass
class FinetuneConfig:
    """One fine-tuning run's settings. Defaults are configuration I of the seed study."""

    preset: str = "config-i"
    mode: str = "truncate"
    epochs: float = 30.0
    max_steps: int = -1  #: > 0 overrides ``epochs`` (Trainer semantics)
    max_length: int = 512
    padding: str = "max_length"  #: truncate mode only; ``longest`` pads per batch (same loss, less compute)
    learning_rate: float = 5e-5
    batch_size: int = 8
    eval_batch_size: int | None = None  #: ``None``: same as ``batch_size``
    grad_accumulation: int = 4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    patience: int = 3  #: evaluations without improvement before early stopping
    early_stopping_threshold: float = 0.0
    eval_strategy: str = "epoch"  #: checkpoints follow evaluations (``load_best_model_at_end`` needs both)
    eval_steps: int | None = None  #: for ``eval_strategy: steps``
    logging_steps: int = 10
    save_total_limit: int | None = 2  #: the best checkpoint is always kept in addition
    subset: int | None = None  #: use only the first N training records
    eval_subset: int | None = None  #: use only the first N validation records
    seed: int = 42
    text_column: str = "text"
    append_eos: bool = False  #: end every abstract with the EOS token before tokenising
    eval_on_start: bool = True  #: evaluate the untouched model first, so the log shows where training began
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  #: ``None``: peft's default for the architecture
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"  #: ``auto``: CUDA when available, else CPU
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0

    def validate(self) -> "FinetuneConfig":
        """Check ranges and choices; return self so calls chain."""
        def bad(name: str, expected: str) -> FinetuneConfigError:
            return FinetuneConfigError(f"fine-tuning setting {name!r} = {getattr(self, name)!r}: expected {expected}")

        if self.mode not in MODES:
            raise bad("mode", f"one of {', '.join(MODES)}")
        if self.padding not in PADDINGS:
            raise bad("padding", f"one of {', '.join(PADDINGS)}")
        if self.eval_strategy not in STRATEGIES:
            raise bad("eval_strategy", f"one of {', '.join(STRATEGIES)}")
        if self.eval_strategy == "steps" and not (self.eval_steps and self.eval_steps > 0):
            raise bad("eval_steps", "a positive integer when eval_strategy is 'steps'")
        if not self.epochs > 0 and self.max_steps <= 0:
            raise bad("epochs", "a positive number (or max_steps > 0)")
        for name in ("max_length", "batch_size", "grad_accumulation", "patience", "logging_steps", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "a positive integer")
        for name in ("warmup_steps", "dataloader_workers"):
            if int(getattr(self, name)) < 0:
                raise bad(name, "zero or a positive integer")
        for name in ("subset", "eval_subset", "eval_batch_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise bad(name, "a positive integer or null")
        if self.learning_rate < 0:
            raise bad("learning_rate", "zero or a positive number")
        if self.weight_decay < 0:
            raise bad("weight_decay", "zero or a positive number")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise bad("dtype", "float32, bfloat16 or float16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        """A copy with ``changes`` applied (names checked, values coerced), validated."""
        return apply_overrides(self, changes, origin="argument")


#: The seed study's configurations (its published training code). Config II: "otherwise as I".
PRESETS: dict[str, dict[str, Any]] = {
    "config-i": dict(
        mode="truncate", epochs=30, max_length=512, learning_rate=5e-5, batch_size=8, grad_accumulation=4,
        warmup_steps=500, weight_decay=0.01, eval_strategy="epoch", patience=3, seed=42,
    ),
    "config-ii": dict(
        mode="chunk", epochs=10, max_length=512, learning_rate=2e-5, batch_size=8, grad_accumulation=4,
        warmup_steps=500, weight_decay=0.1, eval_strategy="epoch", patience=5, seed=42,
    ),
}

FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Turn a YAML/CLI value into the field's type; a wrong type names the field and where it came from."""
    kind = FIELDS[name].type
    if value is None:
        if "None" in kind:
            return None
        raise FinetuneConfigError(f"{origin}: fine-tuning setting {name!r} cannot be null")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise FinetuneConfigError(
            f"{origin}: fine-tuning setting {name!r} = {value!r}: expected {kind.replace(' | None', ' or null')}"
        ) from None


def apply_overrides(config: FinetuneConfig, changes: Mapping[str, Any], origin: str = "override",
                    lines: Mapping[str, int] | None = None, validate: bool = True) -> FinetuneConfig:
    """Apply ``changes`` on top of ``config``; unknown names are refused with the closest valid ones.

    ``validate=False`` is for intermediate layers: a YAML file may choose ``eval_strategy: steps`` and leave
    ``eval_steps`` to the command line, so only the final combination is checked.
    """
    values = config.to_dict()
    for name, value in changes.items():
        where = f"{origin}:{lines[name]}" if lines and name in lines else origin
        if name not in FIELDS:
            hint = closest(str(name), FIELDS)
            raise FinetuneConfigError(
                f"{where}: unknown fine-tuning setting {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
            )
        values[name] = _coerce(name, value, where)
    result = FinetuneConfig(**values)
    return result.validate() if validate else result


def from_preset(name: str = "config-i", **overrides: Any) -> FinetuneConfig:
    """The named preset with ``overrides`` applied."""
    if name not in PRESETS:
        raise FinetuneConfigError(f"unknown fine-tuning preset {name!r}; expected one of {', '.join(PRESETS)}")
    base = apply_overrides(FinetuneConfig(), {"preset": name, **PRESETS[name]}, origin=f"preset {name}")
    return apply_overrides(base, overrides, origin="argument") if overrides else base


def read_yaml_overrides(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML mapping of settings and the line of each key (for error messages)."""
    try:
        data, lines = load_yaml(Path(path))
    except SourceError as exc:
        raise FinetuneConfigError(str(exc).replace("file not found", "fine-tuning config file not found")) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise FinetuneConfigError(f"{path}: expected a mapping of fine-tuning settings, got {type(data).__name__}")
    return data, {key[0]: line for key, line in lines.items() if len(key) == 1}


def load_config(preset: str | None = None, yaml_path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> FinetuneConfig:
    """Preset, then YAML file, then explicit overrides (CLI flags), each layer winning over the one before.

    The YAML file may itself name the preset (``preset: config-ii``); an explicit ``preset`` argument wins.
    """
    data, lines = read_yaml_overrides(yaml_path) if yaml_path else ({}, {})
    data = dict(data)
    name = preset or data.pop("preset", None) or "config-i"
    data.pop("preset", None)
    config = from_preset(name)
    if data:
        config = apply_overrides(config, data, origin=str(yaml_path), lines=lines, validate=False)
    if overrides:
        config = apply_overrides(config, {k: v for k, v in overrides.items() if v is not None},
                                 origin="command line", validate=False)
    return config.validate()


def write_yaml(config: FinetuneConfig, path: Path) -> None:
    """The resolved settings, in a form :func:`load_config` reads back."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


#: Settings that shape the data or the model: a resumed run must use the same values as the interrupted one.
RESUME_INVARIANT = (
    "mode", "max_length", "padding", "batch_size", "grad_accumulation", "subset", "eval_subset", "seed",
    "text_column", "append_eos", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "dtype",
)


def resume_conflicts(saved: FinetuneConfig, current: FinetuneConfig) -> list[str]:
    """Names of data- or model-shaping settings that differ between an interrupted run and its rerun."""
    return [name for name in RESUME_INVARIANT if getattr(saved, name) != getattr(current, name)]


__all__ = [
    "FinetuneConfig", "FinetuneConfigError", "PRESETS", "from_preset", "load_config", "apply_overrides",
    "read_yaml_overrides", "write_yaml", "resume_conflicts",
]
