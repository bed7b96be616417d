"""Tidy rows: one row per (probe, site, position, operation, metric) from a batch's metrics.

Why a module of its own: this is where the numbers a forward pass returns become the results contract's columns
(``clap.contract``): each patched row is paired with its probe's clean and corrupted baseline rows of the same pass
(and noise sample), recovery is computed with its undefined denominators, trivial sites are flagged, tokens are
decoded, and cross-model runs carry the source model's baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from clap.contract import METRICS
from interventions.output import recovery
from interventions.plan import Batch, Cell, Plan
from interventions.probes import subject_range, token_group
from interventions.spec import StudySpec


@dataclass
class TidyRows:
    """Turns batches into tidy frames for one study (its spec, tokenizer and, for cross-model patching, the source
    model's baseline metrics per (probe, role))."""

    spec: StudySpec
    tokenizer: Any
    source_metrics: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def rows(self, plan: Plan, batch: Batch, cells: list[Cell], metrics: torch.Tensor) -> pd.DataFrame:
        spec = self.spec
        wanted = [METRICS.index(m) for m in spec.metrics]
        values = metrics.tolist()  # Python floats once: indexing a tensor per cell and metric costs microseconds each
        baseline = {}
        rows = zip(batch.row_probe, batch.row_role, batch.row_sample, strict=True)
        for row, (probe, role, sample) in enumerate(rows):
            if role in ("clean", "corrupted"):
                baseline[(probe, role, sample)] = values[row]
        subjects = {}
        if spec.trace is not None:
            for p_index in {c.probe for c in cells}:
                probe = plan.probes[p_index]
                subjects[p_index] = subject_range(probe, spec.trace.subject, "clean", plan.target, self.tokenizer)
        row_of = {cell_index: row for row, cell_index in enumerate(batch.row_cell) if cell_index >= 0}
        decoded: dict[int, str] = {}

        def text(token_id: int) -> str:  # one decode per token id and batch (a layer sweep repeats each token)
            if token_id not in decoded:
                decoded[token_id] = self.tokenizer.decode([token_id])
            return decoded[token_id]

        records = []
        for cell in cells:
            probe = plan.probes[cell.probe]
            target_ids = probe.prompt_ids(plan.target)
            patched = values[row_of[cell.index]]
            token = "".join(text(target_ids[i]) for i in cell.positions.indices)
            source_ids = plan.probes[cell.source_probe].prompt_ids(plan.source)
            source_token = "".join(text(source_ids[j]) for j in cell.source_indices if j >= 0)
            samples = {plan.target: plan.target_row_sample(cell.sample), plan.source: 0}
            group = None
            if cell.probe in subjects and cell.positions.position is not None:
                group = token_group(cell.positions.position, *subjects[cell.probe], len(target_ids))
            for m in wanted:
                name = METRICS[m]
                clean = baseline[(cell.probe, "clean", samples["clean"])][m]
                corrupted = baseline[(cell.probe, "corrupted", samples["corrupted"])][m]
                value = patched[m]
                cross = {}
                if self.source_metrics:  # 0 = the target model on the target prompt, 1 = the source model's run
                    cross = {f"source_model_{role}": float(self.source_metrics[(cell.probe, role)][m])
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
                        "trivial": is_trivial(cell, len(target_ids), cross_model=bool(self.source_metrics)),
                        "n_patched_tokens": len(cell.positions.indices),
                        "window": len(cell.all_sites),
                        "sample": cell.sample,
                        "effect": value - corrupted,
                        **({"token_group": group} if subjects else {}),
                    }
                )
        return pd.DataFrame.from_records(records)


def is_trivial(cell: Cell, n_target: int, cross_model: bool = False) -> bool:
    """The patched value equals the source run's by construction: the source activation replaces, at the answer
    position, a tensor the answer logits depend on alone (recovery 1 when denoising, 0 when noising; across models 1,
    the source model's value, in either direction).

    Across models only the unembedding's output qualifies: the final norm's or the last block's output still goes
    through the *target* model's final norm / unembedding, whose weights a fully fine-tuned source may not share."""
    terminal = (lambda site: site.kind == "unembed") if cross_model else (lambda site: site.terminal)
    return (
        any(terminal(site) for site in cell.all_sites)
        and cell.operation.name == "replace"
        and (n_target - 1) in cell.positions.indices
    )
