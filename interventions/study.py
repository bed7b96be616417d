"""``Study``: spec -> plan -> batches -> tidy results, with progress and resumable output.

>>> study = Study.from_yaml("study.yaml")          # or Study(StudySpec(...), model=loaded_model)
>>> frame = study.run("results/")                 # results/results.parquet + results/run.json

Resuming: each finished batch is written to ``<out>/.partial/<plan fingerprint>/`` as it completes; a rerun of the
same spec skips those batches, so an interrupted study loses at most the batch in flight. The plan fingerprint covers
every weight, so batches computed with other weights are never reused (the rerun says it starts afresh). The output
folder is locked for the run (``<out>/.clap.lock``), and a finished run removes only its own partial folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from clap.contract import SAMPLES_FILE, atomic_write_frame
from clap.devices import resolve_device, torch_threads
from clap.errors import ClapError
from clap.groups import ordered_labels
from clap.locks import exclusive_lock
from clap.models import (
    LoadedModel,
    prepare_tokenizer,
    resolve_source,
    weights_fingerprint,
)
from clap.process_memory import release_freed_memory
from interventions import attribution, full_traces
from interventions.batch_store import BatchStore
from interventions.executor import Executor
from interventions.measurements import Measurements
from interventions.measuring import MeasurementPasses
from interventions.output import (
    average_samples,
    package_versions,
    prepare_output_dir,
    to_frame,
    write_results,
)
from interventions.plan import (
    DEFAULT_BASELINE_ROWS,
    DEFAULT_ROWS,
    Batch,
    Cell,
    Plan,
    build_batch,
    chunk_cells,
    compile_plan,
    rows_for_budget,
)
from interventions.probes import Probe, load_probes
from interventions.resolved import (
    ResolvedStudy,
    check_group_probes,
    group_plans,
    load_spec_model,
    located,
    site_groups,
    spec_probes,
    unembed_module,
)
from interventions.sites import Site
from interventions.spec import ModelSpec, StudySpec
from interventions.tidy import TidyRows

log = logging.getLogger(__name__)

#: held for the whole run so that two runs never write one output folder
LOCK_FILE = ".clap.lock"


class Study:
    """A compiled, runnable activation-patching study: spec -> plan -> batches -> tidy results.

    A study patches activations between two runs of each probe: the *clean* prompt (where the model knows the
    answer) and the *corrupted* one (one fact changed). **Denoising** (the default) runs the corrupted prompt and
    overwrites one site's activation at chosen positions with the clean run's value; a metric that moves back towards
    the clean run marks an activation that *suffices* to carry the fact. **Noising** does the reverse and marks
    activations the clean behaviour *needs*. Every cell (probe x site x position x operation) becomes one row of a
    batched forward pass, beside the unpatched clean and corrupted rows of the same pass.

    ``recovery = (patched - corrupted) / (clean - corrupted)`` normalises the effect (0: nothing, 1: the clean
    behaviour restored); it is undefined (NaN) when the two runs barely differ, and a spec in which no probe can
    define it is refused.

    **Cross-model patching** (``source_model:`` in the spec, or ``source_model=`` here): the source run is another
    model's (same architecture, sizes and tokenizer; e.g. the fine-tuned model patched into the base model), on the
    source prompt or, with ``corrupted_prompt: clean``, on the very prompt the target model runs. ``clean`` and
    ``corrupted`` stay the *target* model's runs; ``source_model_clean`` / ``source_model_corrupted`` are the source
    model's runs of the two prompts; and ``recovery = (patched - target) / (source - target)`` with ``target`` the
    target model on the target prompt and ``source`` the source model on the source prompt: 1 = the source model's
    behaviour fully transferred by the patch (in both directions; for noising this is not the usual 1 - x).
    ``kl`` stays each model's KL to its *own* clean-prompt run (``patched``: to the target model's), so its
    cross-model recovery is undefined (NaN): read its ``patched`` values.

    Sites that recover 100 % by construction (the unembedding, the final norm, the last block's output at the
    answer position) are flagged ``trivial``: they show that patching works, not where a fact lives.

    Parameters
    ----------
    spec : StudySpec
        The validated study (from YAML with :meth:`from_yaml`, or built in Python).
    model : LoadedModel, optional
        An already-loaded model (:func:`interventions.load_model`); otherwise the spec's ``model.source`` is
        loaded on first use, after every check that needs no weights (sites, devices, probes, output folder).

    Examples
    --------
    >>> study = Study.from_yaml("study.yaml")                                          # doctest: +SKIP
    >>> frame = study.run("results/")         # results/results.parquet + run.json     # doctest: +SKIP
    >>> frame[frame.site_kind == "mlp_out"].groupby("layer").recovery.mean()           # doctest: +SKIP

    See Also
    --------
    interventions.sweeps : one-line sweeps (``resid_pre_sweep``...) in the manner of TransformerLens.
    analyses.analyze : statistics on the results folder.
    """

    def __init__(self, spec: StudySpec, model: LoadedModel | None = None, source_model: LoadedModel | None = None,
                 *, executor_options: dict[str, Any] | None = None):
        if source_model is not None and spec.source_model is None:
            spec = spec.model_copy(update={"source_model": ModelSpec(source=source_model.identity.get("source")
                                                                     or "in-memory")})
            StudySpec.from_dict(spec.to_dict(), source="source_model=")  # the cross-model rules apply
        self.spec = spec
        self._model = model
        self._executor: Executor | None = None
        #: further keyword arguments of :class:`~interventions.executor.Executor` (benchmarks, tests)
        self.executor_options = dict(executor_options or {})
        self._source = source_model
        self._resolved: ResolvedStudy | None = None
        self.source_metrics: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def from_yaml(cls, path: str | Path, model: LoadedModel | None = None,
                  source_model: LoadedModel | None = None) -> Study:
        return cls(StudySpec.from_yaml(path), model=model, source_model=source_model)

    # -- compilation ----------------------------------------------------------------------------------------
    def model_source(self, value: str | None = None) -> str | None:
        """``model.source`` (or ``value``, e.g. ``model.tokenizer``) with a relative path resolved against the spec
        file's folder (:func:`interventions.resolved.located`)."""
        return located(self.spec, self.spec.model.source if value is None else value)

    def device(self) -> str:
        """``execution.device`` checked (type, availability, index) before anything is loaded onto it."""
        return resolve_device(self.spec.execution.device, where=self.spec.where(("execution", "device")))

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_spec_model(self.spec, self.spec.model)
        return self._model

    @property
    def executor(self) -> Executor:
        """Runs this study's traces: the model, the remote mode and the execution strategy (built on first use)."""
        if self._executor is None:
            execution = self.spec.execution
            self._executor = Executor(self.model.nn, remote=execution.remote, strategy=execution.strategy,
                                      unembed_module=self.unembed_module(), metrics=self.spec.metrics,
                                      **self.executor_options)
        return self._executor

    @property
    def source_model(self) -> LoadedModel | None:
        """The model whose runs supply the source activations (cross-model patching); None: the target model."""
        if self.spec.source_model is None:
            return None
        if self._source is None:
            self._source = load_spec_model(self.spec, self.spec.source_model)
        return self._source

    def probes(self, tokenizer: Any = None, warn: bool = True, config: Any = None) -> list[Probe]:
        """The spec's probes, tokenised and checked (alignment, context length, answers). ``tokenizer`` and
        ``config`` let the pre-load checks run on the tokenizer and the config alone, before any weights load."""
        probes = spec_probes(self.spec, tokenizer or self.model.tokenizer,
                             config if config is not None else self.model.hf.config, warn=warn)
        # across models the models differ; an ablation of the clean run has no corrupted prompt by design
        if not self.spec.baseline and self.spec.source_model is None and not self.spec.ablates_clean_run:
            check_distinct_prompts(probes, warn)
        return probes

    def resolved(self) -> ResolvedStudy:
        """The study resolved on the loaded model (probes, site groups, baselines), once per run; the plan, the
        measuring passes and attribution read it."""
        if self._resolved is None:
            self._resolved = ResolvedStudy.of(self.spec, self.model, self.probes(), self.source_model)
            attribution.check_sites(self.spec, self._resolved.resolver)
        return self._resolved

    def sites(self) -> list[Site]:
        """Every concrete site of the study, in forward-execution order."""
        return self.plan().sites

    def _site_groups(self, hf_model: torch.nn.Module) -> None:
        """Resolve every patch group's addresses on ``hf_model``; an error names the spec file, line and field."""
        resolver, _ = site_groups(self.spec, hf_model)
        attribution.check_sites(self.spec, resolver)

    def plan(self, *, refresh_weights: bool = True) -> Plan:
        """The compiled plan. ``refresh_weights`` (default) re-hashes in-memory weights, which may have been edited
        since loading, so the plan's fingerprint names the weights the run will use; a run that writes nothing
        (no output folder: no resuming, no sidecar) passes False and skips the hash, a full read of every weight
        on each run of an in-memory model."""
        resolved = self.resolved()
        plan = compile_plan(self.spec, resolved.probes, resolved.groups, self.model.tokenizer,
                            resolved.resolver.order_key, baseline=resolved.baseline)
        plan.model_key = self._model_key(self.model, refresh_weights)
        source = self.source_model
        if source is not None:  # resuming must never mix batches patched from other source weights
            check_compatible(self.model.hf.config, source.hf.config, self.spec.where(("source_model",)))
            check_same_tokens(plan.probes, self._source_probes(source.tokenizer), self.spec.where(("source_model",)))
            plan.model_key += f"|source:{self._model_key(source, refresh_weights)}"
        if plan.dropped:
            log.warning("%d cells not run: none of their tokens is left to patch (right alignment, or an empty "
                        "token group)", plan.dropped)
        return plan

    @staticmethod
    def _model_key(model: LoadedModel, refresh: bool) -> str:
        """``architecture:fingerprint`` of a loaded model; ``refresh``: hash its in-memory weights again first."""
        identity = model.identity
        if refresh and identity.get("weights_fingerprint") is not None:
            identity["weights_fingerprint"] = weights_fingerprint(model.hf, identity.get("location"))
        return f"{identity.get('architecture')}:{identity.get('weights_fingerprint')}"

    def check(self) -> None:
        """What can be checked before the weights load: the device, the model source, every site address (against
        the model's config, built on the meta device) and the probes (with the tokenizer alone); with a source
        model, that its architecture, sizes and probe tokens equal the target's."""
        attribution.check_spec(self.spec)
        if self._model is not None:
            self._site_groups(self._model.hf)
            if self._source is None and self.spec.source_model is not None and self.spec.execution.remote is not True:
                loaded = self._config_and_tokenizer(self.spec.source_model)
                if loaded is not None:
                    self._check_source(self._model.hf.config, self._model.tokenizer, *loaded)
            return
        if self.spec.execution.remote is True:
            return  # the remote model is built on the meta device anyway; plan() checks it
        self.device()
        from transformers import AutoModelForCausalLM

        loaded = self._config_and_tokenizer(self.spec.model)
        if loaded is None:
            return
        config, tokenizer = loaded
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        resolver, groups = site_groups(self.spec, skeleton)
        group_plans(self.spec, resolver, groups)  # windows and cumulative stacks too
        attribution.check_sites(self.spec, resolver)
        # the run warns once, with the loaded model's tokenizer
        check_group_probes(self.spec, self.probes(tokenizer, warn=False, config=config))
        if self.spec.source_model is not None:
            source = (self._source.hf.config, self._source.tokenizer) if self._source is not None else \
                self._config_and_tokenizer(self.spec.source_model)
            if source is not None:
                self._check_source(config, tokenizer, *source)

    def _config_and_tokenizer(self, m: ModelSpec) -> tuple[Any, Any] | None:
        """A model's config and tokenizer without its weights (None when they cannot be read that way: the loader
        then reports the problem with its own message)."""
        from transformers import AutoConfig, AutoTokenizer

        location, _ = resolve_source(located(self.spec, m.source), gguf_file=m.gguf_file, revision=m.revision)
        try:
            config = AutoConfig.from_pretrained(location, revision=m.revision)
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(located(self.spec, m.tokenizer) or location))
        except Exception as exc:  # noqa: BLE001 - the loader reports any such problem with its own message
            log.debug("pre-load checks skipped: %s", exc)
            return None
        return config, tokenizer

    def _check_source(self, config: Any, tokenizer: Any, source_config: Any, source_tokenizer: Any) -> None:
        where = self.spec.where(("source_model",))
        check_compatible(config, source_config, where)
        check_same_tokens(self._source_probes(tokenizer), self._source_probes(source_tokenizer), where)

    def _source_probes(self, tokenizer: Any) -> list[Probe]:
        """The probes as the source model's tokenizer reads them, unchecked: :func:`check_same_tokens` then says
        which probe the two tokenizers split differently."""
        return load_probes(self.spec.probes, tokenizer, self.spec.base_dir,
                           corrupted_prompt=self.spec.corrupted_prompt, warn=False)

    # -- execution ------------------------------------------------------------------------------------------
    def run(self, out_dir: str | Path | None = None) -> pd.DataFrame:
        """Run every cell in batched forward passes; write results to ``out_dir`` if given; return the frame.

        ``out_dir`` is checked (writable folder) and locked (``<out>/.clap.lock``) first, so a second run into the
        same folder stops at once, naming the run that holds it."""
        self._resolved = None  # a rerun reads the probe files again (they may have changed since)
        full_traces.check_remote(self.spec.execution.remote, self.spec.model.source)
        if self.spec.source_model is not None:
            full_traces.check_remote(self.spec.execution.remote, self.spec.source_model.source)
        with torch_threads(self.spec.execution.threads):
            if out_dir is None:
                self.check()
                return self._run(None)
            out = prepare_output_dir(Path(out_dir))
            with exclusive_lock(out / LOCK_FILE, wait=False, what=f"output folder {out}"):
                self.check()
                return self._run(out)

    def _run(self, out: Path | None) -> pd.DataFrame:
        spec = self.spec
        plan = self.plan(refresh_weights=out is not None)
        if not plan.cells and not attribution.named_groups(spec):
            raise ClapError(f"the study has no cells to run ({plan.dropped} dropped under right alignment)")
        group_columns = self._group_columns(plan)  # before any batch: an unknown analysis.group stops the run here
        model = self.model
        loaded_dtype = model.identity.get("dtype")
        if loaded_dtype and loaded_dtype != spec.execution.dtype:
            log.warning("the model was loaded as %s; execution.dtype %s applies only when clap loads the model",
                        loaded_dtype, spec.execution.dtype)
        constants = self._constants(plan)
        kind = self._batch_kind(plan)
        max_rows, full_rows = self._rows(plan, kind), self._rows(plan, "full")
        plan.rows_per_batch, plan.baseline_rows_per_batch = max_rows, DEFAULT_BASELINE_ROWS[kind]
        chunks = chunk_cells(plan, max_rows, plan.baseline_rows_per_batch)
        store = BatchStore(out, plan)
        pad_id = model.tokenizer.pad_token_id
        frames = []
        baselines = BaselineCheck(spec, len(plan.probes))
        progress = tqdm(total=len(plan.cells), desc=f"patching {spec.name}", unit="cell",
                        disable=not spec.execution.progress)
        for index, cells in enumerate(chunks):
            frame = store.load(index)
            if frame is None:
                frame = self._run_cells(plan, cells, index, pad_id, constants, full_rows)
                store.save(index, frame)
                release_freed_memory()  # else the allocator's heap creeps up over hundreds of batches
            frames.append(frame)
            baselines.update(frame)
            progress.update(len(cells))
        progress.close()
        baselines.report()
        result = to_frame(pd.concat(attribution.with_exact(frames, self._attribution_rows(plan)), ignore_index=True),
                          group_columns)
        self.samples_frame = None
        if spec.samples > 1:  # per-sample rows aside (samples.parquet); the results average them
            self.samples_frame = result
            result = to_frame(average_samples(result, spec.recovery_epsilon), group_columns)
        self.constants = constants
        if out:
            if self.samples_frame is not None:
                atomic_write_frame(out / SAMPLES_FILE, self.samples_frame)
            else:  # an earlier run's draws (a trace into the same folder) must not pass for this run's
                (out / SAMPLES_FILE).unlink(missing_ok=True)
            write_results(out, result, self._sidecar(plan, group_columns, len(chunks), max_rows, constants))
            store.discard()  # only this plan's batches: others may resume later
        return result

    def _rows(self, plan: Plan, kind: str) -> int:
        """Rows per batch for a batch ``kind`` (``suffix`` or ``full``): ``execution.max_rows``, else an estimate
        from ``execution.memory_budget_mb``, else the kind's default (:data:`interventions.plan.DEFAULT_ROWS`)."""
        execution, hf = self.spec.execution, self.model.hf
        config = hf.config
        return rows_for_budget(
            execution.memory_budget_mb,
            execution.max_rows,
            max(max(len(p.clean_ids), len(p.corrupted_ids)) for p in plan.probes),
            config.vocab_size,
            getattr(config, "hidden_size", 768),
            getattr(config, "num_hidden_layers", 12),
            torch.finfo(next(hf.parameters()).dtype).bits // 8,
            default=DEFAULT_ROWS[kind],
        )

    def _run_cells(self, plan: Plan, cells: list[Cell], index: int, pad_id: int, constants: Measurements,
                   full_rows: int) -> pd.DataFrame:
        """Tidy rows of one chunk of cells. A chunk the executor cannot take on the suffix path runs in full, as
        parts of at most ``full_rows`` rows when it holds more (a suffix batch is many times larger than one
        forward pass over every row and column can hold)."""
        batch = build_batch(plan, cells, index, pad_id, constants)
        metrics = self.executor.run_batch(batch, full_rows=full_rows)
        if metrics is not None:
            return self._tidy(plan, batch, cells, metrics)
        frames = []
        for part in chunk_cells(plan, full_rows, cells=cells):
            batch = build_batch(plan, part, index, pad_id, constants)
            frames.append(self._tidy(plan, batch, part, self.executor.run_batch(batch)))
        return pd.concat(frames, ignore_index=True)

    def _group_columns(self, plan: Plan) -> list[str]:
        """The probes' labels as run.json lists them: the analysis group first (``analysis.group``, else the
        default of :mod:`clap.groups`: ``knowledge_type``, never a provenance field), then the rest by name."""
        analysis = self.spec.analysis
        labels = {name: [p.labels.get(name) for p in plan.probes] for name in plan.probes[0].labels} \
            if plan.probes else {}
        return ordered_labels(labels, analysis.group if analysis else None,
                              analysis.subject_field if analysis else "subject",
                              where=self.spec.where(("analysis", "group")))

    def _attribution_rows(self, plan: Plan) -> pd.DataFrame | None:
        """The cells whose operation is ``attribution``: estimated by :mod:`interventions.attribution` (one forward and
        one backward pass per chunk of probes) on the resolved study; None when no group names it."""
        return attribution.study_rows(self.resolved())

    def unembed_module(self) -> str | None:
        return unembed_module(self.model.hf)

    def _constants(self, plan: Plan) -> Measurements:
        """What the plan's operations need measured first (:class:`interventions.measuring.MeasurementPasses`); a
        cross-model study's source-model baselines land in ``source_metrics``."""
        passes = MeasurementPasses(self.resolved(), self.executor)
        constants = passes.constants(plan)
        self.source_metrics = passes.source_metrics
        return constants


    def _tidy(self, plan: Plan, batch: Batch, cells: list[Cell], metrics: torch.Tensor) -> pd.DataFrame:
        """Tidy rows of one batch (:class:`interventions.tidy.TidyRows`)."""
        return TidyRows(self.spec, self.model.tokenizer, self.source_metrics).rows(plan, batch, cells, metrics)


    def _batch_kind(self, plan: Plan) -> str:
        """Which default batch size applies: ``suffix`` only where suffix passes will run (a model the strategy can
        place, no patch on the unembedding, whose full-width logits a batch would then hold); else ``full``."""
        executor = self.executor
        if executor.strategy != "suffix" or executor.layout is None:
            return "full"
        if any(site.module == executor.unembed_module for site in plan.sites):
            return "full"
        return "suffix"

    def _sidecar(self, plan: Plan, group_columns: list[str], n_batches: int, max_rows: int,
                 constants: Measurements) -> dict[str, Any]:
        noise_ops = [op for op in self.spec.all_operations() + [b.operation for b in self.spec.baseline or []]
                     if op.name == "noise"]
        return {
            "noise": {
                "embedding_std": constants.embedding_std,
                "selected_std": constants.selected_std,
                "std_by_operation": {op.label: constants.noise_std(op) for op in noise_ops},
                "samples": self.spec.samples,
            } if noise_ops else None,
            "spec": self.spec.to_dict(),
            "model": self.model.identity,
            **({"source_model": self.source_model.identity} if self.source_model is not None else {}),
            "versions": package_versions(),
            "seed": self.spec.seed,
            "group_columns": group_columns,
            "n_probes": len(plan.probes),
            "n_cells": len(plan.cells),
            "n_batches": n_batches,
            "max_rows": max_rows,
            "max_baseline_rows": plan.baseline_rows_per_batch,
            "strategy": self.executor.strategy_used,
            #: suffix strategy: patched rows run, rows not run because their edits change nothing, batches on the
            #: local ragged path (this run's batches only; resumed batches were counted by the run that made them)
            "suffix_counts": dict(self.executor.suffix_stats),
            "plan_fingerprint": plan.fingerprint,
            "probes": [
                {"probe_id": p.id, **p.labels, "clean": p.clean, "corrupted": p.corrupted,
                 "answer_ids": p.answer_ids, "wrong_ids": p.wrong_ids}
                for p in plan.probes
            ],
        }


