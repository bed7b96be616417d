"""The ``suffix`` strategy: run each patched row only where a patch can change it, exactly.

Why it is exact: a patched row is its target baseline row (same prompt, same baseline interventions, same noise
sample) until its cell's first edit. Under causal attention nothing flows backwards, so at every module access
before the row's first edited access (in execution order), and at every column before its first edited column, the
patched row holds the baseline row's values. A row whose first edit is in block ``L`` at padded column ``c`` therefore
only needs blocks ``L..N-1`` on columns ``c..W-1``: columns ``< c`` contribute only their keys and values, which are
the baseline row's (read from the baseline pass's key/value cache), and the blocks before ``L`` are the baseline
row's residual stream entering block ``L``.

One batch runs as one *baseline pass* (an nnsight trace) over its clean/corrupted rows (full width, with their
baseline interventions), which returns their metrics as the full strategy would and captures the key/value cache,
the residual stream at each block boundary, the source rows' activations that ``copy``/``mix`` edits read (the
source rows are not run again, so those edits become writes of captured values), each patched access's value, and
the clean rows' log-probabilities (for KL). Patched rows whose every edit writes the value already there
(:func:`no_op_rows`) take their baseline row's result; the rest run on the ragged path
(:mod:`interventions.ragged`: the model's own blocks called one by one, one pass per start column), with the edits
of :func:`pass_edits`: rows renumbered into the pass, columns shifted, edits left of the start column dropped (they
are in the cached state). A row with no edit of its own (a ``none`` cell) is its baseline row's result.

The baseline pass's trace body uses only torch operations, envoys and :mod:`interventions.kernel`, as in
:mod:`interventions.full_traces`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from interventions import kernel, projection_reuse
from interventions.full_traces import _moved, device_of, keeps_last_logits, metric_dtype_for, trace_kwargs
from interventions.kernel import MODES, Edits
from interventions.plan import AccessPatches, Batch

Key = tuple[str, str]

#: a shape with no edits: ``(copy, set, add, mix)``
NO_EDITS = (None, None, None, None)

class Unsupported(Exception):
    """The batch cannot run under the suffix strategy (e.g. a patch on a module the layout cannot place): run it in
    full."""


@dataclass
class ModelLayout:
    """What the suffix strategy needs to know about a model: which block each module access belongs to, where the
    residual stream enters each block, and how its forward takes a key/value cache."""

    n_layers: int
    layers: str  #: the module path of the block list
    rank: dict[Key, int]  #: module access -> position in execution order
    block_of: dict[Key, int]  #: module access -> number of blocks that finished before it (embed 0, final norm N)
    #: L (0..N) -> the access whose input is the residual stream entering block L (N: the final norm)
    boundary: dict[int, Key]
    cache_kwarg: str  #: "cache" (transformers 5) or "past_key_values"
    config: Any
    flops_per_token_block: float  #: 2 x parameters of one block: the cost of one block on one token
    #: block L -> the rank of its attention output projection's input: from there on, block L does nothing that
    #: mixes columns (:func:`late_rows`); blocks without a known projection are left out
    mixed: dict[int, int] = field(default_factory=dict)
    #: block L -> its query/key/value projections (module paths; :mod:`interventions.projection_reuse`), and the
    #: rank of the last one's output; blocks where one of the architecture's projections is not found are left out
    projections: dict[int, tuple[str, ...]] = field(default_factory=dict)
    projected: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, hf: torch.nn.Module) -> ModelLayout | None:
        """The layout, or None when the strategy does not apply (no architecture map, blocks that return tuples,
        a forward without a cache argument)."""
        from clap.architectures import BY_MODEL_TYPE
        from interventions.sites import execution_order

        arch = BY_MODEL_TYPE.get(getattr(hf.config, "model_type", None))
        if arch is None:
            return None
        parameters = inspect.signature(hf.forward).parameters
        cache_kwarg = next((n for n in ("cache", "past_key_values") if n in parameters), None)
        if cache_kwarg is None:
            return None
        blocks = hf.get_submodule(arch.layers)
        n_layers = len(blocks)
        outputs: list[Any] = []
        handle = blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            order = dict(execution_order(hf))
            if not outputs:  # the order was cached: run once more to see what a block returns
                with torch.no_grad():
                    device = next(hf.parameters()).device
                    hf(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
        finally:
            handle.remove()
        if not outputs or not isinstance(outputs[0], torch.Tensor):
            return None  # a block returning a tuple would need a tuple replacement when skipped
        ends = sorted(order[(arch.block(i), "output")] for i in range(n_layers))
        block_of = {key: sum(1 for end in ends if end < rank) for key, rank in order.items()}
        boundary = {layer: (arch.block(layer), "input") for layer in range(n_layers)}
        boundary[n_layers] = (arch.final_norm, "input")
        if any(key not in order for key in boundary.values()):
            return None
        flops = 2.0 * sum(p.numel() for p in blocks[0].parameters())
        mixed = {layer: order[key] for layer in range(n_layers)
                 if (key := (f"{arch.block(layer)}.{arch.out_proj}", "input")) in order}
        named = {layer: tuple(f"{arch.block(layer)}.{name}" for name in arch.qkv) for layer in range(n_layers)}
        projections = {layer: paths for layer, paths in named.items()
                       if paths and all((path, "output") in order for path in paths)}
        projected = {layer: max(order[(path, "output")] for path in paths) for layer, paths in projections.items()}
        return cls(n_layers, arch.layers, order, block_of, boundary, cache_kwarg, hf.config, flops, mixed,
                   projections, projected)


# -- where each row starts ------------------------------------------------------------------------------------------
def own_edits(batch: Batch) -> Iterator[tuple[AccessPatches, int, int]]:
    """``(access patches, row, padded column)`` of every edit the batch's cells make themselves (stage >= 1; not the
    baseline interventions they share with their baseline row)."""
    for patches in batch.accesses:
        for stage, groups in zip(_stage_ids(patches), patches.stages, strict=True):
            if stage == 0:
                continue
            for group in groups:
                for entry in group.as_tuple():
                    if entry is not None:
                        for row, col in zip(entry.t_row.tolist(), entry.t_col.tolist(), strict=True):
                            yield patches, row, col


def row_starts(batch: Batch, layout: ModelLayout) -> dict[int, tuple[int, int]]:
    """Per patched row with edits of its own (stage >= 1): (first edited block, first edited padded column)."""
    for patches in batch.accesses:
        if (patches.module, patches.access) not in layout.block_of:
            raise Unsupported(f"{patches.module} {patches.access} is not on the model's recorded execution path")
    starts: dict[int, tuple[int, int]] = {}
    for patches, row, col in own_edits(batch):
        block = layout.block_of[(patches.module, patches.access)]
        old = starts.get(row, (block, col))
        starts[row] = (min(old[0], block), min(old[1], col))
    return starts


def late_rows(batch: Batch, layout: ModelLayout, starts: dict[int, tuple[int, int]]) -> set[int]:
    """The rows of ``starts`` that can skip most of their first edited block: every own edit in that block ``L``
    lies at the row's start column ``c`` and comes after the attention's mixing (the output projection's input
    or later: head outputs, the attention output, the MLP, the block's output).

    Why that is exact: block ``L``'s keys and values come from its input, which such a row shares with its baseline
    row, and everything after the mixing acts on each column alone; so block ``L``'s output differs from the
    baseline row's only at column ``c``. The ragged path runs block ``L`` for these rows on column ``c`` alone
    (the baseline keys and values before it from the cache) and lets them join its pass at block ``L + 1``, with
    the baseline residual stream elsewhere: one column of block ``L`` instead of ``W - c``."""
    disqualified: set[int] = set()
    for patches, row, col in own_edits(batch):
        key = (patches.module, patches.access)
        block, rank = layout.block_of[key], layout.rank[key]
        first_block, first_col = starts[row]
        if block == first_block and (rank < layout.mixed.get(block, rank + 1) or col != first_col):
            disqualified.add(row)
    return {row for row, (block, _) in starts.items()
            if block < layout.n_layers and block in layout.mixed and row not in disqualified}


def _stage_ids(patches: AccessPatches) -> list[int]:
    if len(patches.stage_ids) != len(patches.stages):
        raise Unsupported("access patches without stage numbers")
    return patches.stage_ids


# -- edits, re-addressed ----------------------------------------------------------------------------------------------
def _baseline_groups(groups: Sequence[Edits | None], table: torch.Tensor) -> tuple | None:
    """A stage's (copy, set, add, mix) edits restricted to the baseline rows, rows renumbered (``table``: batch row
    -> baseline-pass row or -1). None when nothing is left."""
    out: list[Edits | None] = []
    for mode, entry in zip(MODES, groups, strict=True):
        if entry is None:
            out.append(None)
            continue
        rows = table[entry.t_row]
        keep = rows >= 0
        reads_row = mode in ("copy", "mix") and entry.values is None
        if reads_row:
            sources = table[entry.s_row]
            keep &= sources >= 0
        entry = entry.with_(t_row=rows, **({"s_row": sources} if reads_row else {}))
        out.append(entry.select(keep))
    return tuple(out) if any(e is not None for e in out) else None


def _suffix_groups(groups: Sequence[Edits | None], table: torch.Tensor, start_col: int,
                   sources: Sequence[torch.Tensor | None]) -> tuple | None:
    """A stage's edits for one suffix pass: rows renumbered into the pass (``table``: batch row -> pass row or -1),
    columns shifted by ``start_col``, edits left of it dropped (they are in the cached state), and copy/mix sources
    given as values (the source row is not in the pass; ``sources[k]``: the values the baseline pass captured for
    mode ``k``'s entries, in entry order)."""
    out: list[Edits | None] = []
    for k, entry in enumerate(groups):
        if entry is None:
            out.append(None)
            continue
        rows = table[entry.t_row]
        keep = (rows >= 0) & (entry.t_col >= start_col)
        moved = entry.with_(t_row=rows, t_col=entry.t_col - start_col)
        if k in (0, 3) and entry.values is None:  # copy / mix from a batch row: its value was captured
            moved = moved.with_(values=sources[k], s_row=None, s_col=None)
        out.append(moved.select(keep))
    return tuple(out) if any(e is not None for e in out) else None


def pass_edits(batch: Batch, layout: ModelLayout, base: dict[str, Any], table: torch.Tensor, start_layer: int,
               start_col: int) -> list[tuple[AccessPatches, list[tuple]]]:
    """Each access's edits for one suffix pass, as ``(patches, stages)``: rows renumbered by ``table`` (batch row ->
    pass row or -1), columns shifted by ``start_col``, copy/mix sources replaced by the values the baseline pass
    captured (``base["sources"]``, in entry order). Accesses in blocks before ``start_layer`` are left out (their
    effect is in the baseline state), as are accesses with nothing left for the pass's rows."""
    out = []
    for patches in batch.accesses:
        key = (patches.module, patches.access)
        if layout.block_of[key] < start_layer:
            continue
        captured = iter(base["sources"].get(key, []))
        stages = []
        for stage, groups in zip(_stage_ids(patches), patches.stages, strict=True):
            shaped = []
            for group in groups:
                sources = [next(captured) if (stage >= 1 and k in (0, 3) and entry is not None and entry.values is None)
                           else None for k, entry in enumerate(group.as_tuple())]
                shaped.append(_suffix_groups(group.as_tuple(), table, start_col, [
                    s.cpu() if s is not None else None for s in sources]))
            if any(s is not None for s in shaped):
                stages.append(tuple(s or NO_EDITS for s in shaped))
        if stages:
            out.append((patches, stages))
    return out


# -- the passes -------------------------------------------------------------------------------------------------------
def run_batch(model: Any, batch: Batch, layout: ModelLayout, ragged_path: Any, unembed_module: str | None = None,
              stats: dict[str, int] | None = None, skip_no_ops: bool = True,
              needs: kernel.MetricNeeds = kernel.ALL_METRICS) -> torch.Tensor:
    """``[rows, 5]`` metrics of a batch, equal to :func:`interventions.full_traces.run_batch`'s (to float rounding),
    from one baseline pass and the patched rows' suffixes on the ragged path.

    ``ragged_path``: the model's :class:`interventions.ragged.RaggedPath` (it raises
    :class:`interventions.ragged.Unsupported` before any work when the batch cannot run there; the caller then runs
    it in full). Patched rows whose every edit writes the value already there (:func:`no_op_rows`) are their
    baseline row's result and are not run (unless ``skip_no_ops`` is False, for measuring); ``stats`` counts them
    (``"no_op_rows"``), the rows run (``"rows_run"``) and those of them that ran their first edited block on one
    column (``"late_rows"``: :func:`late_rows`) and whose joining block read its projections from the baseline
    (``"reused_rows"``: :mod:`interventions.projection_reuse`). ``needs``: the metric columns the caller reads;
    the patched rows' others are left NaN (:func:`interventions.ragged.unembed_metrics`)."""
    if len(batch.target_row) != len(batch.row_role):
        raise Unsupported("the batch does not name each row's target baseline row")
    starts = row_starts(batch, layout)
    ragged_path.check(batch, unembed_module)
    n_rows = batch.input_ids.shape[0]
    base_rows = [r for r, role in enumerate(batch.row_role) if role != "patched"]
    base_index = torch.full((n_rows,), -1, dtype=torch.long)
    base_index[base_rows] = torch.arange(len(base_rows))
    late = late_rows(batch, layout, starts)
    # 0: the ragged path's self-check; a late row reads the state entering its first block and the next one
    joining = {layer for layer, _ in starts.values()} | {starts[row][0] + 1 for row in late}
    boundaries = sorted(joining | {0})
    with ragged_path.capturing(joining & projection_reuse.reusable_blocks(batch, layout)) as block_inputs:
        base = _baseline_pass(model, batch, layout, base_rows, base_index, boundaries, device_of(model, False),
                              unembed_module)
    metrics = torch.empty((n_rows, base["metrics"].shape[1]), dtype=base["metrics"].dtype)
    metrics[base_rows] = base["metrics"]
    quiet = no_op_rows(batch, base, base_index) if skip_no_ops else set()
    for row, role in enumerate(batch.row_role):
        if role == "patched" and (row not in starts or row in quiet):  # nothing of its own: its baseline row's run
            metrics[row] = base["metrics"][base_index[batch.target_row[row]]]
    starts = {row: start for row, start in starts.items() if row not in quiet}
    counts: dict[str, int] = {}
    ragged_path.run(batch, base, base_index, block_inputs, starts, metrics, needs, late=late & set(starts),
                    counts=counts)
    if stats is not None:  # counted once the batch is done (a ragged path that gives up leaves them to the retry)
        stats["reused_rows"] = stats.get("reused_rows", 0) + counts.get("reused_rows", 0)
        stats["no_op_rows"] = stats.get("no_op_rows", 0) + len(quiet)
        stats["rows_run"] = stats.get("rows_run", 0) + len(starts)
        ran_late = late & set(starts) if ragged_path.late_ok else set()
        stats["late_rows"] = stats.get("late_rows", 0) + len(ran_late)
    return metrics


def _at(view: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    index = (rows.to(view.device), cols.to(view.device)) + ((heads.to(view.device),) if heads is not None else ())
    return view[index]


def no_op_rows(batch: Batch, base: dict[str, Any], base_index: torch.Tensor) -> set[int]:
    """Patched rows whose every edit of their own writes exactly the value their baseline row already holds there.

    Such a row *is* its baseline row (each edit, in execution order, meets the baseline value and leaves it), so its
    result is the baseline row's, without running it. The common case: clean and corrupted prompts that share a
    prefix hold bitwise equal activations on it, and restoring one there changes nothing. Equality is exact float
    equality (``==``: a difference in the last bit runs the row; -0.0 and 0.0 count as equal, which no later
    computation can tell apart except by a sign of zero)."""
    values = base.get("values", {})
    touched: set[int] = set()
    changed: set[int] = set()
    target_rows = torch.tensor(batch.target_row)
    for patches in batch.accesses:
        whole = values.get((patches.module, patches.access))
        for stage, groups in zip(_stage_ids(patches), patches.stages, strict=True):
            if stage == 0:
                continue
            for shape, group in enumerate(groups):
                for mode, entry in zip(MODES, group.as_tuple(), strict=True):
                    if entry is None:
                        continue
                    rows = entry.t_row
                    touched.update(rows.tolist())
                    if whole is None:
                        changed.update(rows.tolist())
                        continue
                    view = whole if shape == 0 else whole.view(*whole.shape[:2], patches.n_heads, -1)
                    heads = entry.head if shape == 1 else None
                    current = _at(view, base_index[target_rows[rows]], entry.t_col, heads)
                    source = (entry.values.to(view.device, view.dtype) if entry.values is not None
                              else _at(view, base_index[entry.s_row], entry.s_col, heads) if entry.s_row is not None
                              else None)
                    if mode in ("copy", "set"):
                        new = source
                    elif mode == "add":
                        new = current + source
                    else:
                        new = current + entry.alpha.to(view.device, view.dtype) * (source - current)
                    same = (new == current).reshape(len(rows), -1).all(1).cpu()
                    changed.update(rows[~same].tolist())
    return touched - changed


def _logits_to_keep(model: Any, touches_unembed: bool) -> dict[str, Any]:
    if not touches_unembed and keeps_last_logits(model._module):
        return {"logits_to_keep": 1}
    return {}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row counted from its first real token (what nnsight supplies for a
    left-padded batch in the full strategy), given explicitly so a suffix pass keeps every token's position."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _baseline_pass(model: Any, batch: Batch, layout: ModelLayout, base_rows: list[int], base_index: torch.Tensor,  # noqa: C901 - one trace body
                   boundaries: list[int], device: torch.device, unembed_module: str | None) -> dict[str, Any]:
    """The baseline rows over the whole prompt: metrics, key/value cache, residual stream at the block boundaries
    the rows start from, captured source activations, clean log-probabilities, and each patched access's whole
    value after the baseline interventions (``values``: what :func:`no_op_rows` compares the cells' edits with)."""
    from transformers import DynamicCache

    rows = torch.tensor(base_rows)
    want_boundary = {layout.boundary[layer]: layer for layer in boundaries}
    plan: dict[Key, dict[str, Any]] = {}
    for patches in batch.accesses:
        key = (patches.module, patches.access)
        entry = plan.setdefault(key, {"n_heads": patches.n_heads or 0, "stages": [], "gathers": [], "keep": False})
        for stage, groups in zip(_stage_ids(patches), patches.stages, strict=True):
            if stage == 0:
                kept = [_baseline_groups(g.as_tuple(), base_index) for g in groups]
                if any(k is not None for k in kept):
                    entry["stages"].append(tuple(k or NO_EDITS for k in kept))
            else:
                entry["keep"] = True
                for shape, group in enumerate(groups):
                    for mode in ("copy", "mix"):
                        found = getattr(group, mode)
                        if found is not None and found.values is None:  # towards given values: no batch row
                            entry["gathers"].append((shape == 1, base_index[found.s_row], found.s_col,
                                                     found.head))
    for key in want_boundary:
        plan.setdefault(key, {"n_heads": 0, "stages": [], "gathers": [], "keep": False})
    order = sorted(plan, key=layout.rank.__getitem__)
    accesses = [(model.get(module), access, plan[(module, access)]["n_heads"], _moved(plan[(module, access)]["stages"],
                                                                                      device),
                 (module, access) in want_boundary, _moved(plan[(module, access)]["gathers"], device),
                 plan[(module, access)]["keep"])
                for module, access in order]
    mask = batch.attention_mask[rows]
    touches_unembed = any(p.module == unembed_module for p in batch.accesses)
    inputs = _moved({"input_ids": batch.input_ids[rows], "attention_mask": mask, "position_ids": _positions(mask)},
                    device)
    metric_dtype = metric_dtype_for(device)
    answer_index, answer_mask, wrong_index, wrong_mask, clean_row = _moved(
        (batch.answer_index[rows], batch.answer_mask[rows], batch.wrong_index[rows], batch.wrong_mask[rows],
         base_index[batch.clean_row[rows]]), device)
    # no config: every layer keeps all its columns (a sliding-window layer would keep only its window, and the
    # ragged passes read the whole prefix)
    cache_in = DynamicCache()
    cache_name = layout.cache_kwarg  # a plain string, read inside the trace body
    boundary_values, gathered, kept = [], [], []
    with torch.no_grad():
        with model.trace(**inputs, **{layout.cache_kwarg: cache_in, "use_cache": True},
                         **_logits_to_keep(model, touches_unembed), **trace_kwargs(False)):
            for envoy, access, n_heads, stages, capture, gathers, keep in accesses:
                original = envoy.input if access == "input" else envoy.output
                value = (original[0] if isinstance(original, tuple) else original).clone()
                if capture:  # the residual stream as it leaves the previous block, before this access's edits
                    boundary_values.append(value.clone().save())
                kernel.apply_edits(value, n_heads, stages)
                for by_head, s_row, s_col, head in gathers:  # source activations the ragged passes will write
                    if by_head:
                        gathered.append(value.view(value.shape[0], value.shape[1], n_heads, -1)[s_row, s_col, head]
                                        .clone().save())
                    else:
                        gathered.append(value[s_row, s_col].clone().save())
                if keep:
                    kept.append(value.clone().save())
                if stages:
                    patched = (value, *original[1:]) if isinstance(original, tuple) else value
                    if access == "input":
                        envoy.input = patched
                    else:
                        envoy.output = patched
            metrics, logprobs = kernel.reduce_metrics(model.output.logits[:, -1, :], answer_index, answer_mask,
                                                      wrong_index, wrong_mask, clean_row=clean_row, dtype=metric_dtype)
            metrics, logprobs = metrics.save(), logprobs.save()
            cache = getattr(model.output, cache_name).save()
    capture_keys = [key for key in order if key in want_boundary]
    gather_keys = [key for key in order for _ in plan[key]["gathers"]]
    kept_keys = [key for key in order if plan[key]["keep"]]
    sources: dict[Key, list[torch.Tensor]] = {}
    for key, value in zip(gather_keys, gathered, strict=True):
        sources.setdefault(key, []).append(value)
    return {
        "metrics": metrics.detach().cpu(),
        "logprobs": logprobs.detach(),
        "boundary": {want_boundary[key]: value for key, value in zip(capture_keys, boundary_values, strict=True)},
        "cache": [(layer.keys, layer.values) for layer in cache.layers],
        "sources": sources,
        "values": dict(zip(kept_keys, kept, strict=True)),
    }
