"""Fine-tuning settings: the seed study's two configurations by name, overridable field by field.

Why one pydantic schema: the same settings are filled from a preset, then from a YAML file, then from the command
line (each layer overriding the one before), and are written back next to the model so a run is reproducible from
its output folder alone. The merged settings are validated once, by the schema, and every error names where the
bad value came from: ``file:line: field`` for the YAML file, ``--lr`` for a flag, ``--set name`` for ``--set``.
Ranges are checked here, before any model is loaded: a NaN learning rate or a negative clipping norm would
otherwise train silently into garbage or fail deep inside the Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from clap.errors import ClapError, closest
from clap.validation import validation_messages
from clap.yamlio import SourceError, load_yaml


class FinetuneConfigError(ClapError):
    """A fine-tuning setting is unknown or out of range."""


#: How texts become training rows. ``truncate``: one abstract per row, cut/padded to ``max_length`` (config I).
#: ``chunk``: all abstracts tokenised, concatenated and cut into ``max_length`` blocks (config II).
MODES = ("truncate", "chunk")
STRATEGIES = ("epoch", "steps")
PADDINGS = ("max_length", "longest")

#: Finite floats only: ``nan``/``inf`` parse as floats but make no sense as any of these settings.
_FINITE = dict(allow_inf_nan=False)


def scheduler_names() -> list[str]:
    """The learning-rate schedules the Trainer accepts (``transformers.SchedulerType``)."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def attention_names() -> list[str]:
    """The attention implementations transformers accepts by name (``eager`` and its registered functions)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if k not in ("eager",))]


def _one_of(value: str, valid: list[str], what: str) -> str:
    if value not in valid:
        hint = closest(value, valid, n=3)
        raise ValueError(f"{value!r} is not {what}" + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                         + f" (valid: {', '.join(valid)})")
    return value


_NUMBERS = {int: "an integer", float: "a number", int | None: "an integer or null", float | None: "a number or null"}


class FinetuneConfig(BaseModel):
    """One fine-tuning run's settings. Defaults are configuration I of the seed study."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = "config-i"
    mode: Literal["truncate", "chunk"] = "truncate"
    epochs: float = Field(30.0, ge=0, **_FINITE)  #: > 0 unless ``max_steps`` is set
    max_steps: int = Field(-1, ge=-1)  #: > 0 overrides ``epochs`` (Trainer semantics); -1: train for ``epochs``
    max_length: int = Field(512, ge=1)
    padding: Literal["max_length", "longest"] = "max_length"  #: truncate mode; ``longest`` pads per batch
    learning_rate: float = Field(5e-5, gt=0, **_FINITE)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)  #: ``None``: same as ``batch_size``
    grad_accumulation: int = Field(4, ge=1)
    warmup_steps: int = Field(500, ge=0)
    weight_decay: float = Field(0.01, ge=0, **_FINITE)
    lr_scheduler: str = "linear"  #: a ``transformers.SchedulerType`` value
    max_grad_norm: float = Field(1.0, ge=0, **_FINITE)  #: 0: no clipping
    patience: int = Field(3, ge=1)  #: evaluations without improvement before early stopping
    early_stopping_threshold: float = Field(0.0, ge=0, **_FINITE)
    eval_strategy: Literal["epoch", "steps"] = "epoch"  #: checkpoints follow evaluations (best-model reload)
    eval_steps: int | None = Field(None, ge=1)  #: for ``eval_strategy: steps``
    logging_steps: int = Field(10, ge=1)
    save_total_limit: int | None = Field(2, ge=1)  #: the best checkpoint is always kept in addition
    subset: int | None = Field(None, ge=1)  #: use only the first N training records
    eval_subset: int | None = Field(None, ge=1)  #: use only the first N validation records
    seed: int = Field(42, ge=0, le=2**32 - 1)  #: numpy's seed range
    text_column: str = Field("text", min_length=1)
    append_eos: bool = False  #: end every abstract with the EOS token before tokenising
    eval_on_start: bool = True  #: evaluate the untouched model first, so the log shows where training began
    lora: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1, **_FINITE)
    lora_target_modules: list[str] | None = Field(None, min_length=1)  #: ``None``: peft's default for the model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"  #: ``auto``: CUDA when available, else CPU (checked by :func:`clap.devices.resolve_device`)
    gradient_checkpointing: bool = False
    dataloader_workers: int = Field(0, ge=0)

    #: where each setting that did not come from the preset was given (``--lr``, ``over.yaml:3: learning_rate``)
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        """``batch_size: true`` is a mistake, not 1 (pydantic's lax mode would take it as 1)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in _NUMBERS:
            raise ValueError(f"expected {_NUMBERS[annotation]}, got {value!r}")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _one_of(value, scheduler_names(), "a learning-rate schedule")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str) -> str:
        if "/" in value:  # a kernel from the hub (``kernels-community/...``): transformers checks it when loading
            return value
        return _one_of(value, attention_names(), "an attention implementation")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # ``--lora-targets q_proj,v_proj`` / ``--set lora_target_modules=...``
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def origin_of(self, name: str) -> str:
        """Where setting ``name`` was given, for error messages (``--device``, ``run.yaml:4: device``)."""
        return self._origins.get(name, f"fine-tuning setting {name}")

    def validate(self) -> FinetuneConfig:  # type: ignore[override]
        """Check the settings that depend on each other; return self so calls chain."""
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise FinetuneConfigError(f"{self.origin_of('eval_steps')}: expected a positive integer when "
                                      "eval_strategy is 'steps', got null")
        if self.epochs == 0 and self.max_steps <= 0:
            raise FinetuneConfigError(f"{self.origin_of('epochs')}: expected a positive number (or max_steps > 0), "
                                      "got 0")
        if self.max_steps == 0:
            raise FinetuneConfigError(f"{self.origin_of('max_steps')}: expected a positive number of steps, or -1 to "
                                      "train for 'epochs', got 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with ``changes`` applied (names and values checked), validated."""
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

