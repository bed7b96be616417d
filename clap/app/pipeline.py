"""``clap run STUDY.yaml``: a whole study in one command, every stage cached by the hash of its inputs.

>>> from clap.app.pipeline import run_study
>>> result = run_study("studies/epilepsy-layers.yaml", "runs/layers")   # or a StudyFile built in Python
>>> result.frame("model")                                              # the tidy results of one model

Stages, in order (``--until`` stops after one, ``--force`` reruns one and what depends on it)::

    corpus             clap corpus build (or a corpus built before, hashed)      <out>/corpus/
    finetune           clap finetune, starting from a model of the study          <out>/finetune/
    patch[NAME]        clap patch, per model: same probes, sites, operations      <out>/models/NAME/
    trace[NAME]        with a `trace:` section: ROME's token-group table and      <out>/models/NAME/
                       heatmaps beside the results (what `clap trace` writes)     token_groups.csv, trace_*.png
    patch[cross:S-into-T]  cross-model patching: S's activations into T's runs    <out>/cross/S-into-T/
    patch[additivity:NAME] layers patched jointly (sets from patch[NAME])        <out>/additivity/NAME/
    patch[ablation:NAME]   the clean run ablated (zero / mean / resample)        <out>/ablation/NAME/
    analyze[NAME]      clap report, per model: tables, figures, report.html       <out>/models/NAME/analysis/
    analyze[cross:...] the same for each cross-model run                          <out>/cross/S-into-T/analysis/
    compare[A-vs-B]    clap compare, per pair named by `compare:`                 <out>/compare/A-vs-B/
    report             the study's own report: models, comparisons, caveats       <out>/report.html, report.md

Why hashes, not timestamps: a stage reruns when what it reads changed (its section of the study file, the bytes of
its input files, the stages upstream, the clap version), and only then. ``<out>/stages.json`` records each finished
stage's hash; it is rewritten atomically after the stage's outputs are complete, so an interrupted run resumes at
the stage it was in (patching resumes from its last finished batch, fine-tuning from its last checkpoint).

This module sits above the packages: it imports ``corpora``, ``interventions`` and ``analyses`` and none of them
imports it. Fine-tuning and comparison are reached through one adapter function each (:func:`finetune_model`,
:func:`compare_models`), so where they live is written in one place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clap import __version__, cli_args
from clap.app.stages import StageStore, digest, file_digest, locked, tree_digest
from clap.app.study_file import (
    RUN_FIELDS,
    ModelEntry,
    StudyFile,
    resolve_path,
)
from clap.contract import atomic_write_text, read_results
from clap.errors import ClapError, closest
from interventions.spec import ModelSpec, ProbeSetSpec

log = logging.getLogger(__name__)

STAGE_KINDS = ("corpus", "finetune", "patch", "trace", "analyze", "compare", "report")
#: Per-probe heatmaps a trace stage draws (the first probes of the set); the averaged figure is always drawn.
TRACE_PROBE_FIGURES = 3
#: Execution settings that do not change results (they are left out of the patch stage's hash).
NON_RESULT_EXECUTION = ("progress", "max_rows", "memory_budget_mb", "max_cells", "threads")

Echo = Callable[[str], None]


class ModelUnavailable(ClapError):
    """A model of the study cannot be reached from here (a hub model not cached, with the hub unreachable)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


# ------------------------------------------------------------------------------------------------- adapters
def finetune_model(corpus: Path, model: str, out: Path, *, preset: str, settings: dict[str, Any],
                   tokenizer: str | None = None, resume: bool = True, progress: bool = True) -> Path:
    """Fine-tune ``model`` on ``corpus`` into ``out``; return the saved model's folder.

    The only place that knows where fine-tuning lives. ``resume``: continue an interrupted run from its last
    checkpoint; otherwise earlier outputs in ``out`` are discarded (the inputs changed)."""
    from finetuning import finetune, load_config

    config = load_config(preset, None, settings)
    result = finetune(corpus, model, out, config, tokenizer=tokenizer, overwrite=not resume, progress=progress)
    return Path(result.model_dir)


