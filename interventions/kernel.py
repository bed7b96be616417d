"""The edit kernel: what an intervention does to an activation, and how a forward pass becomes metrics.

Every substrate that runs patched rows (full nnsight traces, the suffix strategy's baseline pass, the ragged path's
forward hooks) applies a module access's edits with :func:`apply_edits`, and every one of them, attribution patching
and ``clap probes check`` included, reduces last-position logits to metrics with :func:`reduce_metrics`. An
operation therefore has one meaning, written once, whatever runs it.

The module imports nothing but torch: the nnsight trace bodies call these functions, and on NDIF (or nnsight's
local simulation of it) the module is shipped by value (:func:`register_for_remote`), so the server needs no clap.

Edits are vectorised over the rows they touch. At one module access the value ``x`` (``[rows, cols, width]``, or
viewed per head as ``[rows, cols, n_heads, head_dim]``) is edited in four modes, in this order:

* ``copy``: ``x[t] = x[s]`` (a source row of the same pass), or ``x[t] = values`` when the source was captured
  beforehand (a suffix pass, where the source row is not present);
* ``set``: ``x[t] = values``;
* ``add``: ``x[t] = x[t] + values``;
* ``mix``: ``x[t] = x[t] + alpha * (x[s] - x[t])``, or towards ``values`` (another model's activations, a captured
  source).

``t`` is ``(t_row, t_col)`` (plus ``head`` on the per-head view), ``s`` is ``(s_row, s_col)`` likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

#: the modes of an edit, in the order they are applied at one access
MODES = ("copy", "set", "add", "mix")


@dataclass(frozen=True)
class Edits:
    """Edits of one mode at one module access, one entry per (row, column[, head]) written.

    ``values`` has one row per entry (``[n, width]`` or ``[n, head_dim]``); ``alpha`` is ``[n, 1]``. Which fields
    a mode needs: copy (``s_row``/``s_col`` or ``values``), set and add (``values``), mix (``alpha`` and
    ``s_row``/``s_col`` or ``values``)."""

    t_row: torch.Tensor
    t_col: torch.Tensor
    head: torch.Tensor  #: -1 for whole-width edits
    s_row: torch.Tensor | None = None
    s_col: torch.Tensor | None = None
    values: torch.Tensor | None = None
    alpha: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.t_row.shape[0])

    def select(self, keep: torch.Tensor) -> Edits | None:
        """The entries where ``keep`` (a bool mask over entries) holds; None when none is left."""
        if bool(keep.all()):
            return self
        if not bool(keep.any()):
            return None
        return Edits(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[keep])
                        for f in fields(self)})

    def with_(self, **changes: torch.Tensor | None) -> Edits:
        """A copy with some fields replaced (rows renumbered, columns shifted, a source given as values)."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> Edits:
        return Edits(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                        for f in fields(self)})


#: one shape's edits at one access: ``(copy, set, add, mix)``, each :class:`Edits` or None
EditGroup = tuple
#: one stage at one access: ``(whole-width group, per-head group)``
EditStage = tuple


def _target(edits: Edits, by_head: bool) -> tuple:
    return (edits.t_row, edits.t_col, edits.head) if by_head else (edits.t_row, edits.t_col)


def _source(view: torch.Tensor, edits: Edits, by_head: bool) -> torch.Tensor:
    if edits.values is not None:
        return edits.values.to(view.dtype)
    return view[(edits.s_row, edits.s_col, edits.head) if by_head else (edits.s_row, edits.s_col)]


def apply_edits(value: torch.Tensor, n_heads: int, stages: Sequence[EditStage]) -> torch.Tensor:
    """Apply one module access's edits to ``value`` in place and return it.

    ``stages`` are applied one after the other (baseline interventions, then the cells' own, so a restore at a
    noised token overwrites the noise); within a stage the whole-width group comes first, then the per-head group on
    the ``[rows, cols, n_heads, head_dim]`` view (``n_heads`` 0: no per-head edits). The caller passes a copy: the
    live activation may have other readers (q/k/v projections share their input; a norm's input is the residual)."""
    for full, heads in stages:
        views = [(value, full, False)]
        if n_heads:
            views.append((value.view(value.shape[0], value.shape[1], n_heads, -1), heads, True))
        for view, (copy, set_, add, mix), by_head in views:
            if copy is not None:
                view[_target(copy, by_head)] = _source(view, copy, by_head)
            if set_ is not None:
                view[_target(set_, by_head)] = set_.values.to(view.dtype)
            if add is not None:
                target = _target(add, by_head)
                view[target] = view[target] + add.values.to(view.dtype)
            if mix is not None:
                target = _target(mix, by_head)
                towards = _source(view, mix, by_head)
                view[target] = view[target] + mix.alpha.to(view.dtype) * (towards - view[target])
    return value


def edit_access(original: object, n_heads: int, stages: Sequence[EditStage]) -> object:
    """An access's edited value in the shape the module gave it: a tuple keeps its other members. The activation
    (the tuple's first member) is cloned before :func:`apply_edits` writes into it."""
    value = original[0] if isinstance(original, tuple) else original
    edited = apply_edits(value.clone(), n_heads, stages)
    return (edited, *original[1:]) if isinstance(original, tuple) else edited