FIELDS = tuple(FinetuneConfig.model_fields)


def build_config(values: Mapping[str, Any], origins: Mapping[str, str] | None = None, source: str = "settings",
                 lines: Mapping[tuple, int] | None = None, validate: bool = True) -> FinetuneConfig:
    """Validate ``values`` (all layers merged) with the schema; errors name where each bad value came from.

    ``origins`` labels settings given outside the YAML file (``{"learning_rate": "--lr"}``); the others are
    located by ``lines`` (key path -> line) in ``source``. Several problems are reported on one line, ``; ``-joined.
    """
    origins = dict(origins or {})
    try:
        config = FinetuneConfig.model_validate(dict(values))
    except ValidationError as exc:
        messages = validation_messages(exc, source, dict(lines or {}), FinetuneConfig, where=origins,
                                       show_input=True, list_valid=False)
        raise FinetuneConfigError("; ".join(messages)) from None
    located = {name: f"{source}:{lines[(name,)]}: {name}" for name in values if lines and (name,) in lines}
    config._origins = {**located, **origins}
    return config.validate() if validate else config


def apply_overrides(config: FinetuneConfig, changes: Mapping[str, Any], origin: str = "override",
                    lines: Mapping[str, int] | None = None, validate: bool = True) -> FinetuneConfig:
    """Apply ``changes`` on top of ``config``; unknown names are refused with the closest valid ones.

    ``origin`` names where the changes came from (a file, when ``lines`` maps names to its lines).
    """
    if lines is not None:
        return build_config({**config.to_dict(), **changes}, dict(config._origins), source=origin,
                            lines={(k,): v for k, v in lines.items()}, validate=validate)
    labels = {**config._origins, **{name: f"{origin} {name}" for name in changes}}
    return build_config({**config.to_dict(), **changes}, labels, source=origin, validate=validate)