#: config fields that must agree between a source and a target model (GPT-2's names map onto these)
SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "n_inner", "head_dim", "vocab_size")


def check_compatible(config: Any, source_config: Any, where: str) -> None:
    """Refuse a source model whose activations cannot stand in for the target's: another architecture, layer count,
    width, head count or vocabulary (every site's meaning and shape depends on them)."""
    for name in SHAPE_FIELDS:
        mine, theirs = getattr(config, name, None), getattr(source_config, name, None)
        if mine != theirs:
            raise ClapError(f"{where}: the source model's {name} is {theirs!r}, the target model's {mine!r}; "
                            f"cross-model patching needs the same architecture, sizes and tokenizer")


def check_same_tokens(probes: list[Probe], source_probes: list[Probe], where: str) -> None:
    """Refuse a source model whose tokenizer splits the probes (prompts or answers) differently: a position would
    then name different tokens in the two models."""
    for mine, theirs in zip(probes, source_probes, strict=True):
        for what in ("clean_ids", "corrupted_ids", "answer_ids", "wrong_ids"):
            if list(getattr(mine, what) or []) != list(getattr(theirs, what) or []):
                raise ClapError(f"{where}: the source model's tokenizer gives probe {mine.id} other "
                                f"{what.replace('_ids', '')} token ids than the target's; cross-model patching "
                                f"needs the same tokenizer")


