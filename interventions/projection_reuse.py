"""A joining row's query, key and value projections, read from its baseline row where its input is the baseline's.

A row joins a ragged pass (:mod:`interventions.ragged`) at its first edited block ``J`` with its baseline row's
residual stream, changed at a few columns only: those its edits at ``J``'s input write, and for a row that started
late (:func:`interventions.suffix.late_rows`) the start column its block ``J - 1`` changed. At every other column
the block's input is the baseline row's, and so is everything the block computes from that column alone before the
attention mixes columns: the norm and the projections that make the queries, keys and values. The baseline pass
has computed those (for the baseline rows, whole width), so block ``J`` needs the projections only at the changed
columns; the rest of the block (attention over every column, the output projection, the MLP) still runs on every
column of the pass, as it must: each later column attends to the changed ones.

Which projections those are is the architecture's (``ArchitectureMap.qkv``: GPT-2's fused ``attn.c_attn``,
Llama's ``q_proj``/``k_proj``/``v_proj``, GPT-NeoX's ``query_key_value``); a block whose projections are not all
found, or where the batch edits anything between the block's input and the last projection's output, runs as
before. The saving is a quarter of a GPT-2 block's weights' work on every column of a row's first block but the
changed ones. Each model is checked once (:func:`interventions.ragged.reuse_self_check`): a block run with a column
changed and the other columns' projections read from the baseline must equal the block run on its whole input.

The projections are replaced for one block call by a forward pre-hook that hands the module only the rows and
columns to compute (as a flat ``[tokens, d]`` input, which ``nn.Linear`` and GPT-2's ``Conv1D`` both take) and a
forward hook that lays the result out with the baseline's values elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from interventions.module_input import replace_input
from interventions.plan import Batch

Key = tuple[str, str]


def reusable_blocks(batch: Batch, layout: Any) -> set[int]:
    """Blocks whose projections a joining row may read from its baseline row: the layout knows them, and no access
    of the batch lies after the block's input and up to the last projection's output (an edit there, say on the
    norm or a projection itself, would change values this module reads from the baseline)."""
    blocked = set()
    for patches in batch.accesses:
        key = (patches.module, patches.access)
        block = layout.block_of[key]
        if block in layout.projected and layout.rank[layout.boundary[block]] < layout.rank[key] \
                <= layout.projected[block]:
            blocked.add(block)
    return set(layout.projections) - blocked


def changed_columns(batch: Batch, layout: Any, joins: dict[int, tuple[int, int]], late: Iterable[int],
                    blocks: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """Per row of ``joins`` (batch row -> (joining block, start column)) whose joining block is one of ``blocks``
    (those :func:`reusable_blocks` allows and whose projections the baseline pass captured): the padded columns
    where its input to that block may differ from its baseline row's. They are the columns any edit at the block's
    input writes for the row (its own and its baseline interventions alike: computing a column that did not change
    costs a little and changes nothing), and a late row's start column. An empty tuple: the row's input to the
    block is the baseline's everywhere (its first edits follow the projections)."""
    blocks, late = set(blocks), set(late)
    found = {row: ({col} if row in late else set()) for row, (block, col) in joins.items() if block in blocks}
    inputs = {key: block for block, key in layout.boundary.items()}
    for patches in batch.accesses:
        block = inputs.get((patches.module, patches.access))
        if block is None:
            continue
        for groups in patches.stages:
            for group in groups:
                for entry in group.as_tuple():
                    if entry is None:
                        continue
                    for row, col in zip(entry.t_row.tolist(), entry.t_col.tolist(), strict=True):
                        if row in found and joins[row][0] == block:
                            found[row].add(col)
    return {row: tuple(sorted(cols)) for row, cols in found.items()}


@contextmanager
def capture(hf: torch.nn.Module, layout: Any, layers: Iterable[int], into: dict[int, dict[int, torch.Tensor]]
            ) -> Iterator[dict[int, dict[int, torch.Tensor]]]:
    """While open, each forward of block ``layer``'s projections (``layers``) stores its output in
    ``into[layer][i]`` (``i``: the projection's place in ``layout.projections[layer]``). Opened around the baseline
    pass, whose rows are the baseline rows, whole width."""
    handles = []
    try:
        for layer in layers:
            for i, path in enumerate(layout.projections[layer]):
                def keep(_module: Any, _args: Any, output: torch.Tensor, layer: int = layer, i: int = i) -> None:
                    into.setdefault(layer, {})[i] = output
                handles.append(hf.get_submodule(path).register_forward_hook(keep))
        yield into
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BlockReuse:
    """One block call's split: pass rows ``computed`` get their projections on every column; pass rows ``reused``
    read them from their baseline rows (``baseline_rows``, numbered as in the baseline pass) and get them computed
    only at (``fresh_rows``, ``fresh_cols``: pass row, pass column)."""

    computed: torch.Tensor
    reused: torch.Tensor
    baseline_rows: torch.Tensor
    fresh_rows: torch.Tensor
    fresh_cols: torch.Tensor
    col: int  #: the pass's first padded column (its column 0)

    @classmethod
    def of(cls, pass_rows: Sequence[int], joining: range, columns: dict[int, tuple[int, ...]], col: int,
           targets: torch.Tensor) -> BlockReuse | None:
        """The split for a block where pass rows ``joining`` join (``pass_rows``: their batch rows; ``columns``:
        :func:`changed_columns`; ``targets``: each pass row's baseline-pass row). None: no joining row reuses."""
        reused = [i for i in joining if pass_rows[i] in columns]
        if not reused:
            return None
        taken = set(reused)
        fresh = [(i, c - col) for i in reused for c in columns[pass_rows[i]] if c >= col]
        device = targets.device
        return cls(
            computed=torch.tensor([i for i in range(joining.stop) if i not in taken], dtype=torch.long, device=device),
            reused=torch.tensor(reused, dtype=torch.long, device=device),
            baseline_rows=targets[torch.tensor(reused, dtype=torch.long, device=device)],
            fresh_rows=torch.tensor([i for i, _ in fresh], dtype=torch.long, device=device),
            fresh_cols=torch.tensor([c for _, c in fresh], dtype=torch.long, device=device),
            col=col)

    def hooks(self, modules: Sequence[torch.nn.Module], baseline: dict[int, torch.Tensor]) -> list[Any]:
        """Pre- and forward hooks on each projection (``baseline[i]``: the baseline pass's output of
        ``modules[i]``) for one block call; the caller removes the handles after it."""
        handles = []
        for i, module in enumerate(modules):
            shape: dict[str, torch.Size] = {}

            def pre(_m: Any, args: tuple, kwargs: dict, shape: dict = shape) -> tuple:
                def compact(x: torch.Tensor) -> torch.Tensor:
                    shape["x"] = x.shape
                    whole = x[self.computed].reshape(len(self.computed) * x.shape[1], x.shape[-1])
                    return torch.cat([whole, x[self.fresh_rows, self.fresh_cols]])
                return replace_input(args, kwargs, compact)

            def post(_m: Any, _args: Any, output: torch.Tensor, shape: dict = shape, i: int = i) -> torch.Tensor:
                rows, width = shape["x"][0], shape["x"][1]
                n_computed = len(self.computed) * width
                out = output.new_empty((rows, width, output.shape[-1]))
                out[self.computed] = output[:n_computed].view(len(self.computed), width, output.shape[-1])
                out[self.reused] = baseline[i][self.baseline_rows, self.col:self.col + width].to(output.dtype)
                out[self.fresh_rows, self.fresh_cols] = output[n_computed:]
                return out

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        return handles
