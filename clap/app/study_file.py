"""The study file of ``clap run``: a patching spec (:class:`interventions.spec.StudySpec`) that names several models
and, optionally, the corpus and fine-tuning steps that produce one of them.

Why a second schema instead of more fields on ``StudySpec``: a ``StudySpec`` describes one patching run of one
model, and ``clap patch`` keeps accepting exactly that. A study file is the whole experiment; :meth:`StudyFile.
patch_spec` derives, per model, the ``StudySpec`` that ``clap patch`` would run, with the *same* probes, sites,
positions and operations for every model, so that their results can be compared probe by probe.

Everything a ``StudySpec`` accepts is accepted here with the same meaning, plus:

``models``   ``{name: {source: ...}}`` (a model of the ``finetune:`` stage says ``{finetuned: true}``); a plain
             ``model:`` is the one-model shorthand (named ``model``)
``probes``   also ``files: [a.jsonl, b.jsonl]`` (concatenated, ids must stay unique); a path ``package:clap/...``
             names a file shipped inside the installed package (the study file then runs from anywhere)
``corpus``   ``inputs:`` for ``clap corpus build`` (or ``path:`` of a corpus built before, reused)
``finetune`` ``model:`` (a models entry or a source), ``preset:``, ``settings:`` (any fine-tuning setting)
``compare``  ``[a, b]`` or ``[[a, b], [a, c]]``: paired comparisons of models (``clap compare``)
``report``   ``figures: false`` (tables and reports without figures: quick checks), ``n_boot``
``trace``    causal tracing, the study spec's own section (:class:`interventions.spec.TraceSpec`): the patch stage
             runs the trace and a ``trace[NAME]`` stage writes its token-group table and heatmaps; the section is
             what makes a study a causal trace (there is no separate ``kind:``)
``cross_model`` ``{source: finetuned, target: base, sites: [...], positions: [...]}`` (or a list of them): the
             source model's activations patched into the target model (both named under ``models:``), one
             ``patch[cross:SOURCE-into-TARGET]`` stage (``<out>/cross/SOURCE-into-TARGET/``) and its analysis;
             ``sites`` / ``patches`` / ``positions`` / ``operations`` / ``corrupted_prompt`` default to the study's
``additivity`` ``{kinds: [attn_out, mlp_out], position: last, cumulative: true, top: [2, 3, 5], pairs: 5}``
             (:class:`interventions.derived.AdditivitySection`): per model a ``patch[additivity:NAME]`` stage after
             ``patch[NAME]`` patches layers jointly (cumulative stacks, each probe's top-m layers and pairs among its
             top layers by the single-layer results; ``<out>/additivity/NAME/``), analysed in the model's report
``ablation`` ``{sites: [...], positions: [last], operations: [zero, mean, resample]}``
             (:class:`interventions.derived.AblationSection`): per model a ``patch[ablation:NAME]`` stage ablates
             the clean run (``<out>/ablation/NAME/``), analysed in the model's report beside its head patching

Validation errors name file, line and field, in the format of :mod:`interventions.spec`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from clap.errors import closest
from clap.validation import StrictModel
from clap.yamlio import line_of
from interventions.derived import AblationSection, AdditivitySection
from interventions.spec import (
    ModelSpec,
    OperationSpec,
    PatchGroup,
    PositionSelector,
    ProbeSetSpec,
    SpecError,
    StudySpec,
    expand_operation_names,
)

#: Sections that describe analyses not available yet: ``clap run`` refuses them with this reason (none at present;
#: a section is added here while its analysis is being built, so designs can be written down before it exists).
PENDING_SECTIONS: dict[str, str] = {}
#: Earlier spellings of sections, refused with the one spelling to use.
RENAMED_SECTIONS = {"causal_tracing": "trace"}
#: Fields of a study file that are not part of the per-model patching spec.
RUN_FIELDS = ("models", "model", "corpus", "finetune", "compare", "report", "cross_model", "additivity", "ablation",
              *PENDING_SECTIONS)
PACKAGE_PREFIX = "package:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_path(path: str, base_dir: Path) -> Path:
    """A study file's path: ``package:clap/data/x`` inside the installed package, else relative to ``base_dir``."""
    if path.startswith(PACKAGE_PREFIX):
        package, _, rest = path[len(PACKAGE_PREFIX):].partition("/")
        try:
            root = resources.files(package)
        except ModuleNotFoundError:
            raise SpecError(f"{path}: no installed package {package!r}") from None
        return Path(str(root.joinpath(rest)))
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else base_dir / resolved