def compare_models(run_a: Path, run_b: Path, out: Path, *, figures: bool = True, analysis: Any = None) -> Path:
    """``clap compare RUN_A RUN_B -o OUT`` (paired differences of two models on the same probes and sites), under
    the study's ``analysis:`` options (``analysis``; None: those recorded in run A)."""
    from analyses.compare import compare

    compare(run_a, run_b, out, figures=figures, analysis=analysis)
    return out


# ------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One step of a study: what it depends on (hashed) and how to produce its outputs."""

    name: str
    kind: str
    key: dict[str, Any]  #: the stage's own inputs, hashed with its upstream stages' hashes
    upstream: list[str]
    action: Callable[[bool], list[Path]]  #: resume -> output paths
    check: Callable[[], None] | None = None  #: preconditions, run before any stage starts
    hash: str = ""


@dataclass
class RunResult:
    """What :func:`run_study` did: each stage's status ("ran" or "up to date") and where the results are."""

    out: Path
    study: StudyFile
    stages: dict[str, str] = field(default_factory=dict)

    def results_dir(self, model: str) -> Path:
        return self.out / "models" / model

    def frame(self, model: str) -> Any:
        """The tidy results of ``model`` (``results.parquet``)."""
        return read_results(self.results_dir(model), validate=False)[0]

    @property
    def report(self) -> Path:
        return self.out / "report.html"


