"""``Study``: spec -> plan -> batches -> tidy results, with progress and resumable output.

>>> study = Study.from_yaml("study.yaml")          # or Study(StudySpec(...), model=loaded_model)
>>> frame = study.run("results/")                 # results/results.parquet + results/run.json

Resuming: each finished batch is written to ``<out>/.partial/<plan fingerprint>/`` as it completes; a rerun of the
same spec skips those batches, so an interrupted study loses at most the batch in flight.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from clap.errors import ClapError
from interventions import execute
from interventions.models import LoadedModel, load_model, load_remote_model
from interventions.plan import (
    Cell,
    PatchConstants,
    Plan,
    build_batch,
    chunk_cells,
    compile_plan,
    left_pad,
    rows_for_budget,
)
from interventions.probes import Probe, check_alignment, check_context, load_probes
from interventions.results import package_versions, recovery, to_frame, write_results
from interventions.sites import Site, SiteResolver
from interventions.spec import StudySpec

log = logging.getLogger(__name__)


class Study:
    """A compiled, runnable patching study."""

    def __init__(self, spec: StudySpec, model: LoadedModel | None = None):
        self.spec = spec
        self._model = model

    @classmethod
    def from_yaml(cls, path: str | Path, model: LoadedModel | None = None) -> "Study":
        return cls(StudySpec.from_yaml(path), model=model)

    # -- compilation ----------------------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            m = self.spec.model
            if self.spec.execution.remote is True:
                self._model = load_remote_model(m.source, revision=m.revision, tokenizer=m.tokenizer)
                return self._model
            self._model = load_model(
                m.source,
                gguf_file=m.gguf_file,
                tokenizer=m.tokenizer,
                revision=m.revision,
                dtype=self.spec.execution.dtype,
                device=self.spec.execution.device,
            )
        return self._model

    def probes(self) -> list[Probe]:
        probes = load_probes(self.spec.probes, self.model.tokenizer, self.spec.base_dir)
        check_alignment(probes, self.spec.alignment)
        check_context(probes, self.model.hf.config)
        for metric in ("logit_diff",):
            if metric in self.spec.metrics:
                missing = [p.id for p in probes if not p.wrong_ids]
                if missing:
                    raise ClapError(
                        f"metric {metric} needs a `wrong` answer for every probe; missing for "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (or use metric `logit`/`prob`)"
                    )
        return probes

    def sites(self) -> list[Site]:
        """Every concrete site of the study, in forward-execution order."""
        return self.plan().sites

    def plan(self) -> Plan:
        resolver = SiteResolver(self.model.hf)
        groups = [(resolver.resolve(addresses), positions, ops) for addresses, positions, ops in self.spec.groups()]
        plan = compile_plan(self.spec, self.probes(), groups, self.model.tokenizer, resolver.order_key)
        identity = self.model.identity
        plan.model_key = f"{identity.get('architecture')}:{identity.get('weights_fingerprint')}"
        if plan.dropped:
            log.warning("%d cells not run: under right alignment none of their tokens has a source counterpart",
                        plan.dropped)
        return plan

    # -- execution ------------------------------------------------------------------------------------------
    def run(self, out_dir: str | Path | None = None) -> pd.DataFrame:
        """Run every cell in batched forward passes; write results to ``out_dir`` if given; return the frame."""
        spec = self.spec
        execute.check_remote(spec.execution.remote, spec.model.source)
        plan = self.plan()
        if not plan.cells:
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
        partial_dir = Path(out_dir) / ".partial" / plan.fingerprint if out_dir else None
        if partial_dir:
            partial_dir.mkdir(parents=True, exist_ok=True)
        pad_id = model.tokenizer.pad_token_id
        unembed = self._unembed_module()
        frames = []
        progress = tqdm(total=len(plan.cells), desc=f"patching {spec.name}", unit="cell", disable=not spec.execution.progress)
        for index, cells in enumerate(chunks):
            done = partial_dir / f"batch-{index:05d}.parquet" if partial_dir else None
            if done and done.is_file():
                frames.append(pd.read_parquet(done))
                progress.update(len(cells))
                continue
            batch = build_batch(plan, cells, index, pad_id, constants)
            metrics = execute.run_batch(model.nn, batch, remote=spec.execution.remote, unembed_module=unembed)
            frame = self._tidy(plan, batch, cells, metrics)
            if done:
                frame.to_parquet(done.with_suffix(".tmp"), index=False)
                done.with_suffix(".tmp").replace(done)
            frames.append(frame)
            progress.update(len(cells))
        progress.close()
        group_columns = sorted(plan.probes[0].labels)
        result = to_frame(pd.concat(frames, ignore_index=True), group_columns)
        if out_dir:
            write_results(Path(out_dir), result, self._sidecar(plan, group_columns, len(chunks), max_rows))
            shutil.rmtree(Path(out_dir) / ".partial", ignore_errors=True)
        return result

    def _unembed_module(self) -> str | None:
        from interventions.architectures import BY_MODEL_TYPE

        arch = BY_MODEL_TYPE.get(getattr(self.model.hf.config, "model_type", None))
        return arch.unembed if arch else None

    def _constants(self, plan: Plan) -> PatchConstants:
        """Widths of every site; probe-set means and the embedding std where an operation needs them."""
        model = self.model
        widths = {}
        probe_ids = plan.probes[0].clean_ids
        operations = self.spec.all_operations()
        needs_mean = any(op.name == "mean" for op in operations)
        needs_std = any(op.name == "noise" and op.relative_to == "embedding_std" for op in operations)
        keys = list(dict.fromkeys(site.access_key for site in plan.sites))
        from interventions.architectures import architecture_of

        extra_keys = []
        if needs_std:
            extra_keys = [(architecture_of(model.hf).embed, "output")]
        ids = torch.tensor([probe_ids])
        acts = execute.capture(model.nn, ids, torch.ones_like(ids), keys, remote=self.spec.execution.remote)
        shape = {key: act.shape[-1] for key, act in zip(keys, acts)}
        for site in plan.sites:
            width = shape[site.access_key]
            widths[site.name] = width // site.n_heads if site.kind == "head" else width
        constants = PatchConstants(widths=widths, seed=self.spec.seed)
        if needs_mean or needs_std:
            prompts = [p.prompt_ids(plan.source) for p in plan.probes]
            all_prompts = [p.prompt_ids(r) for p in plan.probes for r in ("clean", "corrupted")]
            if needs_mean:
                constants.means = self._means(plan, keys, prompts)
            if needs_std:
                embed = self._gather(extra_keys, all_prompts)[0]
                constants.embedding_std = float(torch.cat(embed).std())
        return constants

    def _gather(self, keys: list[tuple[str, str]], prompts: list[list[int]]) -> list[list[torch.Tensor]]:
        """Per key, per prompt, the unpadded [len, width] activation (one batched trace)."""
        ids, mask = left_pad(prompts, self.model.tokenizer.pad_token_id)
        width = ids.shape[1]
        acts = execute.capture(self.model.nn, ids, mask, keys, remote=self.spec.execution.remote)
        return [[act[row, width - len(p):] for row, p in enumerate(prompts)] for act in acts]

    def _means(self, plan: Plan, keys: list[tuple[str, str]], prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Mean source activation over the probe set per right-aligned position (offset from the end)."""
        gathered = dict(zip(keys, self._gather(keys, prompts)))
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
        wanted = [execute.METRICS.index(m) for m in spec.metrics]
        baseline = {}
        for row, (probe, role) in enumerate(zip(batch.row_probe, batch.row_role)):
            if role in ("clean", "corrupted"):
                baseline[(probe, role)] = metrics[row]
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
            for m in wanted:
                name = execute.METRICS[m]
                clean = float(baseline[(cell.probe, "clean")][m])
                corrupted = float(baseline[(cell.probe, "corrupted")][m])
                value = float(patched[m])
                rec, defined = recovery(clean, corrupted, value, spec.recovery_epsilon)
                records.append(
                    {
                        "probe_id": probe.id,
                        **probe.labels,
                        "site": cell.site.name,
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
                        "recovery": float(rec),
                        "recovery_defined": bool(defined),
                        "trivial": is_trivial(cell, len(target_ids)),
                        "n_patched_tokens": len(cell.positions.indices),
                    }
                )
        return pd.DataFrame.from_records(records)

    def _sidecar(self, plan: Plan, group_columns: list[str], n_batches: int, max_rows: int) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "model": self.model.identity,
            "versions": package_versions(),
            "seed": self.spec.seed,
            "group_columns": group_columns,
            "n_probes": len(plan.probes),
            "n_cells": len(plan.cells),
            "n_batches": n_batches,
            "max_rows": max_rows,
            "plan_fingerprint": plan.fingerprint,
            "probes": [
                {"probe_id": p.id, **p.labels, "clean": p.clean, "corrupted": p.corrupted,
                 "answer_ids": p.answer_ids, "wrong_ids": p.wrong_ids}
                for p in plan.probes
            ],
        }


def is_trivial(cell: Cell, n_target: int) -> bool:
    """The patched value equals the source run's by construction: the source activation replaces, at the answer
    position, a tensor the answer logits depend on alone (recovery 1 when denoising, 0 when noising)."""
    return (
        cell.site.terminal
        and cell.operation.name == "replace"
        and (n_target - 1) in cell.positions.indices
    )
