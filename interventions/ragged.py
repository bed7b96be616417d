"""The suffix strategy's patched rows, run locally as plain module calls (the *ragged path*).

After the baseline pass (:mod:`interventions.suffix`), each patched row needs only the blocks from its first edited
one, on the columns from its first edited one. One *pass* covers every patched row that starts at the same padded
column, whatever its first edited block:

* the pass holds only columns ``c..W-1``; columns ``< c`` are the baseline row's, read from its key/value cache;
* rows *join* the pass at their first edited block ``L``: sorted by ``L``, the rows in the pass at block ``l`` are
  a prefix of the pass, and a joining row enters with its baseline row's residual stream at block ``L``'s input.
  Block ``l`` therefore runs on exactly the rows whose edits have begun, and no row recomputes a block it shares
  with its baseline row.

A row whose first edits follow the attention's mixing at one column (:func:`interventions.suffix.late_rows`) runs
that block on that column alone, in one call per block for all such rows (:func:`late_columns`), and joins at the
next block; a joining row's block computes its query/key/value projections only where its input changed, reading
the baseline pass's elsewhere (:mod:`interventions.projection_reuse`); the last block's MLP and attention output
projection get the last column alone (the only one unembedded), unless the study edits them.

The blocks are the model's own modules, called one by one with the arguments the model itself gave them in the
baseline pass (its attention mask, rotary position embeddings, position ids; sliced to the pass's rows and columns)
and a small key/value cache holding the baseline prefix. Edits are applied by forward hooks on the patched modules,
with the kernel every substrate uses (:func:`interventions.kernel.apply_edits`). Only the last column reaches the
unembedding, and without a metric over the whole vocabulary only the answer and wrong tokens' logits are computed.

Passes are cut to at most :data:`PASS_TOKENS` tokens (rows x columns) at a block, and the last columns of all
passes of a batch are unembedded together, :data:`UNEMBED_ROWS` rows at a time, so a batch's memory stays bounded
whatever its size.

This path runs outside nnsight, so it is local only: on NDIF and under its simulation the ``suffix`` strategy is
refused (and ``auto`` is ``full``); ARCHITECTURE.md says what running it through nnsight would take. Every model is
checked once against its own baseline pass (:func:`self_check`) before this path is trusted with it; a model that
fails the check, or on which it cannot run at all (an architecture that does something between or after its blocks
this module does not know about, such as a logit soft-cap), runs ``full`` from then on.
"""

from __future__ import annotations

import bisect
import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from interventions import kernel, projection_reuse
from interventions.module_input import replace_input
from interventions.plan import Batch

Key = tuple[str, str]

#: fixed cost of one more pass, in floating-point operations (a block call per layer, hooks, cache slices): columns
#: whose rows are few are merged into the pass of the column before them when that costs less than this
PASS_OVERHEAD_FLOPS = 2e9

#: largest metric difference the self-check accepts between this path and the model's own forward pass
SELF_CHECK_TOLERANCE = 1e-4

#: most tokens (rows x columns) a pass holds at one block: a larger pass is cut into passes of rows in order of
#: their first edited block, so a pass's memory stays bounded whatever the batch size
PASS_TOKENS = 16384

#: most rows unembedded and reduced to metrics at once (float64 log-probabilities over the vocabulary per row)
UNEMBED_ROWS = 256

#: the self-check's result per model (it checks the architecture, so once per model object is enough)
_SELF_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, float] = weakref.WeakKeyDictionary()
#: the late start's check per model (:func:`_late_self_check`)
_LATE_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, float] = weakref.WeakKeyDictionary()
#: per model, whether the self-check passed with the last block cut to the last column (:meth:`RaggedPath._check_self`)
_TRIMS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
#: the projection reuse's check per model (:func:`reuse_self_check`)
_REUSE_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, float] = weakref.WeakKeyDictionary()


class Unsupported(Exception):
    """This batch (or model) cannot run on the ragged path; the caller runs it in full instead."""


