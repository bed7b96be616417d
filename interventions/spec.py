"""The study spec: one validated schema for YAML files and Python objects.

A spec says *what* to patch (model, probes, sites, positions, direction, operations, metrics) and *how* to run it
(execution). It is serialisable (``model_dump``) so every results directory records the exact resolved spec, in
the spirit of pyvene's intervention configs. Validation errors name the file, the line and the field, and suggest
the nearest valid field name for typos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clap.analysis_options import AnalysisOptions
from clap.errors import ClapError
from clap.validation import StrictModel
from clap.validation import format_validation_error as _format_validation_error
from clap.yamlio import line_of, load_yaml


class SpecError(ClapError):
    pass


class ModelSpec(StrictModel):
    """Which weights: a hub id, a local directory, a ``.gguf`` file, or a built-in name (``smollm2-135m``).

    A relative ``source`` (or ``tokenizer``) path is resolved like ``probes.file``, against the spec file's folder,
    when something exists there; otherwise it is used as given (a hub id, or a path from the working directory)."""

    source: str
    gguf_file: str | None = None
    tokenizer: str | None = None
    revision: str | None = None


AnswerTokens = Union[str, int, list[Union[str, int]]]


class ProbeSpec(StrictModel):
    """One clean/corrupted prompt pair and the answers whose logits are compared."""

    id: str | None = None
    clean: str
    corrupted: str
    answer: AnswerTokens  #: the clean answer: a token string, a token id, or a set of them
    wrong: AnswerTokens | None = None  #: the answer the corrupted prompt elicits (for logit difference)
    labels: dict[str, str] = Field(default_factory=dict)  #: grouping labels, e.g. knowledge_type

    @field_validator("clean", "corrupted")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty prompt")
        return value

    @field_validator("answer", "wrong")
    @classmethod
    def _non_empty_set(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty token set; give a token string, a token id, or a non-empty list of them")
        return value


class ProbeSetSpec(StrictModel):
    """Probes inline or from a JSONL/YAML file (relative paths are relative to the spec file)."""

    file: str | None = None
    inline: list[ProbeSpec] | None = None
    #: what to do when an answer string is several tokens: refuse, take the first token, or use them as a set
    multi_token: Literal["error", "first", "set"] = "error"

    @model_validator(mode="after")
    def _one_source(self) -> "ProbeSetSpec":
        if (self.file is None) == (self.inline is None):
            raise ValueError("give exactly one of `file` (a JSONL/YAML probe file) or `inline` (a list of probes)")
        return self


class MatchPosition(StrictModel):
    """The tokens that overlap a substring (e.g. the subject), patched together."""

    match: str
    prompt: Literal["clean", "corrupted"] = "clean"
    occurrence: int = 0  #: which occurrence of the substring (0 = first, -1 = last)


class IndexPositions(StrictModel):
    """Explicit token indices (negative = from the end), patched together as one cell."""

    indices: list[int]


PositionSelector = Union[Literal["all", "each", "last", "none"], int, MatchPosition, IndexPositions]


class OperationSpec(StrictModel):
    """What a patched activation becomes.

    * ``replace``: the source run's activation (clean for denoising, corrupted for noising);
    * ``zero``; ``mean``: the mean source activation over the probe set at that position counted from the end
      (prompts are right-aligned, so with probes of different lengths the earliest positions of the longest
      prompts average fewer probes; with a single probe of that length ``mean`` equals ``replace`` there);
    * ``noise``: the target activation plus Gaussian noise with std ``scale`` (``relative_to: embedding_std``
      makes it ``scale`` x the std of the token embeddings over the probe set, e.g. ROME's 3 sigma);
    * ``resample``: the source activation of another probe (a seeded derangement of the probe set).
    """

    name: Literal["replace", "zero", "mean", "noise", "resample"]
    scale: float | None = None
    relative_to: Literal["absolute", "embedding_std"] = "absolute"

    @model_validator(mode="after")
    def _scale_for_noise(self) -> "OperationSpec":
        if self.name == "noise" and (self.scale is None or self.scale <= 0):
            raise ValueError("operation `noise` needs a positive `scale`")
        if self.name != "noise" and self.scale is not None:
            raise ValueError(f"`scale` only applies to operation `noise`, not {self.name!r}")
        return self

    @property
    def label(self) -> str:
        if self.name != "noise":
            return self.name
        unit = "sd" if self.relative_to == "embedding_std" else ""
        return f"noise({self.scale:g}{unit})"


Metric = Literal["logit_diff", "logit", "prob", "logprob", "kl"]  # the names of clap.contract.METRICS (a test checks they agree)


class ExecutionSpec(StrictModel):
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: most rows (baselines + patched) in one forward pass; None = derive from memory_budget_mb
    max_rows: int | None = Field(default=None, ge=3)
    memory_budget_mb: float | None = Field(default=None, gt=0)
    #: False: local; True: NDIF (key from NDIF_API_KEY or nnsight's config); "local": nnsight's local simulation
    remote: Union[bool, Literal["local"]] = False
    progress: bool = True


class PatchGroup(StrictModel):
    """Sites patched at their own positions/operations (e.g. a layer x position residual sweep beside a
    last-token sweep of attention and MLP outputs). Unset fields fall back to the study's."""

    sites: list[str] = Field(min_length=1)
    positions: list[PositionSelector] | None = Field(default=None, min_length=1)
    operations: list[OperationSpec] | None = Field(default=None, min_length=1)

    @field_validator("operations", mode="before")
    @classmethod
    def _operation_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class StudySpec(StrictModel):
    """A whole patching study. ``StudySpec.from_yaml(path)`` or build it in Python; both validate the same way."""

    name: str = "study"
    model: ModelSpec
    probes: ProbeSetSpec
    #: site addresses patched at ``positions`` with ``operations``; give ``sites``, ``patches`` or both
    sites: list[str] | None = Field(default=None, min_length=1)
    #: further groups of sites with their own positions/operations
    patches: list[PatchGroup] | None = Field(default=None, min_length=1)
    positions: list[PositionSelector] = Field(default_factory=lambda: ["last"], min_length=1)
    direction: Literal["denoising", "noising"] = "denoising"
    operations: list[OperationSpec] = Field(default_factory=lambda: [OperationSpec(name="replace")], min_length=1)
    metrics: list[Metric] = Field(default_factory=lambda: ["logit_diff"], min_length=1)
    #: clean/corrupted pairs of different token lengths: refuse (strict) or align them at the end (right)
    alignment: Literal["strict", "right"] = "strict"
    #: |clean - corrupted| below this makes recovery undefined (NaN), never a division
    recovery_epsilon: float = Field(default=1e-6, ge=0)
    seed: int = 0
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    #: how `clap analyze` reduces and tests the results (see clap.analysis_options); recorded in run.json
    analysis: AnalysisOptions | None = None

    #: where the spec was read from (relative probe files resolve against it); not part of the schema
    _base_dir: Path | None = None
    #: the spec file and its key-path -> line map, so checks after validation can name file and line too
    _source: str | None = None
    _lines: dict | None = None

    @field_validator("operations", mode="before")
    @classmethod
    def _operation_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _something_to_patch(self) -> "StudySpec":
        if not self.sites and not self.patches:
            raise ValueError("name the sites to patch: `sites: [...]` and/or `patches: [{sites: [...]}, ...]`")
        return self

    def groups(self) -> list[tuple[list[str], list, list[OperationSpec]]]:
        """(site addresses, positions, operations) per patch group, with defaults filled in."""
        out = []
        if self.sites:
            out.append((self.sites, self.positions, self.operations))
        for group in self.patches or []:
            out.append((group.sites, group.positions or self.positions, group.operations or self.operations))
        return out

    def all_operations(self) -> list[OperationSpec]:
        return [op for _, _, ops in self.groups() for op in ops]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudySpec":
        path = Path(path)
        data, lines = load_yaml(path)
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a study spec is a YAML mapping (model:, probes:, sites:, ...)")
        spec = cls.from_dict(data, source=str(path), lines=lines)
        spec._base_dir = path.parent
        spec._source = str(path)
        spec._lines = lines
        return spec

    @classmethod
    def from_dict(cls, data: dict, source: str = "<spec>", lines: dict | None = None) -> "StudySpec":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, source, lines or {}, cls)) from None

    @property
    def base_dir(self) -> Path:
        return self._base_dir or Path.cwd()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def where(self, location: tuple) -> str:
        """``study.yaml:7: patches[1].sites[0]`` for a key path, for errors found after validation (sites, devices);
        just the field path when the spec was built in Python."""
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location).lstrip(".")
        if self._source is None:
            return field
        line = line_of(self._lines or {}, location)
        return f"{self._source}:{line}: {field}" if line else f"{self._source}: {field}"


POSITION_HELP = (
    "a position is all | each | last | none | an integer (negative = from the end) | {match: text} | "
    "{indices: [integers]}"
)


def format_validation_error(exc: ValidationError, source: str, lines: dict, model: type[BaseModel]) -> str:
    """One line per problem: ``file:line: field.path: what was expected`` (+ nearest names for unknown keys)."""
    return _format_validation_error(exc, source, lines, model, title="invalid study spec",
                                    unions={"positions": POSITION_HELP})
