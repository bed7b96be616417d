"""The study spec: one validated schema for YAML files and Python objects.

A spec says *what* to patch (model, probes, sites, positions, direction, operations, metrics) and *how* to run it
(execution). It is serialisable (``model_dump``) so every results directory records the exact resolved spec, in
the spirit of pyvene's intervention configs. Validation errors name the file, the line and the field, and suggest
the nearest valid field name for typos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clap.analysis_options import AnalysisOptions
from clap.errors import ClapError
from clap.names import name_problem
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


AnswerTokens = str | int | list[str | int]


class ProbeSpec(StrictModel):
    """One clean/corrupted prompt pair and the answers whose logits are compared."""

    id: str | None = None
    clean: str
    #: the corrupted prompt; a causal trace never reads it (its corrupted run is the clean prompt + noise), so trace
    #: probes may leave it out; every other study needs it (checked when the probes are loaded)
    corrupted: str | None = None
    answer: AnswerTokens  #: the clean answer: a token string, a token id, or a set of them
    wrong: AnswerTokens | None = None  #: the answer the corrupted prompt elicits (for logit difference)
    labels: dict[str, str] = Field(default_factory=dict)  #: grouping labels, e.g. knowledge_type

    @field_validator("id")
    @classmethod
    def _file_safe_id(cls, value: str | None) -> str | None:
        """An id names files (``trace_<id>.png``): no path separators, ``..`` or control characters."""
        problem = name_problem(value) if value is not None else None
        if problem:
            raise ValueError(f"probe id {value!r} {problem}")
        return value

    @field_validator("clean", "corrupted")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
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
    def _one_source(self) -> ProbeSetSpec:
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


class FieldPosition(StrictModel):
    """Per-probe tokens named by one of the probe's own fields (e.g. ``subject``): the tokens of that string in the
    prompt (``token: all``), its ``first`` / ``middle`` (between first and last) / ``last`` token, the ``after``
    (first subsequent) token, or the ``further`` tokens (after that, before the prompt's last token): ROME's
    token groups."""

    field: str
    token: Literal["all", "first", "middle", "last", "after", "further"] = "all"
    prompt: Literal["clean", "corrupted"] = "clean"


PositionSelector = Literal["all", "each", "last", "none"] | int | MatchPosition | IndexPositions | FieldPosition


class VectorFrom(StrictModel):
    """A steering vector as the mean difference of two prompt sets' last-token activations at the site."""

    plus: list[str] = Field(min_length=1)
    minus: list[str] = Field(min_length=1)


def expand_operation_names(cls: type, value: Any) -> Any:
    """``operations: [replace, {name: noise, ...}]``: a bare name is shorthand for ``{name: NAME}`` (a pydantic
    ``before`` validator, shared by every model with an ``operations`` list)."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class OperationSpec(StrictModel):
    """What a patched activation becomes; the operations and what each needs are defined in
    :mod:`interventions.operations` (one class each):

    * ``replace``: the source run's activation (clean for denoising, corrupted for noising);
    * ``zero``; ``mean``: the mean source activation over the probe set at that position counted from the end
      (prompts are right-aligned, so with probes of different lengths the earliest positions of the longest
      prompts average fewer probes; with a single probe of that length ``mean`` equals ``replace`` there);
    * ``noise``: the target activation plus Gaussian noise with std ``scale`` (``relative_to: embedding_std``
      makes it ``scale`` x the std of the token embeddings of every prompt of the probe set; ``selected_std`` of
      the embeddings of the tokens the study's ``selected_std`` noise selects, e.g. ROME's 3 sigma of the subjects);
    * ``resample``: the source activation of another probe (a seeded derangement of the probe set);
    * ``steer``: ``x + alpha * v`` with ``vector`` (a .pt/.npy file) or ``vector_from`` (mean difference);
    * ``interpolate``: ``(1 - alpha) * target + alpha * source``;
    * ``attribution``: the first-order estimate of ``replace`` (attribution patching, one forward and backward pass
      per chunk of probes; rows marked ``approximate``), beside exact operations or alone; ``steps: k`` (k >= 2)
      integrates the gradient along the path from the target's to the source's input embeddings instead (EAP-IG,
      trapezoid rule over k points; operation label ``attribution(igk)``).

    With a ``source_model``, ``replace`` and ``interpolate`` read the source model's activations.
    """

    name: str
    scale: float | None = None
    relative_to: Literal["absolute", "embedding_std", "selected_std"] = "absolute"
    alpha: float | None = None
    vector: str | None = None
    vector_from: VectorFrom | None = None
    steps: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from interventions.operations import REGISTRY

        if value not in REGISTRY:
            from clap.errors import closest

            hint = closest(value, list(REGISTRY), n=1)
            raise ValueError(f"unknown operation {value!r}{f'; did you mean {hint[0]!r}' if hint else ''} "
                             f"(valid: {', '.join(REGISTRY)})")
        return value

    @model_validator(mode="after")
    def _fields_fit(self) -> OperationSpec:
        from interventions.operations import OPTIONAL_FIELDS, REGISTRY

        operation = REGISTRY[self.name]
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            default = type(self).model_fields[name].default
            # a value equal to the default says nothing (a dumped and reloaded spec lists every field)
            given = name in self.model_fields_set and value is not None and value != default
            if given and name not in operation.fields:
                users = [n for n, op in REGISTRY.items() if name in op.fields]
                raise ValueError(f"`{name}` only applies to operation {' / '.join(f'`{u}`' for u in users)}, "
                                 f"not {self.name!r}")
        operation.check(self)
        return self

    @property
    def label(self) -> str:
        from interventions.operations import REGISTRY

        return REGISTRY[self.name].label(self)


#: operations that read the source run and so can take it from another model (``source_model``)
CROSS_MODEL_OPERATIONS = frozenset({"replace", "interpolate"})

# the names of clap.contract.METRICS (a test checks they agree)
Metric = Literal["logit_diff", "logit", "prob", "logprob", "kl"]


class ExecutionSpec(StrictModel):
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: most rows (baselines + patched) in one forward pass; None = derive from memory_budget_mb
    max_rows: int | None = Field(default=None, ge=3)
    memory_budget_mb: float | None = Field(default=None, gt=0)
    #: False: local; True: NDIF (key from NDIF_API_KEY or nnsight's config); "local": nnsight's local simulation
    remote: bool | Literal["local"] = False
    #: how batches run (interventions/executor.py): ``full`` runs every row over the whole prompt; ``suffix`` runs a
    #: patched row only from its first edited layer and token on, from its baseline row's cached state (exact, same
    #: numbers to float rounding); ``auto`` is ``suffix`` locally and ``full`` under NDIF or its local simulation
    #: (interventions/executor.py says why)
    strategy: Literal["auto", "full", "suffix"] = "auto"
    progress: bool = True
    #: torch's intra-op CPU threads while the study runs (``torch.set_num_threads``); None: torch's default (one per
    #: core). On a shared or loaded machine several processes each using every core slow one another down far more
    #: than they gain, so set 1 (or cores / processes) there; results do not depend on it
    threads: int | None = Field(default=None, ge=1)
    #: the largest plan (patched cells, counted before any is built) a study runs; larger ones are refused with
    #: the estimate of cells, rows and memory. null: no limit
    max_cells: int | None = Field(default=5_000_000, ge=1)

    @model_validator(mode="after")
    def _strategy_fits_remote(self) -> ExecutionSpec:
        if self.strategy == "suffix" and self.remote is True:
            raise ValueError("strategy `suffix` cannot run on NDIF (remote: true): it passes a key/value cache made "
                             "on this machine into the trace; use strategy `auto` or `full`")
        return self


class PatchGroup(StrictModel):
    """Sites patched at their own positions/operations (e.g. a layer x position residual sweep beside a
    last-token sweep of attention and MLP outputs). Unset fields fall back to the study's."""

    sites: list[str] = Field(min_length=1)
    positions: list[PositionSelector] | None = Field(default=None, min_length=1)
    operations: list[OperationSpec] | None = Field(default=None, min_length=1)
    #: one cell per layer that patches the run of ``window`` consecutive layers centred on it (ROME: layers
    #: max(0, L - window // 2) .. min(n_layers, L + ceil(window / 2)) - 1), same component, same tokens
    window: int = Field(default=1, ge=1)
    #: all the group's sites applied together in one row (one cell per position and operation), in forward order
    combine: bool = False
    #: one cell per layer L that patches the same component at layers 0..L (``bottom``) or L..n_layers-1 (``top``)
    #: together, same tokens; ``site`` is the stack's address ``layers[a:b].<kind>``, ``layer`` L. Attention and MLP
    #: outputs only: a residual-stream state at the patched tokens already holds every earlier layer's contribution
    #: there, so a stack of them equals its last layer's patch alone (exactly, at the last token or at every token)
    cumulative: Literal["bottom", "top"] | None = None
    #: make the group's cells for these probe ids only (per-probe site sets, e.g. each probe's own top layers)
    probes: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _window_or_combine(self) -> PatchGroup:
        if self.window > 1 and self.combine:
            raise ValueError("`window` and `combine` exclude each other: a window already stacks its layers")
        if self.cumulative is not None and (self.window > 1 or self.combine):
            raise ValueError("`cumulative` excludes `window` and `combine`: it already stacks its layers")
        return self

    _operation_shorthand = field_validator("operations", mode="before")(expand_operation_names)


class BaselineIntervention(StrictModel):
    """An intervention applied to the target baseline row and to every patched row (never to the source row): the
    corruption that patched cells restore from, e.g. noise on the subject's token embeddings."""

    sites: list[str] = Field(min_length=1)
    positions: list[PositionSelector] = Field(default_factory=lambda: ["all"], min_length=1)
    operation: OperationSpec

    @field_validator("operation", mode="before")
    @classmethod
    def _operation_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("positions")
    @classmethod
    def _one_selection(cls, value: list) -> list:
        if "each" in value:
            raise ValueError("a baseline intervention is one selection of tokens; `each` would make one per token")
        return value


class TraceSpec(StrictModel):
    """Causal tracing (Meng et al. 2022): the clean prompt, its subject's token embeddings noised (the corrupted
    run), and each clean hidden state / MLP / attention output restored at one (layer, token), or a window of
    layers. Expands into ``baseline``, ``patches``, ``samples`` and ``corrupted_prompt: clean``."""

    subject: str = "subject"  #: the probe field holding the subject string
    noise: float = Field(default=3.0, gt=0)  #: noise std: ``noise`` x the std of ``relative_to``
    relative_to: Literal["absolute", "embedding_std", "selected_std"] = "selected_std"
    samples: int = Field(default=10, ge=1)
    #: component -> window (1 = single layers); ROME: hidden states single, MLP and attention windows of 10;
    #: ``hidden`` (ROME's name) is accepted for ``resid_post``, the residual stream after a block
    kinds: dict[Literal["resid_post", "mlp_out", "attn_out", "resid_pre"], int] = Field(
        default_factory=lambda: {"resid_post": 1, "mlp_out": 10, "attn_out": 10})
    positions: list[PositionSelector] = Field(default_factory=lambda: ["each"], min_length=1)
    #: which layers to trace, in the site syntax's brackets: ``*`` (all), ``0:8``, ``12``; a window still takes its
    #: neighbours from the whole stack
    layers: str = "*"

    @field_validator("kinds", mode="before")
    @classmethod
    def _hidden_alias(cls, value: Any) -> Any:
        if isinstance(value, dict) and "hidden" in value:
            if "resid_post" in value:
                raise ValueError("`hidden` is ROME's name for `resid_post`; give one of them, not both")
            value = {("resid_post" if k == "hidden" else k): v for k, v in value.items()}
        return value

    def expand(self) -> dict[str, Any]:
        return {
            "baseline": [{"sites": ["embed"], "positions": [{"field": self.subject}],
                          "operation": {"name": "noise", "scale": self.noise, "relative_to": self.relative_to}}],
            "patches": [{"sites": [f"layers[{self.layers}].{kind}"], "positions": self.positions, "window": window,
                         "operations": ["replace"]} for kind, window in self.kinds.items()],
            "samples": self.samples,
            "corrupted_prompt": "clean",
        }


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

    #: interventions applied to the target baseline row and every patched row, in forward order (e.g. noise)
    baseline: list[BaselineIntervention] | None = None
    #: noise draws per cell (seeded by seed, probe, sample): reported per sample and averaged
    samples: int = Field(default=1, ge=1)
    #: the corrupted run's prompt: the probe's own ``corrupted`` prompt, or its ``clean`` prompt (then only the
    #: baseline interventions corrupt it, as in causal tracing)
    corrupted_prompt: Literal["probe", "clean"] = "probe"
    #: causal tracing; fills baseline, patches, samples, corrupted_prompt and metrics (prob) where not given
    trace: TraceSpec | None = None
    #: cross-model patching: the source run (the clean prompt when denoising, the corrupted one when noising) is run
    #: by this model, the target run by ``model``; both must share architecture, sizes and tokenizer. Only the
    #: operations that read the source run (``replace``, ``interpolate``) apply. Recovery is then measured from the
    #: target model on the target prompt (0) to the source model on the source prompt (1).
    source_model: ModelSpec | None = None

    #: where the spec was read from (relative probe files resolve against it); not part of the schema
    _base_dir: Path | None = None
    #: the spec file and its key-path -> line map, so checks after validation can name file and line too
    _source: str | None = None
    _lines: dict | None = None

    _operation_shorthand = field_validator("operations", mode="before")(expand_operation_names)

    @field_validator("name")
    @classmethod
    def _file_safe_name(cls, value: str) -> str:
        """The name names the default output folder of ``clap run`` (``<name>-output``)."""
        problem = name_problem(value)
        if problem:
            raise ValueError(f"study name {value!r} {problem}")
        return value

    @field_validator("trace")
    @classmethod
    def _trace_reads_prob(cls, value: TraceSpec | None, info: ValidationInfo) -> TraceSpec | None:
        """A trace's table and heatmaps are the indirect effect on p(answer): refuse before anything runs rather
        than after the whole run, when the figures are drawn."""
        metrics = info.data.get("metrics")
        if value is not None and metrics is not None and "prob" not in metrics:
            raise ValueError(f"a causal trace measures the indirect effect on p(answer), the metric `prob`, but "
                             f"`metrics:` lists {', '.join(metrics)}; add it (metrics: [prob, "
                             f"{', '.join(metrics)}]) or leave `metrics:` out (a trace then measures prob)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _expand_trace(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("trace"), (dict, TraceSpec)):
            try:
                trace = data["trace"] if isinstance(data["trace"], TraceSpec) else TraceSpec.model_validate(
                    data["trace"])
            except ValidationError:  # left to the `trace` field's own validation, whose errors carry `trace.` paths
                return data
            data = {**trace.expand(), "metrics": ["prob"], **data}
        return data

    @model_validator(mode="after")
    def _something_to_patch(self) -> StudySpec:
        from interventions.operations import REGISTRY

        if not self.sites and not self.patches:
            raise ValueError("name the sites to patch: `sites: [...]` and/or `patches: [{sites: [...]}, ...]`")
        # `resample` reads another probe's run, so it ablates even when both runs are the clean prompt
        copies = [op.name for op in self.all_operations() if REGISTRY[op.name].copies_source and op.name != "resample"]
        if self.source_model is not None:
            self._check_cross_model()
        elif self.corrupted_prompt == "clean" and not self.baseline and copies:
            raise ValueError(
                f"nothing to restore from: with corrupted_prompt: clean the corrupted run is the clean prompt, and "
                f"without a `baseline` intervention (e.g. noise on the subject's embeddings) operation "
                f"{copies[0]!r} would copy the clean run into itself; add a baseline intervention (or a "
                f"`source_model:` whose runs are patched in: cross-model patching)")
        noisy = [op for op in self.all_operations() + [b.operation for b in self.baseline or []] if op.name == "noise"]
        if self.samples > 1 and not noisy:
            raise ValueError("`samples` draws noise several times; the study has no `noise` operation")
        return self

    @property
    def ablates_clean_run(self) -> bool:
        """Both runs are the clean prompt and nothing corrupts them (``corrupted_prompt: clean``, no baseline
        intervention, one model): the cells ablate the clean run (``zero``, ``mean``, ``resample``), their ``effect``
        is the change in the clean metric, and recovery is undefined by design."""
        return self.corrupted_prompt == "clean" and not self.baseline and self.source_model is None

    def _check_cross_model(self) -> None:
        """A source model only means something for operations that read the source run; noise baselines would
        corrupt only the target model's rows, a design clap does not run across models."""
        foreign = sorted({op.name for op in self.all_operations()} - CROSS_MODEL_OPERATIONS)
        if "attribution" in foreign:
            raise ValueError("source_model: operation 'attribution' estimates a patch within one model (the gradient "
                             "of the target run); it cannot take its source run from another model: use replace")
        if foreign:
            raise ValueError(
                f"source_model: operation {foreign[0]!r} does not read the source run, so another model cannot "
                f"supply it; with a source model use {' / '.join(sorted(CROSS_MODEL_OPERATIONS))}")
        if self.baseline or self.samples > 1:
            raise ValueError("source_model does not combine with `baseline` interventions, `samples` or `trace` "
                             "(the source model's run would not carry the target's corruption); drop one of them")

    def groups(self) -> list[tuple[list[str], list, list[OperationSpec]]]:
        """(site addresses, positions, operations) per patch group, with defaults filled in."""
        out = []
        if self.sites:
            out.append((self.sites, self.positions, self.operations))
        for group in self.patches or []:
            out.append((group.sites, group.positions or self.positions, group.operations or self.operations))
        return out

    def all_operations(self) -> list[OperationSpec]:
        """The operations of patched cells (not the baseline interventions)."""
        return [op for _, _, ops in self.groups() for op in ops]

    def group_options(self) -> list[tuple[int, bool]]:
        """(window, combine) per patch group, in ``groups()`` order."""
        out = [(1, False)] if self.sites else []
        return out + [(g.window, g.combine) for g in self.patches or []]

    def group_stacks(self) -> list[tuple[str | None, list[str] | None]]:
        """(cumulative, probes) per patch group, in ``groups()`` order (the top-level ``sites`` have neither)."""
        out: list[tuple[str | None, list[str] | None]] = [(None, None)] if self.sites else []
        return out + [(g.cumulative, g.probes) for g in self.patches or []]

    #: how an error names this kind of file (subclasses such as ``clap run``'s study file say their own)
    _file_kind: ClassVar[str] = "a study spec is a YAML mapping (model:, probes:, sites:, ...)"

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        data, lines = load_yaml(path)
        if not isinstance(data, dict):
            raise SpecError(f"{path}: {cls._file_kind}")
        spec = cls.from_dict(data, source=str(path), lines=lines)
        spec._base_dir = path.parent
        spec._source = str(path)
        spec._lines = lines
        return spec

    @classmethod
    def from_dict(cls, data: dict, source: str = "<spec>", lines: dict | None = None) -> StudySpec:
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
    "{indices: [integers]} | {field: subject, token: all|first|middle|last|after|further}"
)


def format_validation_error(exc: ValidationError, source: str, lines: dict, model: type[BaseModel]) -> str:
    """One line per problem: ``file:line: field.path: what was expected`` (+ nearest names for unknown keys)."""
    return _format_validation_error(exc, source, lines, model, title="invalid study spec",
                                    unions={"positions": POSITION_HELP})