class ModelEntry(StrictModel):
    """One model of the study: a source (hub id, directory, ``.gguf``, built-in name) or the fine-tuned model."""

    source: str | None = None
    finetuned: bool = False  #: the model the study's ``finetune:`` stage trains
    gguf_file: str | None = None
    tokenizer: str | None = None
    revision: str | None = None

    def model_spec(self, source: str) -> ModelSpec:
        """The ``model:`` of a patching spec for this entry, loaded from ``source`` (its located source, or the
        fine-tuned model's folder)."""
        return ModelSpec(source=source, gguf_file=self.gguf_file, tokenizer=self.tokenizer, revision=self.revision)

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.source is None) == (not self.finetuned):
            raise ValueError("give exactly one of `source` (hub id, directory, .gguf file, built-in name) or "
                             "`finetuned: true` (the model the finetune: stage trains)")
        return self


class StudyProbes(ProbeSetSpec):
    """``ProbeSetSpec`` plus ``files``: several probe files concatenated in order."""

    files: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> StudyProbes:  # replaces ProbeSetSpec's check (same name)
        given = [f for f in ("file", "files", "inline") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `file`, `files` (a list of probe files) or `inline`")
        return self


class CorpusSection(StrictModel):
    """``clap corpus build`` inputs and options (see :class:`corpora.build.BuildConfig`), or a corpus to reuse."""

    inputs: list[str] | None = None  #: files or folders, relative to the study file
    hf_dataset: str | None = None
    hf_split: str | None = None
    path: str | None = None  #: a corpus folder built before: reused as it is (its content is hashed)
    terms: dict[str, str] | None = None  #: NAME: REGEX (default: the epilepsy terms)
    filter_terms: bool = True
    require_abstract: bool = True
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 42
    skip_bad: bool = False

    @model_validator(mode="after")
    def _what(self) -> CorpusSection:
        build = bool(self.inputs) or self.hf_dataset is not None
        if build == (self.path is not None):
            raise ValueError("give `inputs:` (and/or `hf_dataset:`) to build a corpus, or `path:` of a built one")
        return self


class FinetuneSection(StrictModel):
    """Fine-tune ``model`` on the corpus; the result is the models entry with ``finetuned: true``."""

    model: str  #: a name under models: (its source is the starting point) or a model source
    preset: str = "config-i"
    settings: dict[str, Any] = Field(default_factory=dict)  #: fine-tuning settings overriding the preset
    corpus: str | None = None  #: a built corpus folder, when the study has no corpus: section


class CrossModelSection(StrictModel):
    """Cross-model patching: ``source``'s activations patched into ``target`` (both names under ``models:``); the
    patching fields left out are the study's."""

    source: str
    target: str
    sites: list[str] | None = Field(default=None, min_length=1)
    patches: list[PatchGroup] | None = Field(default=None, min_length=1)
    positions: list[PositionSelector] | None = Field(default=None, min_length=1)
    operations: list[OperationSpec] | None = Field(default=None, min_length=1)
    #: ``clean``: both models run the clean prompt (only the models differ)
    corrupted_prompt: Literal["probe", "clean"] | None = None

    _operation_shorthand = field_validator("operations", mode="before")(expand_operation_names)

    @property
    def name(self) -> str:
        return f"{self.source}-into-{self.target}"

    def overrides(self) -> dict[str, Any]:
        """The patching fields this section sets, as spec fields (its own sites replace the study's groups)."""
        data = self.model_dump(mode="json", exclude={"source", "target"}, exclude_none=True)
        if "sites" in data or "patches" in data:
            data.setdefault("sites", None)
            data.setdefault("patches", None)
        return data


class ReportSection(StrictModel):
    """How the analysis and comparison stages render (not what they compute)."""

    figures: bool = True
    n_boot: int = Field(default=2000, ge=100)  #: bootstrap resamples (only for bootstrap intervals)


class StudyFile(StudySpec):
    """A whole study for ``clap run``. ``StudyFile.from_yaml(path)`` or build it in Python; both validate alike."""

    model: ModelEntry | None = None  # type: ignore[assignment]  # one-model shorthand
    models: dict[str, ModelEntry] | None = None
    probes: StudyProbes  # type: ignore[assignment]
    corpus: CorpusSection | None = None
    finetune: FinetuneSection | None = None
    compare: list[str | list[str]] | None = None
    report: ReportSection = Field(default_factory=ReportSection)
    cross_model: CrossModelSection | list[CrossModelSection] | None = None
    additivity: AdditivitySection | None = None
    ablation: AblationSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED_SECTIONS.items():
                if old in data:
                    raise ValueError(f"`{old}:` is spelled `{new}:` (the study spec's section, same keys as in "
                                     f"`clap trace`; see interventions.spec.TraceSpec)")
        return data

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelEntry] | None) -> dict[str, ModelEntry] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one model: `models: {base: {source: ...}}`")
            bad = [n for n in value if not NAME_PATTERN.match(str(n))]
            if bad:
                raise ValueError(f"model names become folder names: use letters, digits, '_', '-', '.'; got {bad}")
        return value

    @model_validator(mode="after")
    def _one_model_field(self) -> StudyFile:
        if (self.model is None) == (self.models is None):
            raise ValueError("name the models: `models: {base: {source: ...}, ...}` (or `model: {source: ...}` "
                             "for one), not both")
        return self

    # -- construction -------------------------------------------------------------------------------------
    _file_kind: ClassVar[str] = "a study file is a YAML mapping (models:, probes:, sites:, ...)"

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyFile:
        """:meth:`StudySpec.from_yaml` (base folder, file and lines for later ``file:line`` errors), then the
        study file's own cross-references."""
        study = super().from_yaml(path)
        study.check_references(str(path), study._lines or {})
        return study

    @classmethod
    def coerce(cls, study: StudyFile | StudySpec | dict | str | Path) -> StudyFile:
        """A study file from a path, a dict, a ``StudyFile`` or a plain ``StudySpec`` (its one model)."""
        if isinstance(study, StudyFile):
            study.check_references("<study>", {})
            return study
        if isinstance(study, (str, Path)):
            return cls.from_yaml(study)
        if isinstance(study, StudySpec):
            base = study._base_dir
            study = study.to_dict()
            study = cls.from_dict(study)
            study._base_dir = base
        else:
            study = cls.from_dict(study)
        study.check_references("<study>", {})
        return study

    def check_references(self, source: str, lines: dict) -> None:
        """Names that must refer to each other (compare -> models, finetune <-> finetuned entry), with lines."""
        names = list(self.model_entries())

        def fail(location: tuple, text: str) -> None:
            line = line_of(lines, location)
            raise SpecError(f"invalid study spec:\n  {source}{f':{line}' if line else ''}: "
                            f"{'.'.join(map(str, location))}: {text}")

        for index, pair in enumerate(self.comparisons()):
            if len(pair) != 2:
                fail(("compare", index), f"a comparison names two models, got {pair}")
            for name in pair:
                if name not in names:
                    hint = closest(name, names)
                    fail(("compare",), f"unknown model {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (models: {', '.join(names)})")
        tuned = [n for n, e in self.model_entries().items() if e.finetuned]
        if tuned and self.finetune is None:
            fail(("models", tuned[0]), "`finetuned: true` needs a `finetune:` section (what to train, on what)")
        if self.finetune is not None:
            if not tuned:
                fail(("finetune",), "nothing uses the fine-tuned model: add a models entry `{finetuned: true}`")
            start = self.model_entries().get(self.finetune.model)
            if start is not None and start.finetuned:
                fail(("finetune", "model"), f"{self.finetune.model!r} is the fine-tuned model itself; name the "
                     "model to start from")
            if self.corpus is None and self.finetune.corpus is None:
                fail(("finetune",), "fine-tuning needs a corpus: add a `corpus:` section or `finetune.corpus:`")
            self._check_finetune_settings(source, lines, fail)
        self._check_cross_sections(names, fail)

    def _check_finetune_settings(self, source: str, lines: dict, fail: Any) -> None:
        """The preset and ``settings:`` validated with the fine-tuning schema now, with their lines, instead of when
        the finetune stage starts (after the corpus stage)."""
        try:
            from finetuning.config import PRESETS, FinetuneConfigError, build_config
        except ModuleNotFoundError:  # no fine-tuning code installed: the stage itself says so
            return
        section = self.finetune
        assert section is not None
        if section.preset not in PRESETS:
            hint = closest(section.preset, list(PRESETS))
            fail(("finetune", "preset"), f"unknown fine-tuning preset {section.preset!r}"
                 + (f"; did you mean {hint[0]!r}?" if hint else "") + f" (presets: {', '.join(PRESETS)})")
        origins = {}
        for name in section.settings:
            line = line_of(lines, ("finetune", "settings", name))
            origins[str(name)] = f"{source}{f':{line}' if line else ''}: finetune.settings.{name}"
        try:
            build_config({"preset": section.preset, **PRESETS[section.preset], **section.settings}, origins,
                         source=source)
        except FinetuneConfigError as exc:
            raise SpecError(f"invalid study spec:\n  {exc}") from None

    def _cross_sections(self) -> list[tuple[tuple, CrossModelSection]]:
        """(key path, section) of each ``cross_model`` section (one, or a list)."""
        if self.cross_model is None:
            return []
        if isinstance(self.cross_model, list):
            return [(("cross_model", i), section) for i, section in enumerate(self.cross_model)]
        return [(("cross_model",), self.cross_model)]

    def _check_cross_sections(self, names: list[str], fail: Any) -> None:
        for at, section in self._cross_sections():
            for role in ("source", "target"):
                name = getattr(section, role)
                if name not in names:
                    hint = closest(name, names)
                    fail(at + (role,), f"unknown model {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (models: {', '.join(names)})")
            if section.source == section.target:
                fail(at, f"source and target are both {section.source!r}; cross-model patching needs two models")
            try:  # the derived spec's own rules (operations that can read another model, restores without corruption)
                self.cross_spec(section, ModelSpec(source="target"), ModelSpec(source="source"), Path("probes.jsonl"))
            except SpecError as exc:
                fail(at, str(exc))

    # -- derived ------------------------------------------------------------------------------------------
    def model_entries(self) -> dict[str, ModelEntry]:
        """Models by name (the ``model:`` shorthand is named ``model``)."""
        return dict(self.models) if self.models is not None else {"model": self.model}  # type: ignore[dict-item]

    def comparisons(self) -> list[list[str]]:
        """``compare: [a, b]`` -> ``[[a, b]]``; a list of pairs stays as it is."""
        if not self.compare:
            return []
        if all(isinstance(c, str) for c in self.compare):
            return [list(self.compare)]  # type: ignore[arg-type]
        return [[c] if isinstance(c, str) else list(c) for c in self.compare]

    def cross_runs(self) -> dict[str, CrossModelSection]:
        """Cross-model runs by name (``SOURCE-into-TARGET``)."""
        return {section.name: section for _, section in self._cross_sections()}

    def cross_spec(self, section: CrossModelSection, target: ModelSpec, source: ModelSpec,
                   probes_file: Path | None = None) -> StudySpec:
        """The ``StudySpec`` that patches ``source``'s activations into ``target`` (cross-model patching)."""
        spec = self.patch_spec(target, probes_file, {**section.overrides(), "source_model": source.model_dump()})
        return spec

    def located_source(self, entry: ModelEntry) -> str:
        """A (not fine-tuned) model's source with a relative path resolved against the study's folder when something
        exists there, else as given (a hub id, a built-in name)."""
        source = str(entry.source)
        local = resolve_path(source, self.base_dir)
        return str(local) if not Path(source).is_absolute() and local.exists() else source

    def probe_paths(self) -> tuple[list[Path], bool]:
        """The probe files (``probes.file`` or ``probes.files``, resolved) and whether ``clap run`` concatenates them
        line by line (several files, or a ``package:`` path), which only JSONL allows: refused otherwise."""
        probes = self.probes
        names = probes.files if probes.files is not None else [probes.file]
        paths = [resolve_path(str(n), self.base_dir) for n in names]
        merged = probes.files is not None or str(probes.file).startswith(PACKAGE_PREFIX)
        for path in paths if merged else []:
            if path.suffix != ".jsonl":
                raise SpecError(f"probes.files: {path}: several probe files are concatenated line by line; use "
                                "JSONL files (.jsonl)")
        return paths, merged

    def pending(self) -> list[tuple[str, str]]:
        """(section, reason) for each section whose analysis is not available yet."""
        return [(name, reason) for name, reason in PENDING_SECTIONS.items() if getattr(self, name) is not None]

    def patch_spec(self, model: ModelSpec, probes_file: Path | None = None,
                   overrides: dict[str, Any] | None = None) -> StudySpec:
        """The ``StudySpec`` that patches ``model`` with this study's probes, sites and options (``overrides``:
        spec fields set otherwise, e.g. a cross-model section's)."""
        data = {**self.model_dump(mode="json", exclude=set(RUN_FIELDS)), **(overrides or {})}
        probes = dict(data.pop("probes"))
        files = probes.pop("files", None)
        if files is not None or (probes.get("file") or "").startswith(PACKAGE_PREFIX):
            if probes_file is None:
                raise SpecError("patch_spec: a probe set of several files (or a package: path) needs the prepared "
                                "probes file")
            probes["file"] = str(probes_file)
        elif probes_file is not None:  # the file as resolved: run.json names it wherever the run is analysed
            probes["file"] = str(Path(probes_file).absolute())
        try:
            spec = StudySpec.model_validate({**data, "model": model.model_dump(), "probes": probes})
        except ValidationError as exc:  # only overrides can fail here: the study file itself validated
            reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise SpecError(reasons) from None
        spec._base_dir = self.base_dir
        spec._source, spec._lines = self._source, self._lines  # errors name the study file's lines
        return spec