# -- the blocks' own arguments ------------------------------------------------------------------------------------
@dataclass
class BlockInputs:
    """The keyword arguments each block received in the baseline pass (its input hidden state left out), captured
    by forward pre-hooks; :meth:`for_pass` slices them to one pass's rows and columns."""

    cache_kwarg: str
    per_block: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: per block, the input hidden state's shape and dtype (for an explicit causal mask)
    shapes: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=dict)
    #: per block asked for, its query/key/value projections' outputs (:mod:`interventions.projection_reuse`)
    projections: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)

    def causal_mask(self, layer: int) -> torch.Tensor:
        """An additive causal mask ``[rows, 1, W, W]`` for a block that received none (a batch without padding under
        SDPA, where the kernel applies causality itself)."""
        shape, dtype, device = self.shapes[layer]
        width = shape[1]
        allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(width, width, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask.expand(shape[0], 1, width, width)

    @classmethod
    @contextmanager
    def capture(cls, blocks: Sequence[torch.nn.Module], cache_kwarg: str) -> Iterator[BlockInputs]:
        found = cls(cache_kwarg)
        handles = []
        for index, block in enumerate(blocks):
            # the class's forward: nnsight may have replaced the instance's with a wrapper of another signature
            signature = inspect.signature(type(block).forward)

            def hook(_module: Any, args: tuple, kwargs: dict, index: int = index, signature: Any = signature) -> None:
                bound = signature.bind(_module, *args, **kwargs).arguments
                named: dict[str, Any] = {}
                for name, value in list(bound.items())[2:]:  # self, then the hidden state
                    if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        named.update(value)
                    else:
                        named[name] = value
                if "attention_mask" in signature.parameters:
                    named.setdefault("attention_mask", None)  # made explicit in for_pass: a pass is not square
                found.per_block[index] = named
                hidden = list(bound.values())[1]
                if isinstance(hidden, torch.Tensor):
                    found.shapes[index] = (hidden.shape, hidden.dtype, hidden.device)

            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield found
        finally:
            for handle in handles:
                handle.remove()

    def for_pass(self, layer: int, rows: torch.Tensor, col: int, cache: PrefixCache) -> dict[str, Any]:
        """Block ``layer``'s arguments for baseline rows ``rows`` (one per pass row) and columns ``col..``."""
        return self._arguments(
            layer, cache,
            mask=lambda value: _rows(value, rows)[:, :, col:, :],
            positions=lambda value: (_rows(value, rows) if value.dim() > 1 else value)[..., col:],
            embeddings=lambda part: _rows(part, rows)[:, col:])

    def for_columns(self, layer: int, rows: torch.Tensor, columns: torch.Tensor, base: dict[str, Any]
                    ) -> dict[str, Any]:
        """Block ``layer``'s arguments for one column per row (baseline rows ``rows``, padded column ``columns[i]``
        for row ``i``): the keys and values of the columns before each row's own from the baseline cache, padded
        to the longest and masked beyond each row's column, then the row's own key last."""
        k = len(rows)
        every = torch.arange(k, device=rows.device)
        prefix = int(columns.max()) if k else 0
        keys, values = base["cache"][layer]
        cache = PrefixCache(keys[rows, :, :prefix], values[rows, :, :prefix]) if prefix else PrefixCache(None, None)

        def mask(value: torch.Tensor) -> torch.Tensor:
            query = _rows(value, rows).expand(k, -1, -1, -1)[every, 0, columns]  # [k, W]: each row's own query
            beyond = torch.arange(prefix, device=query.device) >= columns[:, None]  # another row's longer prefix
            # a boolean mask (SDPA with padding) says where to attend; an additive one adds -inf-like values
            blocked = False if query.dtype == torch.bool else torch.finfo(query.dtype).min
            before = query[:, :prefix].masked_fill(beyond, blocked)
            return torch.cat([before, query[every, columns][:, None]], dim=1)[:, None, None, :]

        def positions(value: torch.Tensor) -> torch.Tensor:
            table = value if value.dim() > 1 else value[None]
            return _rows(table, rows).expand(k, -1)[every, columns][:, None]

        return self._arguments(
            layer, cache, mask=mask, positions=positions, shared_cache_position=False,
            embeddings=lambda part: _rows(part, rows).expand(k, *part.shape[1:])[every, columns][:, None])

    def _arguments(self, layer: int, cache: PrefixCache, *, mask: Any, positions: Any, embeddings: Any,
                   shared_cache_position: bool = True) -> dict[str, Any]:
        """Block ``layer``'s captured arguments with the cache replaced and the column-indexed ones cut by the
        caller's functions (``mask``: the 4-d attention mask; ``positions``: position ids / cache positions;
        ``embeddings``: each rotary table); an argument of another kind that holds tensors is refused.
        ``shared_cache_position`` False: a 1-d cache position (one for every row) cannot be cut, and is refused."""
        if layer not in self.per_block:
            raise Unsupported(f"block {layer} was not seen in the baseline pass")
        from transformers.cache_utils import Cache

        out: dict[str, Any] = {}
        for name, value in self.per_block[layer].items():
            if name == self.cache_kwarg or isinstance(value, Cache):  # GPT-NeoX's blocks call it `layer_past`
                out[name] = cache
            elif name == "attention_mask":
                if value is None:  # no padding, causal attention left to the kernel: make the mask explicit
                    value = self.causal_mask(layer)
                if not isinstance(value, torch.Tensor) or value.dim() != 4:
                    raise Unsupported("the blocks take no materialised 4-d attention mask")
                out[name] = mask(value)
            elif name in ("position_ids", "cache_position") and isinstance(value, torch.Tensor):
                if name == "cache_position" and value.dim() < 2 and not shared_cache_position:
                    raise Unsupported("a cache position shared by every row cannot name one column per row")
                out[name] = positions(value)
            elif name == "position_embeddings" and isinstance(value, tuple):
                out[name] = tuple(embeddings(part) for part in value)
            elif isinstance(value, torch.Tensor) or (isinstance(value, tuple) and value):
                raise Unsupported(f"block argument {name!r} is not one this path knows how to slice")
            else:
                out[name] = value
        return out


def _rows(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return value if value.shape[0] == 1 else value[rows.to(value.device)]


class PrefixCache:
    """What a transformers attention layer asks of its cache in one call: ``update`` returns the baseline rows' keys
    and values of the columns before the pass, followed by the pass's own."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_args: Any, **_kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


# -- what can run here ---------------------------------------------------------------------------------------------
def check_batch(batch: Batch, layout: Any, final_norm: str, unembed_module: str | None) -> None:
    """Raise :class:`Unsupported` unless every edit of the batch can be applied here: edits of the cells (stage >= 1)
    must lie between the first block's input and the final norm's output; baseline edits before the first block are
    already in the cached state; nothing may touch the unembedding."""
    first = layout.rank[layout.boundary[0]]
    for patches in batch.accesses:
        key = (patches.module, patches.access)
        if patches.module == unembed_module:
            raise Unsupported("a patch on the unembedding")
        own = any(stage >= 1 for stage in patches.stage_ids)
        if not own:
            continue
        if layout.rank[key] < first:
            raise Unsupported(f"{patches.module} {patches.access} comes before the first block")
        if layout.block_of[key] >= layout.n_layers and patches.module != final_norm:
            raise Unsupported(f"{patches.module} {patches.access} comes after the final norm")


def column_groups(starts: dict[int, tuple[int, int]], width: int, n_layers: int, flops_per_token_block: float,
                  overhead: float = PASS_OVERHEAD_FLOPS) -> list[tuple[int, list[int]]]:
    """Partition rows into passes ``(start column, rows)``: consecutive start columns merged into one pass where a
    pass of their own would save less than ``overhead`` (dynamic programming over the distinct start columns; a
    pass costs ``overhead`` plus its rows' blocks (N - L) x (W - its first column) x flops). The rows of one start
    column are never split: a second pass from the same column would add its overhead and save nothing."""
    by_column: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, col) in starts.items():
        by_column.setdefault(col, []).append((layer, row))
    columns = sorted(by_column)
    weight = [sum(n_layers - layer + 0.05 for layer, _ in by_column[col]) for col in columns]
    best = [0.0] + [float("inf")] * len(columns)
    cut = [0] * (len(columns) + 1)
    for end in range(1, len(columns) + 1):
        blocks = 0.0
        for begin in range(end - 1, -1, -1):
            blocks += weight[begin]
            cost = best[begin] + overhead + blocks * (width - columns[begin]) * flops_per_token_block
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups = []
    end = len(columns)
    while end > 0:
        begin = cut[end]
        rows = [row for col in columns[begin:end] for _, row in sorted(by_column[col])]
        groups.append((columns[begin], rows))
        end = begin
    return groups[::-1]


# -- one pass ------------------------------------------------------------------------------------------------------
def _rows_below(stages: Sequence[tuple], limit: int) -> list[tuple]:
    """Only the edits of pass rows ``< limit`` (the rows already in the pass at that block): a later row's
    baseline edits at this access are in the state it joins with."""
    out = []
    for shapes in stages:
        kept_shapes = tuple(tuple(None if entry is None else entry.select(entry.t_row < limit) for entry in groups)
                            for groups in shapes)
        if any(entry is not None for groups in kept_shapes for entry in groups):
            out.append(kept_shapes)
    return out


def _edited(value: torch.Tensor, n_heads: int, stages: list[tuple]) -> torch.Tensor:
    return kernel.apply_edits(value.clone(), n_heads, stages)


def _hook(module: torch.nn.Module, access: str, n_heads: int, stages: list[tuple]) -> Any:
    if access == "input":
        def pre(_m: Any, args: tuple, kwargs: dict) -> tuple:
            return replace_input(args, kwargs, lambda value: _edited(value, n_heads, stages))
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m: Any, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_edited(output[0], n_heads, stages), *output[1:])
        return _edited(output, n_heads, stages)
    return module.register_forward_hook(post)


def _last_column_only(module: torch.nn.Module) -> Any:
    """A pre-hook on a module of the last block that gives it the last column alone: only the last column of the
    last block reaches the unembedding, and the block's residual additions broadcast the one column over the others
    (which nothing reads). Used on the MLP and on the attention's output projection (whose other columns only
    feed the MLP's); the self-check confirms the broadcast on each model."""
    def pre(_m: Any, args: tuple, kwargs: dict) -> tuple:
        return replace_input(args, kwargs, lambda value: value[:, -1:])
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _last_column_modules(arch: Any, layout: Any, edited: Sequence[Key]) -> list[str]:
    """The last block's modules that may run on the last column alone, given the accesses a pass edits (an edit
    needs its module's whole width): the MLP unless an edit is in it; the attention's output projection unless an
    edit follows the projection's input inside the attention (its output, the attention's output). An edit of the
    projection's input (the head outputs) runs before the cut: its hook comes first."""
    last = layout.n_layers - 1
    mlp, attention = f"{arch.block(last)}.{arch.mlp}", f"{arch.block(last)}.{arch.attn}"

    def inside(module: str, outer: str) -> bool:
        return module == outer or module.startswith(outer + ".")

    out = []
    if not any(inside(module, mlp) for module, _ in edited):
        out.append(mlp)
    mixed = layout.mixed.get(last)
    if mixed is not None and not any(inside(module, attention) and layout.rank[(module, access)] > mixed
                                     for module, access in edited):
        out.append(f"{arch.block(last)}.{arch.out_proj}")
    return out


@dataclass
class Pass:
    """One ragged pass: ``rows`` (batch rows, sorted by first edited block), their start blocks, the column."""

    col: int
    rows: list[int]
    layers: list[int]

    @classmethod
    def of(cls, col: int, rows: Sequence[int], starts: dict[int, tuple[int, int]]) -> Pass:
        ordered = sorted(rows, key=lambda r: starts[r][0])
        return cls(col, ordered, [starts[r][0] for r in ordered])

    def active(self, block: int) -> int:
        """How many of the pass's rows have begun by block ``block``."""
        return bisect.bisect_right(self.layers, block)

    def cut(self, most: int) -> list[Pass]:
        """This pass as passes of at most ``most`` rows (consecutive in first-edited-block order: each is sorted)."""
        return [Pass(self.col, self.rows[low:low + most], self.layers[low:low + most])
                for low in range(0, len(self.rows), most)]


def _pass_hooks(hf: torch.nn.Module, arch: Any, layout: Any, one: Pass, edits: list[tuple], device: torch.device,
                trim: bool = True) -> list[Any]:
    """The hooks of one pass: its edits (each access's, for the rows that have joined by its block), and, with
    ``trim``, the last block's MLP and attention output projection on the last column where no edit needs them
    whole (:func:`_last_column_modules`). The caller removes them."""
    handles, edited = [], []
    for patches, stages in edits:
        key = (patches.module, patches.access)
        if layout.rank[key] < layout.rank[layout.boundary[0]]:
            continue  # baseline edits before the first block: in the state every row joins with
        kept = _rows_below(_on(stages, device), one.active(layout.block_of[key]))
        if kept:
            handles.append(_hook(hf.get_submodule(patches.module), patches.access, patches.n_heads or 0, kept))
            edited.append(key)
    for module in _last_column_modules(arch, layout, edited) if trim else []:
        try:
            handles.append(_last_column_only(hf.get_submodule(module)))
        except AttributeError:  # a block without that module keeps every column
            pass
    return handles


def run_pass(hf: torch.nn.Module, arch: Any, layout: Any, batch: Batch, base: dict[str, Any],
             base_index: torch.Tensor, inputs: BlockInputs, one: Pass, edits: list[tuple],
             late: dict[int, tuple[int, torch.Tensor]] | None = None,
             reuse: dict[int, tuple[int, ...]] | None = None, trim: bool = True) -> torch.Tensor:
    """The final norm's output at the last column, ``[rows, d_model]``, of one pass's rows (unembedded by
    :func:`unembed_metrics`, together with other passes' rows). ``edits``: ``(patches, stages)`` from
    :func:`interventions.suffix.pass_edits` with this pass's row numbering and column shift. ``late``: per batch
    row that joins at the block after its first edited one (``one.layers`` holds that joining block), its start
    column and its first block's output there (:func:`late_columns`); its other columns are the baseline's.
    ``reuse``: per batch row, the columns where its input to its joining block may differ from the baseline's
    (:func:`interventions.projection_reuse.changed_columns`); that block's projections read the baseline's
    (``inputs.projections``) elsewhere. ``trim``: the last block's MLP and output projection on the last column
    (:func:`_pass_hooks`)."""
    device = next(hf.parameters()).device
    targets = base_index[torch.tensor([batch.target_row[r] for r in one.rows])].to(device)
    col = one.col
    blocks = hf.get_submodule(arch.layers)
    late = late or {}
    reuse = reuse or {}
    handles: list[Any] = []
    try:
        handles += _pass_hooks(hf, arch, layout, one, edits, device, trim)
        hidden = base["boundary"][one.layers[0]][targets[:0], col:]
        with torch.no_grad():
            for layer in range(one.layers[0], layout.n_layers + 1):
                n, joined = one.active(layer), hidden.shape[0]
                if n > joined:
                    joining = base["boundary"][layer][targets[joined:n], col:]  # a copy (indexed rows)
                    for i in range(joined, n):
                        if one.rows[i] in late:
                            start, value = late[one.rows[i]]
                            joining[i - joined, start - col] = value
                    hidden = torch.cat([hidden, joining]) if joined else joining
                if layer == layout.n_layers:
                    break
                keys, values = base["cache"][layer]
                cache = PrefixCache(keys[targets[:n], :, :col], values[targets[:n], :, :col]) if col else PrefixCache(
                    None, None)
                split = projection_reuse.BlockReuse.of(one.rows, range(joined, n), reuse, col, targets) \
                    if layer in inputs.projections else None
                block_handles = split.hooks([hf.get_submodule(path) for path in layout.projections[layer]],
                                            inputs.projections[layer]) if split else []
                try:
                    hidden = blocks[layer](hidden, **inputs.for_pass(layer, targets[:n], col, cache))
                finally:
                    for handle in block_handles:
                        handle.remove()
            last = hf.get_submodule(arch.final_norm)(hidden)[:, -1, :]
    finally:
        for handle in handles:
            handle.remove()
    return last


def late_columns(hf: torch.nn.Module, arch: Any, layout: Any, batch: Batch, base: dict[str, Any],
                 base_index: torch.Tensor, inputs: BlockInputs, late: dict[int, tuple[int, int]]
                 ) -> dict[int, tuple[int, torch.Tensor]]:
    """For rows that start late (``late``: batch row -> (first edited block, start column); see
    :func:`interventions.suffix.late_rows`): their first block's output at their start column, with their edits
    there, as ``row -> (column, [d_model])``. One call of each block for all its late rows, whatever their
    columns (each row its own column, the baseline keys and values before it, :meth:`BlockInputs.for_columns`):
    one small call per row and block would each read the block's weights for a handful of tokens."""
    from interventions.suffix import pass_edits

    device = next(hf.parameters()).device
    blocks = hf.get_submodule(arch.layers)
    by_block: dict[int, list[int]] = {}
    for row, (layer, _) in sorted(late.items(), key=lambda item: (item[1][1], item[0])):  # by column
        by_block.setdefault(layer, []).append(row)
    calls = [(layer, part) for layer, rows in sorted(by_block.items()) for part in _by_prefix(rows, late)]
    out: dict[int, tuple[int, torch.Tensor]] = {}
    for layer, rows in calls:
        columns = torch.tensor([late[row][1] for row in rows])
        table = torch.full((len(batch.row_role),), -1, dtype=torch.long)
        table[torch.tensor(rows)] = torch.arange(len(rows))
        handles = []
        try:
            for patches, stages in pass_edits(batch, layout, base, table, layer, 0):
                if layout.block_of[(patches.module, patches.access)] != layer:
                    continue
                kept = _on(_at_own_column(stages, columns), device)
                if kept:
                    handles.append(_hook(hf.get_submodule(patches.module), patches.access, patches.n_heads or 0,
                                         kept))
            targets = base_index[torch.tensor([batch.target_row[r] for r in rows])].to(device)
            hidden = base["boundary"][layer][targets, columns.to(device)].unsqueeze(1)
            with torch.no_grad():
                result = blocks[layer](hidden, **inputs.for_columns(layer, targets, columns.to(device), base))
        finally:
            for handle in handles:
                handle.remove()
        for i, row in enumerate(rows):
            out[row] = (late[row][1], result[i, 0])
    return out


def _by_prefix(rows: list[int], late: dict[int, tuple[int, int]]) -> list[list[int]]:
    """Rows (sorted by column) cut into calls whose rows x (longest prefix + 1) stay within :data:`PASS_TOKENS`: each
    row of a call holds the baseline keys and values of as many columns as the call's rightmost row."""
    calls: list[list[int]] = []
    for row in rows:
        if calls and (len(calls[-1]) + 1) * (late[row][1] + 1) <= PASS_TOKENS:
            calls[-1].append(row)
        else:
            calls.append([row])
    return calls


def _at_own_column(stages: list[tuple], columns: torch.Tensor) -> list[tuple]:
    """Edits of rows numbered into a :func:`late_columns` call, kept at each row's own column (renumbered 0)."""
    out = []
    for shapes in stages:
        moved = tuple(tuple(None if entry is None else entry.with_(t_col=torch.zeros_like(entry.t_col)).select(
            entry.t_col == columns[entry.t_row]) for entry in groups) for groups in shapes)
        if any(entry is not None for groups in moved for entry in groups):
            out.append(moved)
    return out


def unembed_metrics(hf: torch.nn.Module, arch: Any, batch: Batch, base: dict[str, Any], base_index: torch.Tensor,
                    rows: Sequence[int], last: torch.Tensor, metric_dtype: torch.dtype,
                    needs: kernel.MetricNeeds = kernel.ALL_METRICS) -> torch.Tensor:
    """``[rows, 5]`` metrics of batch rows ``rows`` from their final norm's output at the last column (``last``),
    :data:`UNEMBED_ROWS` rows at a time: one unembedding for the rows of many passes reads the vocabulary's weights
    once, not once per pass, and the float64 log-probabilities stay ``UNEMBED_ROWS x vocabulary``.

    ``needs`` says which columns the caller reads: without ``kl`` the KL divergence is not computed (NaN); without
    ``vocabulary`` only the answer and wrong sets' logits are (a product with those rows of a linear unembedding's
    weight: :func:`token_logits`), and the probability and log-probability are NaN too."""
    device = last.device
    index = torch.tensor(list(rows))
    answer_index, answer_mask, wrong_index, wrong_mask = (t[index].to(device) for t in (
        batch.answer_index, batch.answer_mask, batch.wrong_index, batch.wrong_mask))
    clean = base_index[batch.clean_row[index]].to(base["logprobs"].device)
    unembed = hf.get_submodule(arch.unembed)
    by_tokens = not needs.vocabulary and isinstance(unembed, torch.nn.Linear)
    out = []
    with torch.no_grad():
        for low in range(0, len(index), UNEMBED_ROWS):
            part = slice(low, low + UNEMBED_ROWS)
            if by_tokens:
                tokens, answer_at, wrong_at = kernel.answer_tokens(answer_index[part], wrong_index[part])
                metrics = kernel.reduce_token_metrics(token_logits(unembed, last[part], tokens), answer_at,
                                                      answer_mask[part], wrong_at, wrong_mask[part],
                                                      dtype=metric_dtype)
            else:
                metrics, _ = kernel.reduce_metrics(
                    unembed(last[part]), answer_index[part], answer_mask[part], wrong_index[part], wrong_mask[part],
                    clean_logprobs=base["logprobs"][clean[part]].to(device) if needs.kl else None,
                    dtype=metric_dtype)
            out.append(metrics.cpu())
    return torch.cat(out) if out else torch.empty((0, base["metrics"].shape[1]), dtype=base["metrics"].dtype)


def token_logits(unembed: torch.nn.Linear, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[rows, len(tokens)]``: the logits of ``tokens`` alone, ``unembed(hidden)[:, tokens]`` without the rest of
    the vocabulary (the rows of the weight, and of the bias, that those tokens use)."""
    tokens = tokens.to(unembed.weight.device)
    bias = unembed.bias[tokens] if unembed.bias is not None else None
    return torch.nn.functional.linear(hidden, unembed.weight[tokens], bias)


def _on(stages: list[tuple], device: torch.device) -> list[tuple]:
    from interventions.full_traces import _moved

    return _moved(stages, device)


def _baseline_rows(batch: Batch, **changes: Any) -> tuple[list[int], Batch]:
    """The batch's baseline rows, and the batch with each row its own target (so a check can run those rows as if
    they were patched ones), with ``changes`` to its fields."""
    rows = [r for r, role in enumerate(batch.row_role) if role != "patched"]
    return rows, Batch(**{**batch.__dict__, "target_row": list(range(len(batch.row_role))), **changes})


def self_check(hf: torch.nn.Module, arch: Any, layout: Any, batch: Batch, base: dict[str, Any],
               base_index: torch.Tensor, inputs: BlockInputs, metric_dtype: torch.dtype, trim: bool = True) -> float:
    """Run the baseline rows themselves on this path (from the first block, every column, with their baseline
    interventions; ``trim``: the last block's cuts to the last column, as the passes run it) and return the
    largest difference from the metrics of the model's own forward pass, unembedded both over the whole vocabulary
    and over the answer tokens alone. Catches an architecture whose forward does something between or after its
    blocks (or to its logits) that calling them one by one would miss."""
    from interventions.suffix import pass_edits

    rows, probe = _baseline_rows(batch)
    one = Pass(0, rows, [0] * len(rows))
    table = torch.full((len(batch.row_role),), -1, dtype=torch.long)
    table[torch.tensor(rows)] = torch.arange(len(rows))
    edits = pass_edits(probe, layout, base, table, 0, 0)  # the baseline rows' own (baseline) interventions
    last = run_pass(hf, arch, layout, probe, base, base_index, inputs, one, edits, trim=trim)
    got = unembed_metrics(hf, arch, probe, base, base_index, one.rows, last, metric_dtype)
    want = base["metrics"][base_index[torch.tensor(rows)]]
    by_tokens = unembed_metrics(hf, arch, probe, base, base_index, one.rows, last, metric_dtype,
                                kernel.MetricNeeds(kl=False, vocabulary=False))  # the unembedding's answer rows
    got = torch.cat([got, by_tokens[:, :2]], dim=1)
    want = torch.cat([want, want[:, :2]], dim=1)
    finite = torch.isfinite(want) & torch.isfinite(got)
    if not bool((torch.isfinite(want) == torch.isfinite(got)).all()):
        return float("inf")
    return float((got[finite] - want[finite]).abs().max()) if bool(finite.any()) else 0.0


def _late_self_check(hf: torch.nn.Module, arch: Any, layout: Any, batch: Batch, base: dict[str, Any],
                     base_index: torch.Tensor, inputs: BlockInputs) -> float:
    """The first block run one column per baseline row (:func:`late_columns`, each row at another column, so the
    padded and masked prefixes differ) against the same block run on every column (:meth:`BlockInputs.for_pass`):
    the largest difference, or infinity when the one-column call fails. Checks, once per model, that its mask,
    positions and cache arguments can be cut to one column per row; a model that fails runs every row from its
    first edited block instead (still exact)."""
    rows, probe = _baseline_rows(batch, accesses=[])  # no edits either side: the architecture, not the batch
    width = batch.input_ids.shape[1]
    late = {row: (0, width - 1 - (i % min(3, width))) for i, row in enumerate(rows)}
    device = next(hf.parameters()).device
    targets = base_index[torch.tensor(rows)].to(device)
    try:
        got = late_columns(hf, arch, layout, probe, base, base_index, inputs, late)
        with torch.no_grad():
            full = hf.get_submodule(arch.layers)[0](base["boundary"][0][targets],
                                                    **inputs.for_pass(0, targets, 0, PrefixCache(None, None)))
    except Exception:  # noqa: BLE001 - whatever breaks here, the late start is not for this model
        return float("inf")
    gaps = [float((got[row][1] - full[i, got[row][0]]).abs().max()) for i, row in enumerate(rows)
            if bool(batch.attention_mask[row, got[row][0]])]  # a padding column's output is never read
    return max(gaps, default=0.0)


def reuse_self_check(hf: torch.nn.Module, arch: Any, layout: Any, batch: Batch, base: dict[str, Any],
                     base_index: torch.Tensor, inputs: BlockInputs) -> float | None:
    """A block whose projections are read from the baseline (:mod:`interventions.projection_reuse`) against the
    same block run on its whole input, with one column of each baseline row changed (to the next row's state
    there, plus 0.5): the largest difference over the real (unpadded) columns, or infinity when the call fails.
    Checks, once per model, that the architecture's projections are per-token functions of the block's input and
    what the baseline pass captured of them. None: no captured block of this batch is free of baseline
    interventions at its input (the captured projections would then include them); the next batch tries again."""
    from interventions.projection_reuse import BlockReuse

    intervened = {layout.block_of[key] for patches in batch.accesses
                  if (key := (patches.module, patches.access)) == layout.boundary.get(layout.block_of[key])
                  and 0 in patches.stage_ids}
    layer = min((layer for layer in inputs.projections if layer not in intervened), default=None)
    if layer is None:
        return None
    rows, _ = _baseline_rows(batch)
    device = next(hf.parameters()).device
    targets = base_index[torch.tensor(rows)].to(device)
    hidden = base["boundary"][layer][targets]
    width = hidden.shape[1]
    columns = [width - 1 - (i % min(3, width)) for i in range(len(rows))]
    changed = hidden.clone()
    every = torch.arange(len(rows), device=device)
    at = torch.tensor(columns, device=device)
    changed[every, at] = hidden[(every + 1) % len(rows), at] + 0.5
    split = BlockReuse.of(rows, range(len(rows)), {row: (c,) for row, c in zip(rows, columns, strict=True)}, 0,
                          targets)
    block = hf.get_submodule(arch.layers)[layer]
    try:
        with torch.no_grad():
            want = block(changed, **inputs.for_pass(layer, targets, 0, PrefixCache(None, None)))
            handles = split.hooks([hf.get_submodule(path) for path in layout.projections[layer]],
                                  inputs.projections[layer])
            try:
                got = block(changed, **inputs.for_pass(layer, targets, 0, PrefixCache(None, None)))
            finally:
                for handle in handles:
                    handle.remove()
    except Exception:  # noqa: BLE001 - whatever breaks here, the reuse is not for this model
        return float("inf")
    real = batch.attention_mask[torch.tensor(rows)].bool().to(device)
    return float((got - want).abs()[real].max()) if bool(real.any()) else 0.0


class RaggedPath:
    """The ragged path for one local model: checks batches, captures the blocks' arguments during the baseline
    pass, checks itself once against the model's own forward pass, then runs the passes."""

    def __init__(self, hf: torch.nn.Module, layout: Any):
        from clap.architectures import architecture_of

        self.hf, self.layout = hf, layout
        self.arch = architecture_of(hf)
        #: the self-check's result (the first batch's; None: not run yet on this model)
        self.self_check_gap: float | None = _SELF_CHECKS.get(hf)
        #: the late start's own check (:func:`_late_self_check`; None: not run yet on this model)
        self.late_gap: float | None = _LATE_CHECKS.get(hf)
        #: the projection reuse's check (:func:`reuse_self_check`; None: not run yet on this model)
        self.reuse_gap: float | None = _REUSE_CHECKS.get(hf)
        #: whether the last block runs its MLP and output projection on the last column (the self-check's finding)
        self.trim: bool = _TRIMS.get(hf, True)

    @property
    def late_ok(self) -> bool:
        """Whether late rows run one column per row on this model (its check passed, or has not run yet)."""
        return self.late_gap is None or self.late_gap <= SELF_CHECK_TOLERANCE

    def check(self, batch: Batch, unembed_module: str | None) -> None:
        if self.self_check_gap is not None and not self.self_check_gap <= SELF_CHECK_TOLERANCE:
            raise Unsupported(f"the self-check found a difference of {self.self_check_gap:.2e} on this model")
        check_batch(batch, self.layout, self.arch.final_norm, unembed_module)

    @property
    def reuse_ok(self) -> bool:
        """Whether joining rows read their projections from the baseline on this model (its check passed, or has
        not run yet)."""
        return self.reuse_gap is None or self.reuse_gap <= SELF_CHECK_TOLERANCE

    @contextmanager
    def capturing(self, projection_layers: Sequence[int] | set[int] = ()) -> Iterator[BlockInputs]:
        """While open (around the baseline pass): the blocks' arguments, and the projections' outputs of the
        blocks ``projection_layers`` (where rows may join and read them: :mod:`interventions.projection_reuse`)."""
        layers = sorted(layer for layer in projection_layers if layer in self.layout.projections) \
            if self.reuse_ok else []
        with BlockInputs.capture(self.hf.get_submodule(self.arch.layers), self.layout.cache_kwarg) as found, \
                projection_reuse.capture(self.hf, self.layout, layers, found.projections):
            yield found

    def run(self, batch: Batch, base: dict[str, Any], base_index: torch.Tensor, inputs: BlockInputs,
            starts: dict[int, tuple[int, int]], metrics: torch.Tensor,
            needs: kernel.MetricNeeds = kernel.ALL_METRICS, late: set[int] | frozenset[int] = frozenset(),
            counts: dict[str, int] | None = None) -> torch.Tensor:
        """Fill ``metrics`` (the batch's, baseline rows already in place) for the rows of ``starts``, with the
        columns ``needs`` names (the others NaN: :func:`unembed_metrics`). ``late``: rows that run their first
        edited block on their start column alone (:func:`interventions.suffix.late_rows`). ``counts`` gets
        ``reused_rows``: the rows whose joining block read its projections from the baseline."""
        from interventions.full_traces import metric_dtype_for
        from interventions.suffix import pass_edits

        metric_dtype = metric_dtype_for(next(self.hf.parameters()).device)
        if self.self_check_gap is None:
            self._check_self(batch, base, base_index, inputs, metric_dtype)
        n_rows, width = batch.input_ids.shape
        if late and self.late_gap is None:
            self.late_gap = _late_self_check(self.hf, self.arch, self.layout, batch, base, base_index, inputs)
            _LATE_CHECKS[self.hf] = self.late_gap
        if not self.late_ok:
            late = set()  # this model's blocks cannot run one column per row: those rows start at their block
        late_values = late_columns(self.hf, self.arch, self.layout, batch, base, base_index, inputs,
                                   {row: starts[row] for row in late})
        joins = {row: (layer + 1, col) if row in late else (layer, col) for row, (layer, col) in starts.items()}
        reuse = self._reuse(batch, base, base_index, inputs, joins, late)
        if counts is not None:
            counts["reused_rows"] = counts.get("reused_rows", 0) + len(reuse)
        passes = [one for col, rows in column_groups(joins, width, self.layout.n_layers,
                                                     self.layout.flops_per_token_block)
                  for one in Pass.of(col, rows, joins).cut(max(1, PASS_TOKENS // (width - col)))]
        rows, lasts = [], []
        for one in passes:
            table = torch.full((n_rows,), -1, dtype=torch.long)
            table[torch.tensor(one.rows)] = torch.arange(len(one.rows))
            edits = pass_edits(batch, self.layout, base, table, 0, one.col)
            lasts.append(run_pass(self.hf, self.arch, self.layout, batch, base, base_index, inputs, one, edits,
                                  late_values, reuse, self.trim))
            rows += one.rows
        if rows:
            metrics[rows] = unembed_metrics(self.hf, self.arch, batch, base, base_index, rows, torch.cat(lasts),
                                            metric_dtype, needs)
        return metrics

    def _check_self(self, batch: Batch, base: dict[str, Any], base_index: torch.Tensor, inputs: BlockInputs,
                    metric_dtype: torch.dtype) -> None:
        """Run :func:`self_check` with the last block's cuts to the last column, and without them when that fails
        (a model whose last block cannot be cut runs whole there, on this path still); keep the verdict for this
        model object, and raise :class:`Unsupported` when the path fails it either way."""
        error: Exception | None = None
        for trim in (True, False):
            try:
                gap = self_check(self.hf, self.arch, self.layout, batch, base, base_index, inputs, metric_dtype,
                                 trim=trim)
            except (MemoryError, torch.OutOfMemoryError) as exc:  # this batch was too large, not a verdict
                raise Unsupported(f"the self-check ran out of memory ({type(exc).__name__}); this batch runs full"
                                  ) from exc
            except Exception as exc:  # noqa: BLE001 - whatever breaks here, this path is not for this model
                gap, error = float("inf"), exc
            if trim:
                first = gap
            if gap <= SELF_CHECK_TOLERANCE:
                break
        self.trim = _TRIMS[self.hf] = trim
        # a verdict on the architecture, kept for this model object (the cut last block's when both fail)
        self.self_check_gap = _SELF_CHECKS[self.hf] = gap if gap <= SELF_CHECK_TOLERANCE else first
        if error is not None and not gap <= SELF_CHECK_TOLERANCE:
            raise Unsupported(f"the self-check could not run on this model ({type(error).__name__}: {error})"
                              ) from error
        if not self.self_check_gap <= SELF_CHECK_TOLERANCE:
            raise Unsupported(f"the self-check found a difference of {self.self_check_gap:.2e} on this model")

    def _reuse(self, batch: Batch, base: dict[str, Any], base_index: torch.Tensor, inputs: BlockInputs,
               joins: dict[int, tuple[int, int]], late: set[int] | frozenset[int]) -> dict[int, tuple[int, ...]]:
        """The rows that read their joining block's projections from the baseline, with the columns they compute
        (:func:`interventions.projection_reuse.changed_columns`), once this model passed :func:`reuse_self_check`
        (run here the first time; a batch where it cannot run reuses nothing)."""
        if not inputs.projections or not self.reuse_ok:
            return {}
        columns = projection_reuse.changed_columns(batch, self.layout, joins, late, inputs.projections)
        if columns and self.reuse_gap is None:
            gap = reuse_self_check(self.hf, self.arch, self.layout, batch, base, base_index, inputs)
            if gap is None:
                return {}
            self.reuse_gap = _REUSE_CHECKS[self.hf] = gap
        return columns if self.reuse_ok else {}