class _Planner:
    """Turns a study file into the ordered list of stages for one output folder."""

    def __init__(self, study: StudyFile, out: Path, progress: bool):
        self.study = study
        self.out = out
        self.progress = progress
        self.base = study.base_dir
        self.stages: list[Stage] = []
        self.corpus_dir: Path | None = None
        self.finetuned_dir: Path | None = None

    def plan(self) -> list[Stage]:
        study = self.study
        if study.corpus is not None:
            self._corpus()
        if study.finetune is not None:
            self._finetune()
        probes = self._probes()
        for name, entry in study.model_entries().items():
            self._patch(name, entry, probes)
        if study.trace is not None:
            for name in study.model_entries():
                self._trace(name)
        for name, section in study.cross_runs().items():
            self._cross_patch(name, section, probes)
        for kind, name, entry in [(k, n, e) for k in ("additivity", "ablation") if getattr(study, k) is not None
                                  for n, e in study.model_entries().items()]:
            self._derived(kind, name, entry, probes)
        for name in study.model_entries():
            self._analyze(name)
        for name, section in study.cross_runs().items():
            same_prompt = (section.corrupted_prompt or study.corrupted_prompt) == "clean"
            self._analyze(f"cross:{name}", self.out / "cross" / name, same_prompt=same_prompt)
        for a, b in study.comparisons():
            self._compare(a, b)
        self._report()
        return self.stages

    # -- corpus and fine-tuning -----------------------------------------------------------------------------
    def _corpus(self) -> None:
        section = self.study.corpus
        assert section is not None
        if section.path is not None:
            folder = resolve_path(section.path, self.base)
            self.corpus_dir = folder

            def reuse(resume: bool) -> list[Path]:
                return [folder]

            key = {"reuse": str(folder), "content": tree_digest(folder) if folder.exists() else "missing"}
            check = (lambda: None) if folder.is_dir() else _fail(f"corpus.path {section.path}: no such folder "
                                                                 f"({folder})")
            self._add("corpus", "corpus", key, [], reuse, check)
            return
        inputs = [resolve_path(p, self.base) for p in section.inputs or []]
        missing = [str(p) for p in inputs if not p.exists()]
        out = self.out / "corpus"
        self.corpus_dir = out

        def build(resume: bool) -> list[Path]:
            from corpora.build import BuildConfig, build_corpus
            from corpora.filtering import DEFAULT_TERMS

            config = BuildConfig(
                inputs=inputs, out=out, terms=dict(section.terms or DEFAULT_TERMS),
                filter_terms=section.filter_terms, require_abstract=section.require_abstract,
                validation_fraction=section.validation_fraction, seed=section.seed, skip_bad=section.skip_bad,
                hf_dataset=section.hf_dataset, hf_split=section.hf_split,
            )
            build_corpus(config)
            return [out]

        key = {"section": section.model_dump(mode="json"),
               "inputs": {str(p): tree_digest(p) for p in inputs if p.exists()}}
        check = _fail(f"corpus.inputs: not found: {', '.join(missing)}") if missing else None
        self._add("corpus", "corpus", key, [], build, check)

    def _finetune(self) -> None:
        section = self.study.finetune
        assert section is not None
        entries = self.study.model_entries()
        start = entries.get(section.model) or ModelEntry(source=section.model)
        upstream = []
        if self.corpus_dir is not None and section.corpus is None:
            corpus, upstream, corpus_key = self.corpus_dir, ["corpus"], {}
        else:
            corpus = resolve_path(section.corpus or "", self.base)
            corpus_key = {"content": tree_digest(corpus) if corpus.exists() else "missing"}
        out = self.out / "finetune"
        self.finetuned_dir = out / "model"
        source = self._source(start)

        def train(resume: bool) -> list[Path]:
            model_dir = finetune_model(corpus, source, out, preset=section.preset, settings=dict(section.settings),
                                       tokenizer=start.tokenizer, resume=resume, progress=self.progress)
            self.finetuned_dir = model_dir
            return [model_dir]

        key = {"section": section.model_dump(mode="json"), "start": self._identity(start), **corpus_key}
        self._add("finetune", "finetune", key, upstream, train, lambda: self._check_hub(section.model, start))

    # -- patching -------------------------------------------------------------------------------------------
    def _probes(self) -> tuple[Path | None, str]:
        """The probe file each patch stage reads (several files are concatenated into <out>/probes.jsonl) and
        the digest of its content."""
        probes = self.study.probes
        if probes.inline is not None:
            return None, digest([p.model_dump(mode="json") for p in probes.inline])
        paths, merged = self.study.probe_paths()
        if not merged:
            return paths[0], file_digest(paths[0]) if paths[0].is_file() else "missing"
        return self._merge(paths)

    def _merge(self, paths: list[Path]) -> tuple[Path, str]:
        from interventions.probes import read_probe_specs

        seen: dict[str, str] = {}
        lines: list[str] = []
        for path in paths:
            for origin, spec in read_probe_specs(ProbeSetSpec(file=str(path)), self.base):  # errors name file:line
                if spec.id is not None and spec.id in seen:
                    raise ClapError(f"{origin}: probe id {spec.id!r} also in {seen[spec.id]}; ids must be unique "
                                    "across probes.files")
                if spec.id is not None:
                    seen[spec.id] = origin
            lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "\n".join(lines) + "\n"
        target = self.out / "probes.jsonl"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            atomic_write_text(target, text)
        return target, digest(text)

    def _patch(self, name: str, entry: ModelEntry, probes: tuple[Path | None, str]) -> None:
        from interventions.study import Study

        probes_file, probes_digest = probes
        results = self.out / "models" / name
        planner = self

        def run(resume: bool) -> list[Path]:
            spec = planner.study.patch_spec(planner._model_spec(entry), probes_file)
            spec.name = f"{planner.study.name} [{name}]"
            return _run_patch(Study(spec), results, resume)

        spec_key, probe_options = self._spec_key()
        key = {"spec": spec_key, "probe_options": probe_options, "probes": probes_digest,
               "model": self._identity(entry)}
        upstream = ["finetune"] if entry.finetuned else []
        self._add(f"patch[{name}]", "patch", key, upstream, run, lambda: self._check_hub(name, entry))

    def _model_spec(self, entry: ModelEntry) -> ModelSpec:
        """The ``model:`` a patching stage runs for one of the study's models."""
        return entry.model_spec(self._source(entry))

    def _spec_key(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The parts of the study file a patching stage's numbers depend on: the spec (without the settings that
        cannot change a number) and the probe options."""
        spec_key = self.study.model_dump(mode="json", exclude={"name", "analysis", "probes", *RUN_FIELDS})
        for setting in NON_RESULT_EXECUTION:
            spec_key["execution"].pop(setting, None)
        probe_options = self.study.probes.model_dump(mode="json", exclude={"file", "files", "inline"})
        return spec_key, probe_options

    def _cross_patch(self, name: str, section: Any, probes: tuple[Path | None, str]) -> None:
        """``patch[cross:S-into-T]``: the source model's activations patched into the target model's runs."""
        from interventions.study import Study

        probes_file, probes_digest = probes
        results = self.out / "cross" / name
        entries = self.study.model_entries()
        target, source = entries[section.target], entries[section.source]
        planner = self

        def run(resume: bool) -> list[Path]:
            spec = planner.study.cross_spec(section, planner._model_spec(target), planner._model_spec(source),
                                           probes_file)
            spec.name = f"{planner.study.name} [cross:{name}]"
            return _run_patch(Study(spec), results, resume)

        spec_key, probe_options = self._spec_key()
        key = {"spec": spec_key, "cross_model": section.model_dump(mode="json"), "probe_options": probe_options,
               "probes": probes_digest, "target": self._identity(target), "source": self._identity(source)}
        upstream = ["finetune"] if target.finetuned or source.finetuned else []
        def check() -> None:
            self._check_hub(section.target, target)
            self._check_hub(section.source, source)

        self._add(f"patch[cross:{name}]", "patch", key, upstream, run, check)

    def _derived(self, kind: str, name: str, entry: ModelEntry, probes: tuple[Path | None, str]) -> None:
        """``patch[additivity:NAME]`` (layers patched jointly, the sets chosen from ``patch[NAME]``'s single-layer
        results; the design table beside the results) or ``patch[ablation:NAME]`` (the clean run ablated):
        ``<out>/KIND/NAME/``, specs derived by :mod:`interventions.derived`."""
        from interventions.study import Study

        probes_file, probes_digest = probes
        results = self.out / kind / name
        singles = self.out / "models" / name
        planner = self
        section = getattr(self.study, kind)

        def run(resume: bool) -> list[Path]:
            from clap.contract import DESIGN_FILE, atomic_write_frame
            from interventions import derived

            spec = planner.study.patch_spec(planner._model_spec(entry), probes_file)
            spec.name = f"{planner.study.name} [{kind}:{name}]"
            if kind == "ablation":
                Study(derived.ablation_spec(spec, section)).run(results)
                return [results]
            joint, design = derived.additivity_spec(spec, read_results(singles)[0], section)
            joint.name = spec.name
            Study(joint).run(results)
            atomic_write_frame(results / DESIGN_FILE, design)
            return [results]

        spec_key, probe_options = self._spec_key()
        key = {"spec": spec_key, kind: section.model_dump(mode="json"), "probe_options": probe_options,
               "probes": probes_digest, "model": self._identity(entry)}
        upstream = [f"patch[{name}]"] if kind == "additivity" else (["finetune"] if entry.finetuned else [])
        self._add(f"patch[{kind}:{name}]", "patch", key, upstream, run, lambda: self._check_hub(name, entry))

    def _source(self, entry: ModelEntry) -> str:
        return str(self.finetuned_dir) if entry.finetuned else self.study.located_source(entry)

    def _identity(self, entry: ModelEntry) -> dict[str, Any]:
        """What identifies a model's weights for hashing: the fine-tuning stage, a local path's content, or the
        hub id / built-in name with its revision."""
        if entry.finetuned:
            return {"finetuned": True}  # the finetune stage's hash is upstream
        source = self._source(entry)
        identity: dict[str, Any] = {"revision": entry.revision, "gguf_file": entry.gguf_file,
                                    "tokenizer": entry.tokenizer}
        if Path(source).exists():
            identity["content"] = tree_digest(source)
        else:
            identity["source"] = source
        return identity

    def _check_hub(self, name: str, entry: ModelEntry) -> None:
        """A hub model must be in the local cache or the hub reachable, checked before any stage runs (so that a
        study of a built-in and a hub model does not patch the first for minutes and then fail offline)."""
        from clap.models import BUILTIN_ADAPTERS, BUILTIN_GGUF, ModelLoadError, resolve_source

        if entry.finetuned or entry.source in BUILTIN_GGUF or entry.source in BUILTIN_ADAPTERS:
            return
        source = self._source(entry)
        if Path(source).expanduser().exists() or source.endswith(".gguf") or entry.gguf_file:
            return  # a local model: checked where it loads
        try:
            resolve_source(source, revision=entry.revision)
        except ModelLoadError as exc:
            raise ModelUnavailable(name, f"model {name!r}: {exc} (in this study: `models: {{{name}: {{source: "
                                   f"...}}}}` or `clap run ... --model {name}=SOURCE`)") from None

    def _trace(self, name: str) -> None:
        """ROME's six-token-group table (with the spread over noise draws) and the heatmaps, beside the results."""
        results = self.out / "models" / name
        figures = self.study.report.figures

        def run(resume: bool) -> list[Path]:
            from analyses.trace import write_trace_outputs
            from clap.contract import read_samples

            frame = read_results(results)[0]
            return write_trace_outputs(frame, results, TRACE_PROBE_FIGURES, samples=read_samples(results),
                                       figures=figures)

        key = {"figures": figures, "probe_figures": TRACE_PROBE_FIGURES}
        self._add(f"trace[{name}]", "trace", key, [f"patch[{name}]"], run)

    # -- analyses -------------------------------------------------------------------------------------------
    def _analyze(self, name: str, results: Path | None = None, same_prompt: bool = False) -> None:
        """``analyze[NAME]``. A same-prompt cross-model stage has no corruption of its own (the models are the
        difference), so ``require_flip``, which judges a probe's corruption, would drop every probe there: it
        applies to the per-model stages only. ``min_abs_diff`` judges the recovery's denominator, which a
        cross-model run has (source model's run - target model's run), and applies everywhere."""
        results = results or self.out / "models" / name
        options = self.study.analysis
        if same_prompt and options is not None and options.require_flip:
            log.info("analyze[%s]: require_flip judges a corruption; a same-prompt cross-model run has none, so it "
                     "is not applied there", name)
            options = options.model_copy(update={"require_flip": False})
        render = self.study.report
        # a model's report holds its derived runs' sections (additivity check, clean-run ablation)
        derived = {kind: self.out / kind / name for kind in ("additivity", "ablation")
                   if any(s.name == f"patch[{kind}:{name}]" for s in self.stages)}

        def run(resume: bool) -> list[Path]:
            from analyses.options import AnalyzeOptions
            from analyses.report import write_report
            from clap.analysis_options import AnalysisOptions

            files = write_report(results, AnalyzeOptions(analysis=options or AnalysisOptions(), figures=render.figures,
                                                         n_boot=render.n_boot, **derived))
            return [files.html.parent]

        key = {"analysis": options.model_dump(mode="json") if options else None,
               "report": render.model_dump(mode="json")}
        self._add(f"analyze[{name}]", "analyze", key, [f"patch[{name}]", *(f"patch[{k}:{name}]" for k in derived)],
                  run)

    def _compare(self, a: str, b: str) -> None:
        out = self.out / "compare" / f"{a}-vs-{b}"
        models = self.out / "models"

        def run(resume: bool) -> list[Path]:  # the study's options, as analyze[NAME] uses them (not run.json's)
            from clap.analysis_options import AnalysisOptions

            return [compare_models(models / a, models / b, out, figures=figures,
                                   analysis=options or AnalysisOptions())]

        figures = self.study.report.figures
        options = self.study.analysis
        key = {"pair": [a, b], "figures": figures, "analysis": options.model_dump(mode="json") if options else None}
        self._add(f"compare[{a}-vs-{b}]", "compare", key, [f"patch[{a}]", f"patch[{b}]"], run)

    def _report(self) -> None:
        from clap.app.study_report import write_study_report

        upstream = [s.name for s in self.stages if s.kind in ("trace", "analyze", "compare")]
        planner = self

        def run(resume: bool) -> list[Path]:
            return write_study_report(planner.study, planner.out, planner.stages)

        self._add("report", "report", {"study": self.study.name}, upstream, run)

    def _add(self, name: str, kind: str, key: dict[str, Any], upstream: list[str],
             action: Callable[[bool], list[Path]], check: Callable[[], None] | None = None) -> None:
        hashes = {s.name: s.hash for s in self.stages}
        stage = Stage(name, kind, key, upstream, action, check)
        stage.hash = digest({"stage": name, "key": key, "upstream": {u: hashes[u] for u in upstream},
                             "clap": __version__})
        self.stages.append(stage)