def set_mean(logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean logit over a token set (``index`` ``[rows, k]`` padded, ``mask`` 1 where real), in the
    logits' dtype."""
    mask = mask.to(logits.dtype)
    return (logits.gather(1, index) * mask).sum(1) / mask.sum(1)


def logit_difference(logits: torch.Tensor, answer_index: torch.Tensor, answer_mask: torch.Tensor,
                     wrong_index: torch.Tensor, wrong_mask: torch.Tensor) -> torch.Tensor:
    """Mean answer-set logit minus mean wrong-set logit, per row, in the logits' dtype (differentiable: attribution
    takes its gradient)."""
    return set_mean(logits, answer_index, answer_mask) - set_mean(logits, wrong_index, wrong_mask)


def token_sets(sets: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, mask)`` for per-row token sets of different sizes: ids padded with 0, mask 1 where real."""
    width = max(1, max((len(s) for s in sets), default=1))
    index = torch.zeros((len(sets), width), dtype=torch.long)
    mask = torch.zeros((len(sets), width), dtype=torch.float32)  # exact 0/1; cast to the logits' dtype where used
    for row, ids in enumerate(sets):
        index[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, : len(ids)] = 1.0
    return index, mask


def reduce_metrics(logits: torch.Tensor, answer_index: torch.Tensor, answer_mask: torch.Tensor,
                   wrong_index: torch.Tensor, wrong_mask: torch.Tensor, *, clean_row: torch.Tensor | None = None,
                   clean_logprobs: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([rows, 5] metrics, [rows, vocab] log-probabilities)`` from last-position logits ``[rows, vocab]``.

    The metrics, in the results contract's order: logit difference (mean answer-set logit minus mean wrong-set
    logit), answer logit, probability and log-probability of the answer set (logsumexp over the set: exact where the
    probability underflows), and the KL divergence from each row's clean run: ``clean_logprobs`` given, or the
    log-probabilities of row ``clean_row[i]`` of these same logits (NaN when neither is given). Reduced in ``dtype``
    (float64 unless the device has none): a float32 sum over a large vocabulary is off in the fifth digit, and the
    reduction order would make numbers depend on what else shares the batch. Index/mask tensors are ``[rows, k]``
    token ids padded with 0 and masks with 1 where the id is real."""
    logits = logits.to(dtype)
    logprobs = torch.log_softmax(logits, dim=-1)
    answer_logit = set_mean(logits, answer_index, answer_mask)
    wrong_logit = set_mean(logits, wrong_index, wrong_mask)
    answer_logprobs = logprobs.gather(1, answer_index).masked_fill(answer_mask == 0, float("-inf"))
    logprob = torch.logsumexp(answer_logprobs, dim=1)
    if clean_logprobs is None and clean_row is not None:
        clean_logprobs = logprobs[clean_row]
    if clean_logprobs is None:
        kl = torch.full_like(logprob, float("nan"))
    else:
        clean_logprobs = clean_logprobs.to(dtype)
        kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(1)
    metrics = torch.stack([answer_logit - wrong_logit, answer_logit, logprob.exp(), logprob, kl], dim=1)
    return metrics, logprobs


#: metrics that need the whole vocabulary's logits (a softmax over it); the others read the answer sets' logits only
VOCABULARY_METRICS = ("prob", "logprob", "kl")


@dataclass(frozen=True)
class MetricNeeds:
    """What a caller reads of :func:`reduce_metrics`' columns, so a local path can leave out what nobody reads.

    ``kl``: the KL divergence from the clean run (a float64 pass over the vocabulary per row). ``vocabulary``: any
    metric over the whole vocabulary (probability, log-probability, KL); without it only the answer and wrong sets'
    logits are computed (:func:`reduce_token_metrics`), and the unembedding multiplies the last hidden state by
    those few rows of its weight instead of the whole vocabulary's."""

    kl: bool = True
    vocabulary: bool = True

    @classmethod
    def of(cls, metrics: Sequence[str] | None) -> MetricNeeds:
        """The needs of a list of metric names (None: every metric)."""
        if metrics is None:
            return cls()
        return cls(kl="kl" in metrics, vocabulary=any(m in VOCABULARY_METRICS for m in metrics))


#: every metric column: what a caller that does not say what it reads gets
ALL_METRICS = MetricNeeds()


def answer_tokens(answer_index: torch.Tensor, wrong_index: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, answer_at, wrong_at)``: the sorted token ids the rows' answer and wrong sets use, and the two index
    tables rewritten as positions in ``tokens`` (so logits over ``tokens`` alone stand in for the vocabulary's)."""
    tokens = torch.unique(torch.cat([answer_index.reshape(-1), wrong_index.reshape(-1)]))
    return tokens, torch.searchsorted(tokens, answer_index), torch.searchsorted(tokens, wrong_index)


def reduce_token_metrics(token_logits: torch.Tensor, answer_at: torch.Tensor, answer_mask: torch.Tensor,
                         wrong_at: torch.Tensor, wrong_mask: torch.Tensor, *, dtype: torch.dtype = torch.float64
                         ) -> torch.Tensor:
    """``[rows, 5]`` metrics, as :func:`reduce_metrics`' columns, from the logits of the answer and wrong sets'
    tokens alone (``token_logits`` ``[rows, k]``; ``answer_at``/``wrong_at`` index its columns, from
    :func:`answer_tokens`): the logit difference and the answer logit, the same numbers as from the whole
    vocabulary's logits; the probability, log-probability and KL divergence NaN (they need the whole vocabulary)."""
    logits = token_logits.to(dtype)
    answer_logit = set_mean(logits, answer_at, answer_mask)
    nan = torch.full_like(answer_logit, float("nan"))
    return torch.stack([answer_logit - set_mean(logits, wrong_at, wrong_mask), answer_logit, nan, nan, nan], dim=1)


def register_for_remote() -> None:
    """Ship this module by value with NDIF requests (and nnsight's local simulation of them): the trace bodies call
    its functions, and the server has no clap installed. Idempotent."""
    import sys

    import nnsight

    nnsight.register(sys.modules[__name__])
