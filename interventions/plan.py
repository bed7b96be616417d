"""Compile a spec into a plan of patch cells and pack the cells into batched forward passes.

Data flow: ``StudySpec`` + probes + sites -> ``Plan`` (one :class:`Cell` per probe x site x position x operation)
-> ``Batch`` es. A batch is one forward pass: for every probe it touches, a clean and a corrupted baseline row,
then one row per patched cell (the target prompt again), plus source rows of other probes for ``resample``. All
patches are described as index tensors per module access, so the forward pass applies them without a Python loop
per cell and the batch can be shipped to NDIF as plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from clap.errors import ClapError
from interventions import kernel, operations
from interventions.alignment import aligned_pairs, column, left_pad
from interventions.kernel import Edits
from interventions.measurements import Measurements
from interventions.probes import PositionCell, Probe, resolve_positions
from interventions.sites import Site
from interventions.spec import OperationSpec, StudySpec


class PlanError(ClapError):
    pass


@dataclass(frozen=True)
class Cell:
    """One patched forward row: which probe, where, which tokens, what operation (and which noise sample).

    A cell may apply its operation at several sites together (``sites``: a window of consecutive layers, or a
    combined group), in forward order; ``site`` is the one it is reported under (a window's centre layer)."""

    index: int
    probe: int  #: index into the probe list
    site: Site
    positions: PositionCell
    operation: OperationSpec
    source_probe: int  #: the probe whose source run supplies the activation (another probe for resample)
    source_indices: tuple[int, ...]  #: source-prompt token indices matched to ``positions.indices``
    sites: tuple[Site, ...] = ()  #: every site the cell patches (empty: just ``site``)
    sample: int = 0  #: which noise draw (0 .. samples - 1)
    site_label: str = ""  #: the reported site name (``site.name``, a window ``layers.3.mlp_out@w10``, a combination)

    @property
    def all_sites(self) -> tuple[Site, ...]:
        return self.sites or (self.site,)

    @property
    def name(self) -> str:
        return self.site_label or self.site.name


@dataclass(frozen=True)
class BaselineEdit:
    """A baseline intervention resolved for one probe: the target-prompt tokens it acts on at each site."""

    sites: tuple[Site, ...]
    indices: tuple[int, ...]
    operation: OperationSpec


@dataclass
class GroupPlan:
    """A patch group with its sites resolved: ``stacks`` maps a reported site to every site its cell patches."""

    sites: list[Site]
    positions: list[Any]
    operations: list[OperationSpec]
    stacks: dict[str, tuple[Site, ...]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    probes: frozenset[str] | None = None  #: the probe ids the group's cells are made for (None: every probe)


@dataclass
class Plan:
    spec: StudySpec
    probes: list[Probe]
    sites: list[Site]
    cells: list[Cell]
    target: str  #: prompt that receives patches: "corrupted" (denoising) or "clean" (noising)
    source: str
    model_key: str = ""  #: identifies the weights (architecture + weight fingerprint), set by the caller
    dropped: int = 0  #: cells with no token left to patch under right alignment (not run, not reported)
    baseline: dict[int, list[BaselineEdit]] = field(default_factory=dict)  #: per probe index
    #: target baseline rows per probe: one per noise sample when a baseline intervention draws noise, else one
    target_samples: int = 1
    #: rows per forward pass the cells were chunked with (0: not chunked yet); part of the fingerprint, since
    #: finished batches are only reusable under the same chunking
    rows_per_batch: int = 0
    #: most baseline rows per batch the cells were chunked with (0: no cap beyond ``rows_per_batch``); part of the
    #: fingerprint for the same reason
    baseline_rows_per_batch: int = 0

    def target_row_sample(self, sample: int) -> int:
        return sample if self.target_samples > 1 else 0

    @property
    def fingerprint(self) -> str:
        """Identifies the plan for resuming: same spec, probes, weights and batching -> same fingerprint.

        Settings that cannot change a number beyond float rounding (progress bars; local vs simulated-remote
        execution; the execution strategy) are left out, so a rerun with ``--no-progress`` still resumes; the rows
        per batch the cells were chunked with are in, since a batch is only reusable under the same chunking. So
        when they change the rows per batch (``auto`` is ``suffix`` locally, with :data:`DEFAULT_ROWS` rows by
        default, and ``full`` under the NDIF simulation, with fewer), a rerun starts afresh (and says so); so do
        folders of finished batches written before the rows per batch were part of the fingerprint."""
        return self._digest(with_model=True)

    @property
    def content_key(self) -> str:
        """The fingerprint without the weights: equal content keys with different fingerprints mean the same study
        was run on changed weights (which a rerun reports rather than resuming)."""
        return self._digest(with_model=False)

    def _digest(self, with_model: bool) -> str:
        spec = self.spec.to_dict()
        spec["execution"] = {k: v for k, v in spec["execution"].items()
                             if k not in ("progress", "remote", "strategy", "max_cells")}
        payload = json.dumps(
            {
                "spec": spec,
                "model": self.model_key if with_model else None,
                "probes": [(p.id, p.clean_ids, p.corrupted_ids, p.answer_ids, p.wrong_ids) for p in self.probes],
                "cells": len(self.cells),
                "rows_per_batch": self.rows_per_batch,
                # only when capped: a plan chunked without a cap keeps the fingerprint it had before the cap existed
                **({"baseline_rows_per_batch": self.baseline_rows_per_batch} if self.baseline_rows_per_batch else {}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def directions(direction: str) -> tuple[str, str]:
    """(target prompt, source prompt): denoising patches clean into corrupted, noising corrupted into clean."""
    if direction not in ("denoising", "noising"):
        raise PlanError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    return ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")


def resample_sources(n_probes: int, seed: int) -> list[int]:
    """A seeded derangement: each probe draws its resampled activation from a different probe."""
    if n_probes < 2:
        raise PlanError("operation `resample` needs at least two probes (it takes activations from another probe)")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n_probes, generator=generator).tolist()
        if all(i != j for i, j in enumerate(perm)):
            return perm


def _as_group(group: Any) -> GroupPlan:
    return group if isinstance(group, GroupPlan) else GroupPlan(list(group[0]), list(group[1]), list(group[2]))


#: Memory a plan takes per cell while it is compiled and run: the ``Cell`` with its de-duplication key, then its
#: row of the tidy results and the copies the concatenation of batches makes (traced on a tiny GPT-2 plan with
#: ``each`` position: about 0.6 KB while compiling and 0.9 KB more while running), rounded up.
BYTES_PER_CELL = 2048


@dataclass(frozen=True)
class PlanEstimate:
    """An upper bound on a plan's size from counts alone (no cell is built): cells, result rows, memory."""

    cells: int
    rows: int  #: forward-pass rows: one per cell plus each probe's clean and corrupted baselines (per noise draw)
    bytes: int

    def describe(self) -> str:
        return (f"{self.cells:,} cells ({self.rows:,} forward-pass rows), about {self.bytes / 2**30:,.1f} GB "
                "of memory for the plan and its results")


def estimate_plan(spec: StudySpec, probes: Sequence[Probe], groups: Sequence[Any],
                  baseline: Sequence[tuple[Sequence[Site], Sequence[Any], OperationSpec]] = ()) -> PlanEstimate:
    """What :func:`compile_plan` would build, counted instead of built: per probe and group, sites x positions
    (``each``: one per token of the target prompt; any other selector: one) x operations x noise draws. Cells that
    compiling would merge or drop are counted, so this is an upper bound."""
    groups = [_as_group(g) for g in groups]
    target, _ = directions(spec.direction)
    baseline_noise = any(op.name == "noise" for _, _, op in baseline) or any(
        b.operation.name == "noise" for b in spec.baseline or [])
    target_samples = spec.samples if baseline_noise else 1
    cells = 0
    for probe in probes:
        n_target = len(probe.prompt_ids(target))
        for group in groups:
            if group.probes is not None and probe.id not in group.probes:
                continue  # a per-probe group (e.g. the additivity run's top-m sets): compile_plan skips it too
            positions = sum(n_target if sel == "each" else 1 for sel in group.positions)
            per_site = sum(spec.samples if (baseline_noise or op.name == "noise") else 1 for op in group.operations)
            cells += len(group.sites) * positions * per_site
    rows = cells + len(probes) * (1 + target_samples)
    return PlanEstimate(cells=cells, rows=rows, bytes=cells * BYTES_PER_CELL)


def check_plan_size(estimate: PlanEstimate, max_cells: int | None, where: str = "execution.max_cells") -> None:
    """Refuse a plan larger than ``max_cells`` (None: no limit) before any cell is built, naming the estimate and
    how to run it anyway: a runaway design (every position x every operation x 100k probes) would otherwise fill
    the memory for minutes and end in a MemoryError."""
    if max_cells is None or estimate.cells <= max_cells:
        return
    raise PlanError(f"the study would run {estimate.describe()}, more than {where} ({max_cells:,}); narrow it "
                    f"(fewer probes, sites, positions such as `each`, operations or noise samples), split it into "
                    f"several studies, or raise the limit: `execution: {{max_cells: {estimate.cells}}}` "
                    "(null: no limit)")


def compile_plan(
    spec: StudySpec,
    probes: Sequence[Probe],
    groups: Sequence[Any],
    tokenizer: Any,
    site_order: Callable[[Site], Any],
    baseline: Sequence[tuple[Sequence[Site], Sequence[Any], OperationSpec]] = (),
) -> Plan:
    """One cell per probe x (site, position, operation) of every patch group (x noise sample); duplicates across
    groups merge. ``groups`` are :class:`GroupPlan` s or (sites, positions, operations) tuples; ``baseline`` the
    resolved baseline interventions (sites, position selectors, operation)."""
    groups = [_as_group(g) for g in groups]
    check_plan_size(estimate_plan(spec, probes, groups, baseline), spec.execution.max_cells)
    target, source = directions(spec.direction)
    needs_resample = any(op.name == "resample" for g in groups for op in g.operations)
    resample = resample_sources(len(probes), spec.seed) if needs_resample else None
    baseline_noise = any(op.name == "noise" for _, _, op in baseline)
    cells: list[Cell] = []
    seen: set[tuple] = set()
    dropped = 0
    plan_baseline: dict[int, list[BaselineEdit]] = {}
    for p_index, probe in enumerate(probes):
        n_target = len(probe.prompt_ids(target))
        edits = []
        for sites, selectors, op in baseline:
            indices = sorted({i for sel in selectors for pc in resolve_positions(sel, probe, target, source, tokenizer)
                              for i in pc.indices})
            edits.append(BaselineEdit(tuple(sites), tuple(indices), op))
        plan_baseline[p_index] = edits
        for group in groups:
            if group.probes is not None and probe.id not in group.probes:
                continue
            position_cells = [pc for sel in group.positions
                              for pc in resolve_positions(sel, probe, target, source, tokenizer)]
            for site in group.sites:
                for pc in position_cells:
                    if pc.label != "none" and not pc.indices:
                        dropped += 1  # e.g. the middle tokens of a one-token subject: nothing to patch
                        continue
                    for op in group.operations:
                        label = group.labels.get(site.name, "")
                        key = (p_index, label or site.name, pc.label, pc.indices, op.label)
                        if key in seen:
                            continue
                        seen.add(key)
                        n_samples = spec.samples if (baseline_noise or op.name == "noise") else 1
                        for sample in range(n_samples):
                            cell = _cell(len(cells), p_index, probe, probes, site, pc, op, resample, spec, target,
                                         source, n_target)
                            if pc.indices and not cell.positions.indices:
                                dropped += 1  # right alignment: none of these tokens has a source counterpart
                                break
                            stack = group.stacks.get(site.name, ())
                            cells.append(replace(cell, sites=stack, sample=sample, site_label=label))
    all_sites = {s.name: s for g in groups for site in g.sites for s in (g.stacks.get(site.name) or (site,))}
    all_sites.update({s.name: s for sites, _, _ in baseline for s in sites})
    ordered = sorted(all_sites.values(), key=site_order)
    return Plan(spec=spec, probes=list(probes), sites=ordered, cells=cells, target=target, source=source,
                dropped=dropped, baseline=plan_baseline, target_samples=spec.samples if baseline_noise else 1)


def _cell(index, p_index, probe, probes, site, pc, op, resample, spec, target, source, n_target) -> Cell:
    src_probe = resample[p_index] if op.name == "resample" else p_index
    n_source = len(probes[src_probe].prompt_ids(source))
    copies = operations.get(op.name).copies_source
    if n_source != n_target and spec.alignment == "strict" and copies:
        raise PlanError(
            f"resample: probe {probe.id} ({n_target} tokens) would take activations from probe "
            f"{probes[src_probe].id} ({n_source} tokens); use same-length probes or `alignment: right`"
        )
    # right alignment (interventions.alignment). Only operations that copy a source activation need a
    # counterpart; zero/mean/noise act on every selected target token.
    pairs = aligned_pairs(pc.indices, n_target, n_source, keep_unmatched=not copies)
    kept_indices = tuple(i for i, _ in pairs)
    position = pc.position if pc.position in kept_indices else None
    kept = PositionCell(pc.label, position, kept_indices)
    return Cell(
        index=index,
        probe=p_index,
        site=site,
        positions=kept,
        operation=op,
        source_probe=src_probe,
        source_indices=tuple(j for _, j in pairs),  # negative: no source counterpart (zero/mean/noise only)
    )


# ---------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class PatchGroups:
    """The edits of one shape (whole width or per head) at one module access, one :class:`~interventions.kernel.Edits`
    per mode or None (:mod:`interventions.kernel` says what each mode does)."""

    copy: Edits | None = None
    set: Edits | None = None
    add: Edits | None = None
    mix: Edits | None = None

    def __bool__(self) -> bool:
        return any(e is not None for e in self.as_tuple())

    def as_tuple(self) -> tuple[Edits | None, Edits | None, Edits | None, Edits | None]:
        return (self.copy, self.set, self.add, self.mix)


@dataclass
class AccessPatches:
    """Every patch applied at one module access (e.g. ``transformer.h.3.attn.c_proj`` input) in one batch.

    Row/column tensors address the padded batch. Whole-width patches and per-head patches are kept apart: per-head
    patches address the access viewed as ``[rows, cols, n_heads, head_dim]``, so a head site and a raw-module site
    on the same tensor can share one batch. ``stages`` hold (full, heads) groups applied one after the other: the
    baseline interventions first, then the cells' own (a restore at a noised token overwrites the noise).
    """

    module: str
    access: str
    n_heads: int | None = None
    stages: list[tuple[PatchGroups, PatchGroups]] = field(default_factory=list)
    #: the stage number of each entry of ``stages`` (0: baseline interventions, 1: the cells' own edits)
    stage_ids: list[int] = field(default_factory=list)

    @property
    def full(self) -> PatchGroups:
        return self.stages[-1][0]

    @property
    def heads(self) -> PatchGroups:
        return self.stages[-1][1]


@dataclass
class Batch:
    """One forward pass worth of rows."""

    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_probe: list[int]  #: probe index per row
    row_role: list[str]  #: "clean", "corrupted", "patched", "extra"
    row_cell: list[int]  #: cell index per patched row, -1 otherwise
    clean_row: torch.Tensor  #: per row, the row holding its probe's clean run (for KL)
    answer_index: torch.Tensor  #: [rows, k] answer token ids (padded with 0)
    answer_mask: torch.Tensor  #: [rows, k] 1 where the id is real
    wrong_index: torch.Tensor
    wrong_mask: torch.Tensor
    accesses: list[AccessPatches]
    cells: list[int]
    row_sample: list[int] = field(default_factory=list)  #: noise sample per row (0 where there is none)
    #: per row, the row holding its target baseline run (same probe, same noise sample; itself for a baseline row):
    #: a patched row equals that row up to its cell's first edit (what the suffix strategy builds on)
    target_row: list[int] = field(default_factory=list)


def chunk_cells(plan: Plan, max_rows: int, max_baseline_rows: int = 0,
                cells: Sequence[Cell] | None = None) -> list[list[Cell]]:
    """Split cells (``cells``, else the plan's) into batches of at most ``max_rows`` rows, counting the baseline
    rows each probe needs (its source row and one target row, or one per noise sample when a baseline intervention
    draws noise), and, with ``max_baseline_rows``, of at most that many baseline rows (a batch with few cells per
    probe would otherwise be mostly baseline rows; a cell that needs more alone still gets a batch of its own)."""
    per_probe = 1 + plan.target_samples
    if max_rows < per_probe + 1:
        raise PlanError(f"max_rows must be at least {per_probe + 1} ({per_probe} baseline rows per probe with "
                        f"{plan.target_samples} noise samples, and one patched row)")
    if max_rows < 3:
        raise PlanError("max_rows must be at least 3 (clean, corrupted and one patched row)")
    if max_rows < 5 and any(c.source_probe != c.probe for c in plan.cells):
        raise PlanError("max_rows must be at least 5 for `resample` (two probes' baselines and one patched row)")
    chunks: list[list[Cell]] = []
    current: list[Cell] = []
    probes_in: set[int] = set()
    rows = 0
    for cell in sorted(plan.cells if cells is None else cells, key=lambda c: (c.probe, c.index)):
        needed = {cell.probe, cell.source_probe} - probes_in
        extra = per_probe * len(needed) + 1
        over_baseline = max_baseline_rows and per_probe * len(probes_in | needed) > max_baseline_rows
        if current and (rows + extra > max_rows or over_baseline):
            chunks.append(current)
            current, probes_in, rows = [], set(), 0
            needed = {cell.probe, cell.source_probe}
            extra = per_probe * len(needed) + 1
        current.append(cell)
        probes_in |= needed
        rows += extra
    if current:
        chunks.append(current)
    return chunks


def build_batch(
    plan: Plan,
    cells: Sequence[Cell],
    index: int,
    pad_id: int,
    constants: Measurements,
) -> Batch:
    """Lay out rows (left-padded) and compile every edit into index tensors at its module access.

    Rows: per probe its source baseline row and its target baseline row(s) (one per noise sample when a baseline
    intervention draws noise), then one row per cell. The target baseline rows and every patched row get the
    probe's baseline interventions (stage 0); each patched row then gets its cell's operation at each of its sites
    (stage 1). Operations compile through :mod:`interventions.operations`."""
    probe_order = _probe_order(cells)
    rows = _lay_out_rows(plan, cells, probe_order)
    input_ids, attention_mask = left_pad(rows.prompts, pad_id)
    sink = _EditSink(plan, rows.prompts, input_ids.shape[1], constants)
    for p in probe_order:
        for sample in range(plan.target_samples):
            sink.emit_baseline(p, rows.baseline_row[(p, plan.target, sample)], sample)
    for cell in cells:
        t_row = rows.cell_row[cell.index]
        sink.emit_baseline(cell.probe, t_row, plan.target_row_sample(cell.sample))
        if not cell.positions.indices:
            continue  # a "none" cell: the control row that patches nothing (beyond the baseline)
        n_target = len(rows.prompts[t_row])
        s_row = rows.baseline_row[(cell.source_probe, plan.source, 0)]
        for site in cell.all_sites:
            key = f"{constants.seed}|{plan.probes[cell.probe].id}|{cell.sample}|{site.name}|cell"
            sink.emit(1, site, cell.operation, t_row, cell.positions.indices, s_row, cell.source_indices, n_target,
                      key, source_probe=cell.source_probe)
    access_list = _access_list(plan, sink.accesses)

    row_probe = rows.row_probe
    clean_row = torch.tensor([rows.baseline_row[(p, "clean", 0)] for p in row_probe], dtype=torch.long)
    answer_index, answer_mask = kernel.token_sets([plan.probes[p].answer_ids for p in row_probe])
    wrong_index, wrong_mask = kernel.token_sets([plan.probes[p].wrong_ids for p in row_probe])
    return Batch(
        index=index,
        input_ids=input_ids,
        attention_mask=attention_mask,
        row_probe=row_probe,
        row_role=rows.row_role,
        row_cell=rows.row_cell,
        clean_row=clean_row,
        answer_index=answer_index,
        answer_mask=answer_mask,
        wrong_index=wrong_index,
        wrong_mask=wrong_mask,
        accesses=access_list,
        cells=[c.index for c in cells],
        row_sample=rows.row_sample,
        target_row=[rows.baseline_row.get((p, plan.target, plan.target_row_sample(sample)), row)
                    if role == "patched" else row
                    for row, (p, role, sample) in enumerate(zip(row_probe, rows.row_role, rows.row_sample,
                                                                strict=True))],
    )


def _probe_order(cells: Sequence[Cell]) -> list[int]:
    """Target and source probes in first-use order: this order fixes where each probe's baseline rows go."""
    probe_order: list[int] = []
    for cell in cells:
        for p in (cell.probe, cell.source_probe):
            if p not in probe_order:
                probe_order.append(p)
    return probe_order


@dataclass
class _Rows:
    """The row layout of one batch (prompts and per-row bookkeeping), kept apart from compiling the edits."""

    prompts: list[list[int]] = field(default_factory=list)
    row_probe: list[int] = field(default_factory=list)
    row_role: list[str] = field(default_factory=list)
    row_cell: list[int] = field(default_factory=list)
    row_sample: list[int] = field(default_factory=list)
    baseline_row: dict[tuple[int, str, int], int] = field(default_factory=dict)  #: (probe, role, sample) -> row
    cell_row: dict[int, int] = field(default_factory=dict)  #: cell index -> row

    def add(self, prompt: list[int], probe: int, role: str, cell: int, sample: int) -> int:
        self.prompts.append(prompt)
        self.row_probe.append(probe)
        self.row_role.append(role)
        self.row_cell.append(cell)
        self.row_sample.append(sample)
        return len(self.prompts) - 1


def _lay_out_rows(plan: Plan, cells: Sequence[Cell], probe_order: list[int]) -> _Rows:
    """Baseline rows per probe first, then one patched row per cell: the layout every edit's row index refers to."""
    rows = _Rows()
    for p in probe_order:
        for role in ("clean", "corrupted"):
            for sample in range(plan.target_samples if role == plan.target else 1):
                rows.baseline_row[(p, role, sample)] = rows.add(plan.probes[p].prompt_ids(role), p, role, -1, sample)
    for cell in cells:
        rows.cell_row[cell.index] = rows.add(
            plan.probes[cell.probe].prompt_ids(plan.target), cell.probe, "patched", cell.index, cell.sample)
    return rows


@dataclass
class _EditSink:
    """Compiles edits into per-access, per-stage index lists: one place that knows the padded column layout."""

    plan: Plan
    prompts: list[list[int]]
    width: int
    constants: Measurements
    accesses: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def emit(self, stage: int, site: Site, op: OperationSpec, t_row: int, indices: Sequence[int], s_row: int | None,
             source_indices: Sequence[int], n_target: int, noise_key: str, source_probe: int | None = None) -> None:
        per_head = site.kind == "head"
        entry = self.accesses.setdefault(site.access_key, {"n_heads": None, "stages": {}})
        if per_head:
            entry["n_heads"] = site.n_heads
        shape = entry["stages"].setdefault(stage, {}).setdefault(
            "heads" if per_head else "full", {"copy": [], "set": [], "add": [], "mix": []})
        width = self.width
        t_cols = [column(i, n_target, width) for i in indices]
        s_cols = [column(j, len(self.prompts[s_row]), width) for j in source_indices] if s_row is not None else []
        edit = operations.EditContext(op=op, site=site, t_row=t_row, t_cols=t_cols, indices=tuple(indices),
                                      s_row=s_row, s_cols=s_cols, n_target=n_target,
                                      head=site.head if per_head else -1, constants=self.constants,
                                      noise_key=noise_key, source_probe=source_probe,
                                      source_indices=tuple(source_indices))
        for mode, item in operations.get(op.name).compile(edit):
            shape[mode].append(item)

    def emit_baseline(self, p: int, t_row: int, sample: int) -> None:
        plan = self.plan
        n_target = len(plan.probes[p].prompt_ids(plan.target))
        for number, edit in enumerate(plan.baseline.get(p, ())):
            for site in edit.sites:
                key = f"{self.constants.seed}|{plan.probes[p].id}|{sample}|{site.name}|baseline{number}"
                self.emit(0, site, edit.operation, t_row, edit.indices, None, (), n_target, key)


def _access_list(plan: Plan, accesses: dict[tuple[str, str], dict[str, Any]]) -> list[AccessPatches]:
    """The compiled edits per module access, sorted: nnsight must meet module accesses in forward-execution order."""
    # plan.sites is already in forward-execution order
    rank = {}
    for position, site in enumerate(plan.sites):
        rank.setdefault(site.access_key, position)
    access_list = []
    for (module, access), entry in sorted(accesses.items(), key=lambda item: rank[item[0]]):
        patches = AccessPatches(module=module, access=access, n_heads=entry["n_heads"])
        for stage in sorted(entry["stages"]):
            shapes = entry["stages"][stage]
            patches.stages.append(tuple(_patch_groups(shapes[k]) if k in shapes else PatchGroups()
                                        for k in ("full", "heads")))
            patches.stage_ids.append(stage)
        access_list.append(patches)
    return access_list


def _patch_groups(entry: dict[str, list]) -> PatchGroups:
    groups = PatchGroups()
    for mode in ("copy", "mix"):
        items = entry[mode]
        if not items:
            continue
        t = torch.tensor([e[:5] for e in items], dtype=torch.long)
        extra: dict[str, torch.Tensor] = {}
        if mode == "mix":
            extra["alpha"] = torch.tensor([e[5] for e in items], dtype=torch.float64)[:, None]
            if len(items[0]) > 6:  # towards given values (another model's activations), not a batch row
                extra["values"] = torch.stack([e[6] for e in items])
        setattr(groups, mode, Edits(t_row=t[:, 0], t_col=t[:, 1], s_row=t[:, 2], s_col=t[:, 3], head=t[:, 4], **extra))
    for mode in ("set", "add"):
        if entry[mode]:
            t = torch.tensor([e[:3] for e in entry[mode]], dtype=torch.long)
            values = torch.stack([e[3] for e in entry[mode]])
            setattr(groups, mode, Edits(t_row=t[:, 0], t_col=t[:, 1], head=t[:, 2], values=values))
    return groups


#: rows per batch when neither ``max_rows`` nor ``memory_budget_mb`` is given, per execution strategy: a suffix batch
#: holds one baseline pass and passes that run only the rows' suffixes (cut to a token budget), so it can take (and
#: gains from) many more rows (measured: ``bench/results/process_memory.md``); a suffix batch that has to run in
#: full after all runs as parts of the full strategy's size
DEFAULT_ROWS = {"full": 64, "suffix": 4096}

#: most baseline rows per batch, per execution strategy (0: none beyond the rows per batch): a suffix batch's
#: baseline pass holds every baseline row's keys, values and block states at once, whatever the cells per probe
DEFAULT_BASELINE_ROWS = {"full": 0, "suffix": 256}


def rows_for_budget(memory_budget_mb: float | None, max_rows: int | None, seq_len: int, vocab: int, d_model: int,
                    n_layers: int, bytes_per: int, default: int = DEFAULT_ROWS["full"]) -> int:
    """Rows per forward pass: ``max_rows`` if given, else a conservative estimate from the memory budget, else
    ``default``.

    The estimate counts the logits (rows x seq x vocab, the largest single tensor for short prompts) and ~16 live
    activations of width d_model per layer; it is deliberately generous so a budget is not exceeded. A budget too
    small for 3 rows (a probe's clean and corrupted baselines and one patched row) is refused with the minimum,
    rather than silently exceeded.
    """
    if max_rows is not None:
        return max_rows
    if memory_budget_mb is None:
        return default
    per_row = seq_len * (vocab * 2 + 16 * d_model * max(1, n_layers)) * bytes_per
    rows = int(math.floor(memory_budget_mb * 2**20 / per_row))
    if rows < 3:
        need = math.ceil(3 * per_row / 2**20 * 10) / 10
        raise ClapError(f"execution.memory_budget_mb: {memory_budget_mb:g} MB is too small for one batch: 3 rows (a "
                        f"probe's clean and corrupted baselines and one patched row) of {seq_len} tokens need about "
                        f"{need:g} MB on this model; give at least memory_budget_mb: {need:g}, or max_rows")
    return rows