def _run_patch(study: Any, results: Path, resume: bool) -> list[Path]:
    """Run a patch stage into ``results``; return the files it wrote (the results contract's).

    Only a stage interrupted under the same hash resumes from its finished batches: a stage that runs because its
    hash changed (weights, probes, spec, clap version) or was forced first discards every batch in
    ``results/.partial``, whatever plan fingerprint they carry, so no batch of other inputs can be picked up."""
    from clap.contract import results_path, samples_path, sidecar_path
    from interventions.batch_store import discard_partial

    if not resume and discard_partial(results):
        log.info("%s: finished batches of an earlier run of this stage discarded (its inputs changed)", results)
    study.run(results)
    return [results_path(results), sidecar_path(results), *[p for p in [samples_path(results)] if p.is_file()]]


def _fail(message: str) -> Callable[[], None]:
    def check() -> None:
        raise ClapError(message)

    return check


def _select(stages: Sequence[Stage], names: Iterable[str], option: str) -> set[str]:
    """Stage names matching each given name: a stage (``patch[base]``), a kind (``patch``) or ``all``."""
    chosen: set[str] = set()
    for given in names:
        matches = [s.name for s in stages if given in ("all", s.name, s.kind)]
        if not matches:
            valid = [s.name for s in stages] + sorted({s.kind for s in stages})
            hint = closest(given, valid)
            raise ClapError(f"{option} {given}: no such stage in this study" +
                            (f"; did you mean {', '.join(hint)}?" if hint else "") + f" (stages: {', '.join(valid)})")
        chosen.update(matches)
    return chosen