def from_preset(name: str = "config-i", **overrides: Any) -> FinetuneConfig:
    """The named preset with ``overrides`` applied.

    The presets are the seed study's two configurations (:data:`PRESETS`); overrides are validated with the same
    schema as a YAML file, so a bad value is refused here, before any model is loaded.

    Parameters
    ----------
    name : str, default "config-i"
        A key of :data:`PRESETS`.
    **overrides
        Settings of :class:`FinetuneConfig` that replace the preset's.

    Returns
    -------
    FinetuneConfig
        The validated settings.

    Raises
    ------
    FinetuneConfigError
        An unknown preset (with the closest name) or an unknown or out-of-range setting.

    Examples
    --------
    >>> from finetuning import from_preset
    >>> config = from_preset("config-ii", epochs=3)
    >>> config.preset, config.epochs, config.mode, config.max_length
    ('config-ii', 3.0, 'chunk', 512)
    >>> from_preset("config-iii")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    finetuning.config.FinetuneConfigError: unknown fine-tuning preset 'config-iii'; ... (did you mean 'config-ii'?)
    """
    if name not in PRESETS:
        hint = closest(name, PRESETS)
        raise FinetuneConfigError(f"unknown fine-tuning preset {name!r}; expected one of {', '.join(PRESETS)}"
                                  + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    base = build_config({"preset": name, **PRESETS[name]}, source=f"preset {name}")
    return apply_overrides(base, overrides, origin="argument") if overrides else base


def read_yaml_overrides(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """A YAML mapping of settings and the line of each key path (for error messages)."""
    try:
        data, lines = load_yaml(Path(path))
    except SourceError as exc:
        raise FinetuneConfigError(str(exc).replace("file not found", "fine-tuning config file not found")) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise FinetuneConfigError(f"{path}: expected a mapping of fine-tuning settings, got {type(data).__name__}")
    return data, lines


def load_config(preset: str | None = None, yaml_path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None,
                origins: Mapping[str, str] | None = None) -> FinetuneConfig:
    """Preset, then YAML file, then explicit overrides (CLI flags), each layer winning over the one before.

    The YAML file may itself name the preset (``preset: config-ii``); an explicit ``preset`` argument wins. The
    merged settings are validated once, so a file may choose ``eval_strategy: steps`` and leave ``eval_steps`` to
    the command line. ``origins`` labels the overrides for error messages (``{"learning_rate": "--lr"}``; default
    ``argument NAME``).

    Parameters
    ----------
    preset : str, optional
        A key of :data:`PRESETS`; default the file's ``preset:`` or ``config-i``.
    yaml_path : str or Path, optional
        A YAML mapping of settings.
    overrides : mapping, optional
        Settings that win over the preset and the file (``None`` values mean "not given").
    origins : mapping, optional
        Where each override came from, for error messages.

    Returns
    -------
    FinetuneConfig
        The merged, validated settings.

    Raises
    ------
    FinetuneConfigError
        An unreadable file, an unknown preset or setting, or a bad value, named with its file and line or flag.

    Examples
    --------
    >>> from finetuning import load_config
    >>> config = load_config("config-i", overrides={"learning_rate": 1e-4})
    >>> config.preset, config.learning_rate
    ('config-i', 0.0001)
    """
    data, lines = read_yaml_overrides(yaml_path) if yaml_path else ({}, {})
    data = dict(data)
    name = preset or data.pop("preset", None) or "config-i"
    data.pop("preset", None)
    if not isinstance(name, str):
        raise FinetuneConfigError(f"{yaml_path}:{lines.get(('preset',), '?')}: preset: expected a preset name, "
                                  f"got {name!r}")
    base = from_preset(name)
    origins = origins or {}
    # ``None`` means "not given", except where the command line says it was (``--set subset=null``)
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None or k in origins}
    labels = {k: origins.get(k, f"argument {k}") for k in explicit}
    for key in data:  # a key given in both places is reported where it won, the command line
        if key in labels:
            lines.pop((key,), None)
    return build_config({**base.to_dict(), **data, **explicit}, labels, source=str(yaml_path or "settings"),
                        lines=lines)


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
