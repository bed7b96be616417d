"""Right alignment: the one place that knows how token indices, padded columns and prompts of different lengths
line up.

Why one module: every batch is left-padded (the last column is each row's last token, where the metric is read),
and prompts of different lengths are aligned from the end (``alignment: right``; a strict study has equal lengths,
where the same rule is the identity). The same arithmetic is needed to lay out batches, to pair a target token with
its source counterpart, to shift a substring match found in the other prompt, to read an unpadded activation back
out of a padded capture and to index per-position attributions; written once here, it cannot drift between them.

>>> counterpart(5, n_target=8, n_source=6)          # the 6th of 8 target tokens <-> the 4th of 6 source tokens
3
>>> aligned_pairs([0, 1, 7], n_target=8, n_source=6)  # tokens 0 and 1 have no counterpart
[(7, 5)]
>>> column(7, n_tokens=8, width=10)                 # the last token sits in the last column
9
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only left_pad builds tensors; the probe reader imports this module without torch
    import torch


def counterpart(index: int, n_target: int, n_source: int) -> int:
    """The source index aligned with target index ``index`` (counted from the end); negative: none."""
    return index - n_target + n_source


def aligned_pairs(indices: Iterable[int], n_target: int, n_source: int,
                  keep_unmatched: bool = False) -> list[tuple[int, int]]:
    """(target index, source index) pairs; tokens without a source counterpart are dropped unless
    ``keep_unmatched`` (operations that do not read the source run act on every selected target token)."""
    pairs = [(i, counterpart(i, n_target, n_source)) for i in indices]
    return pairs if keep_unmatched else [(i, j) for i, j in pairs if j >= 0]


def column(index: int, n_tokens: int, width: int) -> int:
    """The padded column of token ``index`` of a prompt of ``n_tokens`` in a left-padded batch ``width`` wide."""
    return width - n_tokens + index


def shift_to(indices: Iterable[int], n_from: int, n_to: int) -> tuple[int, ...]:
    """Indices found in a prompt of ``n_from`` tokens, as indices of the aligned prompt of ``n_to`` tokens (those
    that fall before its start dropped)."""
    return tuple(j for j in (counterpart(i, n_from, n_to) for i in indices) if j >= 0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every prompt right-aligned: the last column is each row's last token."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, column(0, len(ids), width):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, column(0, len(ids), width):] = 1
    return input_ids, attention_mask


def unpad(padded: torch.Tensor, row: int, n_tokens: int) -> torch.Tensor:
    """Row ``row`` of a left-padded ``[rows, width, ...]`` tensor without its padding: ``[n_tokens, ...]``."""
    return padded[row, column(0, n_tokens, padded.shape[1]):]