# ------------------------------------------------------------------------------------------------- running
def load_study(study: StudyFile | str | Path | dict, models: dict[str, str] | None = None,
               group: str | None = None, **execution: Any) -> StudyFile:
    """The study file with ``models`` (name -> source), ``group`` (``analysis.group``) and execution settings
    (``remote``, ``device``, ``max_rows``, ``progress``; None = keep) overridden, as ``clap run --model NAME=SOURCE
    --group G`` does."""
    study = StudyFile.coerce(study)
    if group is not None:
        from clap.analysis_options import AnalysisOptions

        study.analysis = (study.analysis or AnalysisOptions()).model_copy(update={"group": group})
    if models:
        entries = study.model_entries()
        for name, source in models.items():
            if name not in entries:
                hint = closest(name, list(entries))
                raise ClapError(f"--model {name}={source}: the study has no model {name!r}"
                                + (f"; did you mean {hint[0]!r}?" if hint else "") + f" (models: {', '.join(entries)})")
            replaced = ModelEntry(source=source)
            if study.models is not None:
                study.models[name] = replaced
            else:
                study.model = replaced
        if study.finetune is not None and not any(e.finetuned for e in study.model_entries().values()):
            study.finetune = None  # its only consumer now has a source of its own
    for setting, value in execution.items():
        if value is not None:
            setattr(study.execution, setting, value)
    return study