def _few(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def check_distinct_prompts(probes: list[Probe], warn: bool = True) -> None:
    """Refuse a probe set none of whose probes can have a defined recovery, before any weights load.

    Why: recovery = (patched - corrupted) / (clean - corrupted). A probe whose clean and corrupted prompts are the
    same tokens has identical clean and corrupted runs (no patch touches the baseline rows), so its denominator is
    zero for every metric; if that holds for every probe the whole study would run only to report NaN. A set where
    only some probes are like that still runs (their rows are marked undefined), with a warning.
    """
    same = [p.id for p in probes if list(p.clean_ids) == list(p.corrupted_ids)]
    if same and len(same) == len(probes):
        raise ClapError(
            f"no probe can have a defined recovery: every probe's clean and corrupted prompts are the same tokens "
            f"({_few(same)}), so clean - corrupted = 0 for every metric; give corrupted prompts that differ"
        )
    if same and warn:
        log.warning("%d of %d probes have identical clean and corrupted prompts (%s): their recovery is undefined",
                    len(same), len(probes), _few(same))


class BaselineCheck:
    """Watches the baseline rows batch by batch and stops the study as soon as every probe has been seen and none
    has |clean - corrupted| > recovery_epsilon for any metric: such a study can only report NaN recovery."""

    def __init__(self, spec: StudySpec, n_probes: int):
        self.spec = spec
        self.n_probes = n_probes
        self.seen: set[str] = set()
        self.defined: set[str] = set()

    def update(self, frame: pd.DataFrame) -> None:
        self.seen.update(frame.probe_id.unique())
        # recovery's denominator: |clean - corrupted|, or across models |source model's run - target model's run|
        self.defined.update(frame.probe_id[frame.recovery_defined.astype(bool)].unique())
        if self.spec.ablates_clean_run:
            return  # the effect on the clean run is the measure; recovery is undefined by design
        if len(self.seen) == self.n_probes and not self.defined and self.spec.source_model is not None:
            raise ClapError(
                f"recovery is undefined for every probe: the source model's run of the source prompt and the target "
                f"model's run of the target prompt differ by at most recovery_epsilon "
                f"({self.spec.recovery_epsilon:g}) for every metric ({', '.join(self.spec.metrics)}) in "
                f"{_few(sorted(self.seen))}: the two models answer alike, so no patch can be measured between them"
            )
        if len(self.seen) == self.n_probes and not self.defined:
            raise ClapError(
                f"recovery is undefined for every probe: |clean - corrupted| <= recovery_epsilon "
                f"({self.spec.recovery_epsilon:g}) for every metric ({', '.join(self.spec.metrics)}) in "
                f"{_few(sorted(self.seen))}: the corrupted prompts do not move the answer scores, so no patch can "
                f"be measured against them; use corrupted prompts that change the answer"
            )

    def report(self) -> None:
        undefined = sorted(self.seen - self.defined)
        if undefined and not self.spec.ablates_clean_run:
            gap = "|source model - target model|" if self.spec.source_model is not None else "|clean - corrupted|"
            log.warning("%d of %d probes have undefined recovery for every metric (%s <= %g): %s",
                        len(undefined), len(self.seen), gap, self.spec.recovery_epsilon, _few(undefined))


