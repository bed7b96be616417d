"""``Study``: spec -> plan -> batches -> tidy results, with progress and resumable output.

>>> study = Study.from_yaml("study.yaml")          # or Study(StudySpec(...), model=loaded_model)
>>> frame = study.run("results/")                 # results/results.parquet + results/run.json

Resuming: each finished batch is written to ``<out>/.partial/<plan fingerprint>/`` as it completes; a rerun of the
same spec skips those batches, so an interrupted study loses at most the batch in flight. The plan fingerprint covers
every weight, so batches computed with other weights are never reused (the rerun says it starts afresh). The output
folder is locked for the run (``<out>/.clap.lock``), and a finished run removes only its own partial folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from clap.contract import METRICS, SAMPLES_FILE, atomic_write_frame
from clap.devices import resolve_device
from clap.errors import ClapError
from clap.locks import exclusive_lock
from clap.models import (
    BUILTIN_GGUF,
    LoadedModel,
    load_model,
    load_remote_model,
    prepare_tokenizer,
    resolve_source,
    weights_fingerprint,
)
from interventions import attribution, execute, operations
from interventions.executor import Executor
from interventions.plan import (
    Batch,
    Cell,
    GroupPlan,
    PatchConstants,
    Plan,
    build_batch,
    chunk_cells,
    compile_plan,
    left_pad,
    rows_for_budget,
)
from interventions.probes import Probe, check_alignment, check_context, load_probes, subject_range, token_group
from interventions.results import (
    average_samples,
    package_versions,
    prepare_output_dir,
    recovery,
    to_frame,
    write_results,
)
from interventions.sites import Site, SiteError, SiteResolver
from interventions.spec import ModelSpec, StudySpec

log = logging.getLogger(__name__)

#: held for the whole run so that two runs never write one output folder
LOCK_FILE = ".clap.lock"
#: in each partial folder: which plan content and weights its batches belong to
PLAN_FILE = "plan.json"


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

    def __init__(self, spec: StudySpec, model: LoadedModel | None = None, source_model: LoadedModel | None = None):
        if source_model is not None and spec.source_model is None:
            spec = spec.model_copy(update={"source_model": ModelSpec(source=source_model.identity.get("source")
                                                                     or "in-memory")})
            StudySpec.from_dict(spec.to_dict(), source="source_model=")  # the cross-model rules apply
        self.spec = spec
        self._model = model
        self._executor: Executor | None = None
        self._source = source_model
        self._source_metrics: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def from_yaml(cls, path: str | Path, model: LoadedModel | None = None,
                  source_model: LoadedModel | None = None) -> Study:
        return cls(StudySpec.from_yaml(path), model=model, source_model=source_model)

    # -- compilation ----------------------------------------------------------------------------------------
    def model_source(self, value: str | None = None) -> str | None:
        """``model.source`` (or ``value``, e.g. ``model.tokenizer``) with a relative path resolved like
        ``probes.file``: against the spec file's folder when something exists there, else as given (a hub id, a
        built-in name, or a path relative to the working directory)."""
        value = self.spec.model.source if value is None else value
        base = self.spec._base_dir
        if not value or value in BUILTIN_GGUF or base is None:
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return value
        candidate = base / path
        return str(candidate) if candidate.exists() else value

    def device(self) -> str:
        """``execution.device`` checked (type, availability, index) before anything is loaded onto it."""
        return resolve_device(self.spec.execution.device, where=self.spec.where(("execution", "device")))

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = self._load(self.spec.model)
        return self._model

    @property
    def executor(self) -> Executor:
        """Runs this study's traces: the model, the remote mode and the execution strategy (built on first use)."""
        if self._executor is None:
            execution = self.spec.execution
            self._executor = Executor(self.model.nn, remote=execution.remote, strategy=execution.strategy,
                                      unembed_module=self._unembed_module())
        return self._executor

    @property
    def source_model(self) -> LoadedModel | None:
        """The model whose runs supply the source activations (cross-model patching); None: the target model."""
        if self.spec.source_model is None:
            return None
        if self._source is None:
            self._source = self._load(self.spec.source_model)
        return self._source

    def _load(self, m: ModelSpec) -> LoadedModel:
        if self.spec.execution.remote is True:
            return load_remote_model(m.source, revision=m.revision, tokenizer=m.tokenizer)
        return load_model(
            self.model_source(m.source),
            gguf_file=m.gguf_file,
            tokenizer=self.model_source(m.tokenizer) if m.tokenizer else None,
            revision=m.revision,
            dtype=self.spec.execution.dtype,
            device=self.device(),
        )

    def probes(self, tokenizer: Any = None, warn: bool = True, config: Any = None) -> list[Probe]:
        """The spec's probes, tokenised and checked (alignment, context length, answers). ``tokenizer`` and
        ``config`` let the pre-load checks run on the tokenizer and the config alone, before any weights load."""
        probes = load_probes(self.spec.probes, tokenizer or self.model.tokenizer, self.spec.base_dir)
        if self.spec.corrupted_prompt == "clean":  # causal tracing: only the baseline interventions corrupt
            for probe in probes:
                probe.corrupted, probe.corrupted_ids = probe.clean, list(probe.clean_ids)
        check_alignment(probes, self.spec.alignment)
        check_context(probes, config if config is not None else self.model.hf.config)
        for metric in ("logit_diff",):
            if metric in self.spec.metrics:
                missing = [p.id for p in probes if not p.wrong_ids]
                if missing:
                    raise ClapError(
                        f"metric {metric} needs a `wrong` answer for every probe; missing for "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (or use metric `logit`/`prob`)"
                    )
        if not self.spec.baseline and self.spec.source_model is None:  # across models the models differ
            check_distinct_prompts(probes, warn)
        return probes

    def sites(self) -> list[Site]:
        """Every concrete site of the study, in forward-execution order."""
        return self.plan().sites

    def _resolve(self, resolver: SiteResolver, addresses: list[str], location: tuple) -> list[Site]:
        sites: dict[str, Site] = {}
        for i, address in enumerate(addresses):
            try:
                expanded = resolver.expand(address)
            except SiteError as exc:
                raise SiteError(f"{self.spec.where(location + (i,))}: {exc}") from None
            for site in expanded:
                sites.setdefault(site.name, site)
        return list(sites.values())

    def _site_groups(self, hf_model: torch.nn.Module) -> tuple[SiteResolver, list[list[Site]]]:
        """Resolve every patch group's addresses; an error names the spec file, line and field of the address."""
        resolver = SiteResolver(hf_model)
        groups = [self._resolve(resolver, addresses, location)
                  for location, (addresses, _, _) in zip(self._group_locations(), self.spec.groups(), strict=True)]
        for b, intervention in enumerate(self.spec.baseline or []):
            self._resolve(resolver, intervention.sites, ("baseline", b, "sites"))
        attribution.check_sites(self.spec, resolver)
        return resolver, groups

    def _group_locations(self) -> list[tuple]:
        return ([("sites",)] if self.spec.sites else []) + [
            ("patches", g, "sites") for g in range(len(self.spec.patches or []))]

    def _group_plans(self, resolver: SiteResolver, site_groups: list[list[Site]]) -> list[GroupPlan]:
        """Patch groups with windows and combinations resolved into the stack of sites each cell patches."""
        plans = []
        for location, sites, (_, positions, ops), (window, combine) in zip(
                self._group_locations(), site_groups, self.spec.groups(), self.spec.group_options(), strict=True):
            sites = sorted(sites, key=resolver.order_key)
            # `attribution` cells run on the gradient path (_attribution_rows), not in batches
            group = GroupPlan(sites, list(positions), [op for op in ops if not operations.get(op.name).approximate])
            if combine:
                group.sites = [sites[0]]
                group.stacks[sites[0].name] = tuple(sites)
                group.labels[sites[0].name] = "+".join(s.name for s in sites)
            elif window > 1:
                for site in sites:
                    if site.layer is None or site.kind not in ("resid_pre", "resid_post", "block_out", "attn_out",
                                                                "mlp_out"):
                        raise SiteError(f"{self.spec.where(location)}: a window stacks consecutive layers of one "
                                        f"component; {site.name} is not a layer's resid_pre / resid_post / block_out "
                                        f"/ attn_out / mlp_out")
                    low, high = max(0, site.layer - window // 2), min(resolver.n_layers, site.layer - (-window // 2))
                    group.stacks[site.name] = tuple(resolver.expand(f"layers[{low}:{high}].{site.kind}"))
                    group.labels[site.name] = f"{site.name}@w{window}"
            plans.append(group)
        return plans

    def _baseline(self, resolver: SiteResolver) -> list[tuple[list[Site], list, Any]]:
        return [(sorted(self._resolve(resolver, b.sites, ("baseline", i, "sites")), key=resolver.order_key),
                 b.positions, b.operation) for i, b in enumerate(self.spec.baseline or [])]

    def plan(self) -> Plan:
        resolver, site_groups = self._site_groups(self.model.hf)
        groups = self._group_plans(resolver, site_groups)
        plan = compile_plan(self.spec, self.probes(), groups, self.model.tokenizer, resolver.order_key,
                            baseline=self._baseline(resolver))
        identity = self.model.identity
        if identity.get("weights_fingerprint") is not None:  # in-memory weights may have changed since loading
            identity["weights_fingerprint"] = weights_fingerprint(self.model.hf, identity.get("location"))
        plan.model_key = f"{identity.get('architecture')}:{identity.get('weights_fingerprint')}"
        source = self.source_model
        if source is not None:  # resuming must never mix batches patched from other source weights
            check_compatible(self.model.hf.config, source.hf.config, self.spec.where(("source_model",)))
            check_same_tokens(plan.probes, self._source_probes(source.tokenizer), self.spec.where(("source_model",)))
            ident = source.identity
            if ident.get("weights_fingerprint") is not None:
                ident["weights_fingerprint"] = weights_fingerprint(source.hf, ident.get("location"))
            plan.model_key += f"|source:{ident.get('architecture')}:{ident.get('weights_fingerprint')}"
        if plan.dropped:
            log.warning("%d cells not run: none of their tokens is left to patch (right alignment, or an empty "
                        "token group)", plan.dropped)
        return plan

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
        self._site_groups(skeleton)
        self.probes(tokenizer, warn=False, config=config)  # the run warns once, with the loaded model's tokenizer
        if self.spec.source_model is not None:
            source = (self._source.hf.config, self._source.tokenizer) if self._source is not None else \
                self._config_and_tokenizer(self.spec.source_model)
            if source is not None:
                self._check_source(config, tokenizer, *source)

    def _config_and_tokenizer(self, m: ModelSpec) -> tuple[Any, Any] | None:
        """A model's config and tokenizer without its weights (None when they cannot be read that way: the loader
        then reports the problem with its own message)."""
        from transformers import AutoConfig, AutoTokenizer

        location, _ = resolve_source(self.model_source(m.source), gguf_file=m.gguf_file, revision=m.revision)
        try:
            config = AutoConfig.from_pretrained(location, revision=m.revision)
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(
                (self.model_source(m.tokenizer) if m.tokenizer else None) or location))
        except Exception as exc:  # noqa: BLE001 - the loader reports any such problem with its own message
            log.debug("pre-load checks skipped: %s", exc)
            return None
        return config, tokenizer

    def _check_source(self, config: Any, tokenizer: Any, source_config: Any, source_tokenizer: Any) -> None:
        where = self.spec.where(("source_model",))
        check_compatible(config, source_config, where)
        check_same_tokens(self._source_probes(tokenizer), self._source_probes(source_tokenizer), where)

    def _source_probes(self, tokenizer: Any) -> list[Probe]:
        probes = load_probes(self.spec.probes, tokenizer, self.spec.base_dir)
        if self.spec.corrupted_prompt == "clean":
            for probe in probes:
                probe.corrupted, probe.corrupted_ids = probe.clean, list(probe.clean_ids)
        return probes

    # -- execution ------------------------------------------------------------------------------------------
    def run(self, out_dir: str | Path | None = None) -> pd.DataFrame:
        """Run every cell in batched forward passes; write results to ``out_dir`` if given; return the frame.

        ``out_dir`` is checked (writable folder) and locked (``<out>/.clap.lock``) first, so a second run into the
        same folder stops at once, naming the run that holds it."""
        execute.check_remote(self.spec.execution.remote, self.spec.model.source)
        if self.spec.source_model is not None:
            execute.check_remote(self.spec.execution.remote, self.spec.source_model.source)
        if out_dir is None:
            self.check()
            return self._run(None)
        out = prepare_output_dir(Path(out_dir))
        with exclusive_lock(out / LOCK_FILE, wait=False, what=f"output folder {out}"):
            self.check()
            return self._run(out)

    def _run(self, out: Path | None) -> pd.DataFrame:
        spec = self.spec
        plan = self.plan()
        if not plan.cells and not attribution.named_groups(spec):
            raise ClapError(f"the study has no cells to run ({plan.dropped} dropped under right alignment)")
        model = self.model
        loaded_dtype = model.identity.get("dtype")
        if loaded_dtype and loaded_dtype != spec.execution.dtype:
            log.warning("the model was loaded as %s; execution.dtype %s applies only when clap loads the model",
                        loaded_dtype, spec.execution.dtype)
        constants = self._constants(plan)
        hf = model.hf
        max_len = max(max(len(p.clean_ids), len(p.corrupted_ids)) for p in plan.probes)
        config = hf.config
        max_rows = rows_for_budget(
            spec.execution.memory_budget_mb,
            spec.execution.max_rows,
            max_len,
            config.vocab_size,
            getattr(config, "hidden_size", 768),
            getattr(config, "num_hidden_layers", 12),
            torch.finfo(next(hf.parameters()).dtype).bits // 8,
        )
        chunks = chunk_cells(plan, max_rows)
        partial_dir = open_partial_dir(out, plan) if out else None
        pad_id = model.tokenizer.pad_token_id
        frames = []
        baselines = BaselineCheck(spec, len(plan.probes))
        progress = tqdm(total=len(plan.cells), desc=f"patching {spec.name}", unit="cell",
                        disable=not spec.execution.progress)
        for index, cells in enumerate(chunks):
            done = partial_dir / f"batch-{index:05d}.parquet" if partial_dir else None
            if done and done.is_file():
                frame = pd.read_parquet(done)
            else:
                batch = build_batch(plan, cells, index, pad_id, constants)
                metrics = self.executor.run_batch(batch)
                frame = self._tidy(plan, batch, cells, metrics)
                if done:
                    frame.to_parquet(done.with_suffix(".tmp"), index=False)
                    done.with_suffix(".tmp").replace(done)
            frames.append(frame)
            baselines.update(frame)
            progress.update(len(cells))
        progress.close()
        baselines.report()
        group_columns = sorted(plan.probes[0].labels)
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
            write_results(out, result, self._sidecar(plan, group_columns, len(chunks), max_rows, constants))
            shutil.rmtree(partial_dir, ignore_errors=True)  # only this plan's batches: others may resume later
            try:
                partial_dir.parent.rmdir()
            except OSError:
                pass  # other plans' partial batches remain
        return result

    def _attribution_rows(self, plan: Plan) -> pd.DataFrame | None:
        """The cells whose operation is ``attribution``: estimated by :mod:`interventions.attribution` (one forward and
        one backward pass per chunk of probes) on the plan's probes; None when no group names it."""
        return attribution.study_rows(self.spec, self.model, plan.probes)

    def _unembed_module(self) -> str | None:
        from clap.architectures import BY_MODEL_TYPE

        arch = BY_MODEL_TYPE.get(getattr(self.model.hf.config, "model_type", None))
        return arch.unembed if arch else None

    def _constants(self, plan: Plan) -> PatchConstants:
        """Widths of every site; the statistics passes the plan's operations need (:mod:`operations` ``needs``):
        probe-set means, embedding stds for noise, steering vectors."""
        from clap.architectures import architecture_of
        from interventions import operations

        model = self.model
        widths = {}
        probe_ids = plan.probes[0].clean_ids
        cell_ops = list({op.model_dump_json(): op for op in self.spec.all_operations()}.values())
        baseline_ops = [b.operation for b in self.spec.baseline or []]
        needs = set().union(*(operations.get(op.name).needs for op in cell_ops + baseline_ops))
        keys = list(dict.fromkeys(site.access_key for site in plan.sites))
        ids = torch.tensor([probe_ids])
        acts = self.executor.capture(ids, torch.ones_like(ids), keys)
        shape = {key: act.shape[-1] for key, act in zip(keys, acts, strict=True)}
        for site in plan.sites:
            width = shape[site.access_key]
            widths[site.name] = width // site.n_heads if site.kind == "head" else width
        constants = PatchConstants(widths=widths, seed=self.spec.seed)
        if "mean" in needs:
            constants.means = self._means(plan, keys, [p.prompt_ids(plan.source) for p in plan.probes])
        noise_ops = [op for op in cell_ops + baseline_ops if op.name == "noise"]
        if any(op.relative_to != "absolute" for op in noise_ops):
            embed_key = (architecture_of(model.hf).embed, "output")
            prompts = [p.prompt_ids(r) for p in plan.probes for r in ("clean", "corrupted")]
            embeddings = self._gather([embed_key], prompts)[0]
            if any(op.relative_to == "embedding_std" for op in noise_ops):
                constants.embedding_std = float(torch.cat(embeddings).std())
            if any(op.relative_to == "selected_std" for op in noise_ops):
                constants.selected_std = self._selected_std(plan, embeddings)
        if "vector" in needs:
            constants.vectors = self._vectors(plan, cell_ops + baseline_ops, widths)
        if self.source_model is not None:
            self._cross_model(plan, keys, shape, constants)
        return constants

    def _cross_model(self, plan: Plan, keys: list[tuple[str, str]], widths: dict[tuple[str, str], int],
                     constants: PatchConstants) -> None:
        """The source model's part of a cross-model study, before any batch: its activations on every probe's source
        prompt at every patched module access (``replace`` / ``interpolate`` compile to them), and its own metrics
        on both prompts (``source_model_clean`` / ``_corrupted``: the recovery's 1)."""
        source = self.source_model
        assert source is not None
        step = max(2, self.spec.execution.max_rows or 64)
        prompts = [p.prompt_ids(plan.source) for p in plan.probes]
        acts: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in keys}
        for start in range(0, len(prompts), step):
            for key, per in zip(keys, self._gather(keys, prompts[start:start + step], source), strict=True):
                acts[key] += per
        for key in keys:
            if acts[key][0].shape[-1] != widths[key]:
                raise ClapError(f"{self.spec.where(('source_model',))}: {key[0]} ({key[1]}) is "
                                f"{acts[key][0].shape[-1]} wide in the source model but {widths[key]} in the target")
        constants.source_acts = acts
        rows = [(p, role) for p in range(len(plan.probes)) for role in ("clean", "corrupted")]
        metrics: dict[tuple[int, str], torch.Tensor] = {}
        unembed = self._unembed_module()
        for start in range(0, len(rows), step - step % 2):
            chunk = rows[start:start + step - step % 2]
            batch = baseline_batch(plan, chunk, source.tokenizer.pad_token_id)
            values = execute.run_batch(source.nn, batch, remote=self.spec.execution.remote, unembed_module=unembed)
            metrics.update({row: values[i] for i, row in enumerate(chunk)})
        self._source_metrics = metrics

    def _selected_std(self, plan: Plan, embeddings: list[torch.Tensor]) -> float:
        """Std (over all elements) of the token embeddings of the tokens that ``selected_std`` noise acts on, over
        the probe set (each probe's target prompt once): ROME's noise unit over the subjects' tokens."""
        rows = []
        for p_index in range(len(plan.probes)):
            target = embeddings[2 * p_index + (0 if plan.target == "clean" else 1)]
            chosen = set()
            for edit in plan.baseline.get(p_index, ()):
                if edit.operation.name == "noise" and edit.operation.relative_to == "selected_std":
                    chosen.update(edit.indices)
            for cell in plan.cells:
                if cell.probe == p_index and cell.operation.name == "noise" and \
                        cell.operation.relative_to == "selected_std":
                    chosen.update(cell.positions.indices)
            rows += [target[i] for i in sorted(chosen)]
        if not rows:
            raise ClapError("noise relative_to: selected_std selects no token in any probe")
        return float(torch.stack(rows).std())

    def _vectors(self, plan: Plan, ops: list, widths: dict[str, int]) -> dict[tuple[str, str], torch.Tensor]:
        """Steering vectors per (operation, site): from a .pt/.npy file, or the mean difference of the last-token
        activations of two prompt sets at the site (one statistics pass per set)."""
        tokenizer = self.model.tokenizer
        out = {}
        for op in ops:
            if op.name != "steer":
                continue
            key = op.model_dump_json()
            if op.vector is not None:
                vector = load_vector(op.vector, self.spec.base_dir).reshape(-1)
                for site in plan.sites:
                    if vector.numel() != widths[site.name]:
                        raise ClapError(f"steering vector {op.vector}: {vector.numel()} values, but site {site.name} "
                                        f"is {widths[site.name]} wide")
                    out[(key, site.name)] = vector
                continue
            sets = [[tokenizer(t)["input_ids"] for t in prompts] for prompts in (op.vector_from.plus,
                                                                                op.vector_from.minus)]
            site_keys = list(dict.fromkeys(site.access_key for site in plan.sites))
            means = []
            for prompts in sets:
                acts = self._gather(site_keys, prompts)
                means.append({k: torch.stack([a[-1] for a in per]).double().mean(0)
                              for k, per in zip(site_keys, acts, strict=True)})
            for site in plan.sites:
                diff = (means[0][site.access_key] - means[1][site.access_key]).float()
                if site.kind == "head":
                    diff = diff.view(site.n_heads, -1)[site.head]
                out[(key, site.name)] = diff
        return out

    def _gather(self, keys: list[tuple[str, str]], prompts: list[list[int]],
                model: LoadedModel | None = None) -> list[list[torch.Tensor]]:
        """Per key, per prompt, the unpadded [len, width] activation (one batched trace) of ``model`` (default: the
        target model)."""
        model = model or self.model
        ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
        width = ids.shape[1]
        if model is self.model:
            acts = self.executor.capture(ids, mask, keys)
        else:  # the source model of a cross-model study: always a full capture
            acts = Executor(model.nn, remote=self.spec.execution.remote, strategy="full").capture(ids, mask, keys)
        return [[act[row, width - len(p):] for row, p in enumerate(prompts)] for act in acts]

    def _means(self, plan: Plan, keys: list[tuple[str, str]], prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Mean source activation over the probe set per right-aligned position (offset from the end)."""
        gathered = dict(zip(keys, self._gather(keys, prompts), strict=True))
        longest = max(len(p) for p in prompts)
        means = {}
        for site in plan.sites:
            per_prompt = gathered[site.access_key]
            total = torch.zeros(longest, per_prompt[0].shape[-1])
            count = torch.zeros(longest, 1)
            for act in per_prompt:
                flipped = act.flip(0).float()  # row k = offset k+1 from the end
                total[: len(act)] += flipped
                count[: len(act)] += 1
            table = total / count.clamp(min=1)
            if site.kind == "head":
                table = table.view(longest, site.n_heads, -1)[:, site.head]
            means[site.name] = table
        return means

    def _tidy(self, plan: Plan, batch, cells: list[Cell], metrics: torch.Tensor) -> pd.DataFrame:
        spec = self.spec
        wanted = [METRICS.index(m) for m in spec.metrics]
        baseline = {}
        rows = zip(batch.row_probe, batch.row_role, batch.row_sample, strict=True)
        for row, (probe, role, sample) in enumerate(rows):
            if role in ("clean", "corrupted"):
                baseline[(probe, role, sample)] = metrics[row]
        subjects = {}
        if spec.trace is not None:
            for p_index in {c.probe for c in cells}:
                probe = plan.probes[p_index]
                subjects[p_index] = subject_range(probe, spec.trace.subject, "clean", plan.target, self.model.tokenizer)
        row_of = {cell_index: row for row, cell_index in enumerate(batch.row_cell) if cell_index >= 0}
        tokenizer = self.model.tokenizer
        records = []
        for cell in cells:
            probe = plan.probes[cell.probe]
            target_ids = probe.prompt_ids(plan.target)
            patched = metrics[row_of[cell.index]]
            token = "".join(tokenizer.decode([target_ids[i]]) for i in cell.positions.indices)
            source_ids = plan.probes[cell.source_probe].prompt_ids(plan.source)
            source_token = "".join(tokenizer.decode([source_ids[j]]) for j in cell.source_indices if j >= 0)
            samples = {plan.target: plan.target_row_sample(cell.sample), plan.source: 0}
            group = None
            if cell.probe in subjects and cell.positions.position is not None:
                group = token_group(cell.positions.position, *subjects[cell.probe], len(target_ids))
            for m in wanted:
                name = METRICS[m]
                clean = float(baseline[(cell.probe, "clean", samples["clean"])][m])
                corrupted = float(baseline[(cell.probe, "corrupted", samples["corrupted"])][m])
                value = float(patched[m])
                cross = {}
                if self._source_metrics:  # 0 = the target model on the target prompt, 1 = the source model's run
                    cross = {f"source_model_{role}": float(self._source_metrics[(cell.probe, role)][m])
                             for role in ("clean", "corrupted")}
                    start = clean if plan.target == "clean" else corrupted
                    rec, defined = recovery(cross[f"source_model_{plan.source}"], start, value, spec.recovery_epsilon)
                    if name == "kl":  # each model's KL is to its own clean run: no common scale to recover along
                        rec, defined = float("nan"), False
                else:
                    rec, defined = recovery(clean, corrupted, value, spec.recovery_epsilon)
                records.append(
                    {
                        "probe_id": probe.id,
                        **probe.labels,
                        "site": cell.name,
                        "site_kind": cell.site.kind,
                        "module": cell.site.module,
                        "layer": cell.site.layer,
                        "head": cell.site.head,
                        "position": cell.positions.position,
                        "positions": cell.positions.label,
                        "token": token,
                        "source_token": source_token,
                        "operation": cell.operation.label,
                        "direction": spec.direction,
                        "metric": name,
                        "clean": clean,
                        "corrupted": corrupted,
                        "patched": value,
                        **cross,
                        "recovery": float(rec),
                        "recovery_defined": bool(defined),
                        "trivial": is_trivial(cell, len(target_ids)),
                        "n_patched_tokens": len(cell.positions.indices),
                        "window": len(cell.all_sites),
                        "sample": cell.sample,
                        "effect": value - corrupted,
                        **({"token_group": group} if subjects else {}),
                    }
                )
        return pd.DataFrame.from_records(records)

    def _sidecar(self, plan: Plan, group_columns: list[str], n_batches: int, max_rows: int,
                 constants: PatchConstants) -> dict[str, Any]:
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
            "strategy": self.executor.strategy_used,
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


def baseline_batch(plan: Plan, rows: list[tuple[int, str]], pad_id: int) -> Batch:
    """An unpatched batch of (probe, prompt role) rows: a model's own metrics on the probes' prompts (the source
    model's baselines in cross-model patching). KL is to the same model's clean row where the batch holds it."""
    prompts = [plan.probes[p].prompt_ids(role) for p, role in rows]
    input_ids, attention_mask = left_pad(prompts, pad_id)
    position = {row: i for i, row in enumerate(rows)}
    clean_row = torch.tensor([position.get((p, "clean"), i) for i, (p, _) in enumerate(rows)], dtype=torch.long)

    def sets(which: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(getattr(plan.probes[p], which)) for p, _ in rows))
        index = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (p, _) in enumerate(rows):
            ids = getattr(plan.probes[p], which)
            index[i, :len(ids)] = torch.tensor(ids, dtype=torch.long) if ids else index[i, :0]
            mask[i, :len(ids)] = 1.0
        return index, mask

    answer_index, answer_mask = sets("answer_ids")
    wrong_index, wrong_mask = sets("wrong_ids")
    return Batch(index=-1, input_ids=input_ids, attention_mask=attention_mask, row_probe=[p for p, _ in rows],
                 row_role=[role for _, role in rows], row_cell=[-1] * len(rows), clean_row=clean_row,
                 answer_index=answer_index, answer_mask=answer_mask, wrong_index=wrong_index, wrong_mask=wrong_mask,
                 accesses=[], cells=[])


def load_vector(path: str, base_dir: Path) -> torch.Tensor:
    """A steering vector from a ``.pt`` (a tensor) or ``.npy`` file; a relative path is taken from the spec's
    folder."""
    file = Path(path)
    if not file.is_absolute():
        file = base_dir / file
    if not file.is_file():
        raise ClapError(f"steering vector file {file} does not exist")
    if file.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(file)).float()
    if file.suffix == ".pt":
        value = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise ClapError(f"steering vector file {file} holds a {type(value).__name__}, not a tensor")
        return value.float()
    raise ClapError(f"steering vector file {file}: use a .pt or .npy file")


def is_trivial(cell: Cell, n_target: int) -> bool:
    """The patched value equals the source run's by construction: the source activation replaces, at the answer
    position, a tensor the answer logits depend on alone (recovery 1 when denoising, 0 when noising)."""
    return (
        any(site.terminal for site in cell.all_sites)
        and cell.operation.name == "replace"
        and (n_target - 1) in cell.positions.indices
    )


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
        if undefined:
            gap = "|source model - target model|" if self.spec.source_model is not None else "|clean - corrupted|"
            log.warning("%d of %d probes have undefined recovery for every metric (%s <= %g): %s",
                        len(undefined), len(self.seen), gap, self.spec.recovery_epsilon, _few(undefined))


def open_partial_dir(out: Path, plan: Plan) -> Path:
    """``<out>/.partial/<plan fingerprint>/`` (created), saying when other partial batches there are not reused.

    Each partial folder records its plan's content key and weights key, so a rerun after the weights changed
    (same spec, different fingerprint) says plainly that it starts afresh instead of silently ignoring them."""
    root = out / ".partial"
    partial = root / plan.fingerprint
    for other in sorted(root.glob("*")) if root.is_dir() else []:
        if other == partial or not other.is_dir():
            continue
        n = len(list(other.glob("batch-*.parquet")))
        if not n:
            continue
        try:
            meta = json.loads((other / PLAN_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("content_key") == plan.content_key:
            log.warning("%s holds %d finished batches of this study computed with different weights (%s, now %s); "
                        "they are not reused: starting afresh", other, n, meta.get("model_key"), plan.model_key)
        else:
            log.warning("%s holds %d finished batches of a different spec, probe set or batching; they are not "
                        "reused (this run's batches go to %s)", other, n, partial)
    partial.mkdir(parents=True, exist_ok=True)
    meta_file = partial / PLAN_FILE
    if not meta_file.is_file():
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"content_key": plan.content_key, "model_key": plan.model_key}))
        tmp.replace(meta_file)
    return partial