def check_study(study: StudyFile | str | Path | dict, *, models: dict[str, str] | None = None,
                remote: bool | str | None = None, device: str | None = None) -> list[str]:
    """``clap run --dry-run``: everything that can be checked without running a stage, and the stages' names.

    The study file, its pending sections, the stage plan and every stage's preconditions (as a real run checks
    them before its first stage), and, for each model with a source, what ``clap patch`` checks before loading
    weights: the device, every site address against the model's config, and the concatenated probes with its
    tokenizer (token lengths, one-token answers, the same labels on every probe). Planned in a temporary folder:
    nothing is written to the output folder. A fine-tuned model's probes are checked only by its run."""
    import tempfile

    from interventions.study import Study

    study = load_study(study, models, remote=remote, device=device, progress=False)
    for section, reason in study.pending():
        raise ClapError(f"study {study.name!r}: `{section}:` {reason}; remove the section to run the rest")
    unavailable: dict[str, str] = {}  # models that cannot be checked here (a hub model offline): reported at the end
    with tempfile.TemporaryDirectory(prefix="clap-dry-run-") as tmp:
        planner = _Planner(study, Path(tmp), False)
        stages = planner.plan()
        for stage in stages:
            if stage.check is not None:
                try:
                    stage.check()
                except ModelUnavailable as exc:
                    unavailable.setdefault(exc.model, str(exc))
        probes_file, _ = planner._probes()
        checked = []
        for name, entry in study.model_entries().items():
            if not entry.finetuned and name not in unavailable:
                Study(study.patch_spec(planner._model_spec(entry), probes_file)).check()
                checked.append(name)
    if unavailable:
        done = (f"model(s) {', '.join(map(repr, checked))} (sites against the config, probes with the tokenizer)"
                if checked else "no model")
        raise ClapError(f"dry run of study {study.name!r}: the study file, its {len(stages)} stages and {done} check "
                        f"out, but {len(unavailable)} model(s) could not be checked here, and `clap run` would stop "
                        f"before its first stage for the same reason: " + "; ".join(unavailable.values()))
    return [stage.name for stage in stages]


def run_study(study: StudyFile | str | Path | dict, out: str | Path | None = None, *, force: Sequence[str] = (),
              until: str | None = None, models: dict[str, str] | None = None, remote: bool | str | None = None,
              device: str | None = None, max_rows: int | None = None, progress: bool | None = None,
              group: str | None = None, echo: Echo | None = None) -> RunResult:
    """Run every stage of ``study`` that is not up to date into ``out``; the Python twin of ``clap run``.

    ``force``: stages (or kinds, or ``all``) to rerun although up to date; what depends on them reruns too.
    ``until``: the last stage (or kind) to run. ``models``: name -> source overrides. ``echo`` receives one line
    per stage (default: printed to stderr). ``group``: the analyses' and comparisons' group (``analysis.group``)."""
    study = load_study(study, models, group, remote=remote, device=device, max_rows=max_rows, progress=progress)
    for section, reason in study.pending():
        raise ClapError(f"study {study.name!r}: `{section}:` {reason}; remove the section to run the rest")
    out = Path(out) if out is not None else Path(f"{study.name}-output")
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    with locked(out):
        stages = _Planner(study, out, study.execution.progress).plan()
        if until is not None:
            last = max(i for i, s in enumerate(stages) if s.name in _select(stages, [until], "--until"))
            stages = stages[: last + 1]
        forced = _select(stages, force, "--force")
        for stage in stages:
            if stage.check is not None:
                stage.check()
        store = StageStore(out)
        result = RunResult(out, study)
        ran: set[str] = set()
        started = time.perf_counter()
        for number, stage in enumerate(stages, start=1):
            head = f"stage {number}/{len(stages)} {stage.name}"
            rerun = stage.name in forced or any(u in ran for u in stage.upstream)
            problem = store.outputs_problem(stage.name) if store.is_done(stage.name, stage.hash) else None
            if not rerun and store.is_done(stage.name, stage.hash) and problem is None:
                result.stages[stage.name] = "up to date"
                say(f"{head}: up to date")
                continue
            record = store.stages.get(stage.name) or {}
            resume = record.get("status") == "running" and record.get("hash") == stage.hash
            reason = f" (its outputs changed: {problem})" if problem and not rerun else ""
            say(f"{head}: {'resuming' if resume else 'running'}{reason}")
            store.mark_running(stage.name, stage.hash)
            clock = time.perf_counter()
            outputs = stage.action(resume)
            seconds = time.perf_counter() - clock
            store.mark_done(stage.name, stage.hash, seconds, outputs)
            ran.add(stage.name)
            result.stages[stage.name] = "ran"
            say(f"{head}: done in {seconds:.1f} s (elapsed {time.perf_counter() - started:.1f} s)")
    return result


# ------------------------------------------------------------------------------------------------- command line
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a whole study file: corpus, fine-tuning, patching per model, analyses, comparison, report",
        description="Run every stage of a study file that is not up to date. Each stage is skipped when the hash "
        "of its inputs (study section, input files, upstream stages, clap version) matches <out>/stages.json; a "
        "changed input reruns that stage and everything downstream. An interrupted run resumes.",
    )
    p.add_argument("study", type=Path, help="study file (YAML); see studies/")
    p.add_argument("-o", "--out", type=Path, help="output folder (default: ./<study name>-output)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun this stage (e.g. patch[base], a kind such as patch, or all) and what depends on it")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage (or the last of this kind)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                   help="use SOURCE (hub id, folder, .gguf, built-in) for the study's model NAME")
    p.add_argument("--remote", choices=["false", "true", "local"], help="override execution.remote")
    p.add_argument("--device", help="override execution.device")
    p.add_argument("--max-rows", type=cli_args.max_rows, help="override execution.max_rows (rows per forward pass)")
    p.add_argument("--group", metavar="LABEL",
                   help="override analysis.group: the probe label whose values are the groups of the analyses and "
                        "comparisons (default: analysis.group, else knowledge_type, never a provenance label)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="check the study (plan, preconditions, each model's sites and probes against its config and "
                   "tokenizer; no weights loaded) and list its stages; nothing is run or written")
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    models = {}
    for item in args.model:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ClapError(f"--model {item!r}: expected NAME=SOURCE")
        models[name.strip()] = source.strip()
    remote = {"false": False, "true": True, "local": "local"}[args.remote] if args.remote else None
    if args.dry_run:
        stages = check_study(args.study, models=models, remote=remote, device=args.device)
        print("\n".join(f"stage {i}/{len(stages)} {name}" for i, name in enumerate(stages, start=1)))
        print(f"dry run: the study checks out; {len(stages)} stages would run (nothing ran)")
        return 0
    result = run_study(args.study, args.out, force=args.force, until=args.until, models=models, remote=remote,
                       device=args.device, max_rows=args.max_rows, progress=False if args.no_progress else None,
                       group=args.group, echo=lambda line: print(line, flush=True))
    ran = sum(status == "ran" for status in result.stages.values())
    print(f"{len(result.stages)} stages ({ran} ran, {len(result.stages) - ran} up to date) -> {result.out}"
          + (f"; open {result.report}" if result.report.is_file() else ""))
    return 0


def stage_record(out: str | Path) -> dict[str, Any]:
    """The ``stages.json`` of an output folder (for tests and tooling)."""
    return json.loads((Path(out) / "stages.json").read_text(encoding="utf-8"))["stages"]
