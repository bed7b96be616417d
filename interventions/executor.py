"""Where and how a study's traces run: one object that owns the nnsight model, the device, the remote mode and the
execution strategy, so the rest of the engine says *what* to run (a :class:`~interventions.plan.Batch`, a capture)
and never threads ``remote`` or strategy flags through its calls.

Strategies (``execution.strategy``):

* ``full``: one nnsight trace per batch over every row and column (:func:`interventions.full_traces.run_batch`); the
  only strategy on NDIF and under its local simulation, since its trace body ships to the server unchanged;
* ``suffix``: locally only. One baseline pass per batch (an nnsight trace), then each patched row only from its
  first edited block and column on, from its baseline row's cached state, on the *ragged path*
  (:mod:`interventions.suffix`, :mod:`interventions.ragged`: the model's own blocks called one by one, outside
  nnsight; exact under causal attention). Rows whose edits write the value already there (a restore on tokens clean
  and corrupted prompts share) are not run at all. A batch the ragged path cannot take (a patch on the
  unembedding, a model its self-check rejects) runs ``full``;
* ``auto``: ``suffix`` locally, ``full`` under the NDIF simulation and on NDIF.

Why these two and no other: ARCHITECTURE.md ("Which path runs where"); the measurements are in the README's
performance section and ``bench/results/``.

A model the suffix strategy cannot place (no architecture map, blocks that return tuples) runs ``full``;
:attr:`Executor.used` counts the batches per strategy and :attr:`Executor.strategy_used` names what ran, for
``run.json``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from clap.errors import ClapError
from interventions import full_traces, kernel, ragged, suffix
from interventions.plan import Batch

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "full", "suffix")


def resolve_strategy(strategy: str, remote: bool | str) -> str:
    """``auto`` -> ``suffix`` locally, ``full`` otherwise; ``suffix`` is refused on NDIF and under its simulation
    (its patched rows run outside nnsight, which a server cannot do)."""
    if strategy not in STRATEGIES:
        raise ClapError(f"unknown execution strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
    local = remote is False or remote is None
    if strategy == "auto":
        return "suffix" if local else "full"
    if strategy == "suffix" and remote is True:
        raise ClapError("strategy `suffix` cannot run on NDIF (remote: true); use `auto` or `full`")
    if strategy == "suffix" and not local:
        raise ClapError("strategy `suffix` runs locally only: its patched rows run outside nnsight, which NDIF (and "
                        "`remote: local`, its simulation) cannot do; use `auto` or `full`")
    return strategy


class Executor:
    """Runs batches and captures for one model.

    Parameters
    ----------
    model : nnsight model
        The wrapped model (``LoadedModel.nn``).
    remote : bool or "local"
        False: local; True: NDIF; "local": nnsight's local simulation of NDIF.
    strategy : {"auto", "full", "suffix"}
    unembed_module : str, optional
        The unembedding's module path (only the last position's logits are computed unless it is patched).
    skip_no_ops : bool
        Under ``suffix``, patched rows whose edits change nothing take their baseline row's result without running
        (:func:`interventions.suffix.no_op_rows`); False runs them (the benchmark measures what the skip saves).
    metrics : sequence of str, optional
        The metrics the caller reads (:data:`clap.contract.METRICS`); None: all. The ragged path computes only what
        they need (:class:`interventions.kernel.MetricNeeds`): without ``kl`` no KL divergence (a float64 pass over
        the vocabulary per row), without any of ``prob``, ``logprob``, ``kl`` the logits of the answer and wrong
        tokens alone; the columns not computed are NaN.
    """

    def __init__(self, model: Any, remote: bool | str = False, strategy: str = "auto",
                 unembed_module: str | None = None, *, skip_no_ops: bool = True,
                 metrics: Sequence[str] | None = None):
        self.model = model
        self.remote = remote
        self.unembed_module = unembed_module
        self.skip_no_ops = skip_no_ops
        self.needs = kernel.MetricNeeds.of(metrics)
        self.strategy = resolve_strategy(strategy, remote)
        self.used: Counter[str] = Counter()
        self._layout: suffix.ModelLayout | None | bool = False  # False: not looked at yet
        self._ragged: ragged.RaggedPath | None | bool = False
        #: suffix strategy counts: rows run, rows skipped as no-ops, batches on the ragged path
        self.suffix_stats: Counter[str] = Counter()

    @property
    def device(self) -> torch.device:
        return full_traces.device_of(self.model, self.remote)

    @property
    def layout(self) -> suffix.ModelLayout | None:
        if self._layout is False:
            self._layout = suffix.ModelLayout.of(self.model._module)
            if self._layout is None and self.strategy == "suffix":
                log.info("the suffix strategy does not apply to this model; batches run in full")
        return self._layout

    @property
    def strategy_used(self) -> str:
        """What ran: ``suffix``, ``full``, or e.g. ``suffix (3 of 40 batches full)``; the resolved strategy before
        any batch ran."""
        if not self.used:
            return self.strategy
        if len(self.used) == 1:
            return next(iter(self.used))
        return f"suffix ({self.used['full']} of {sum(self.used.values())} batches full)"

    @property
    def ragged(self) -> ragged.RaggedPath | None:
        """The suffix strategy's ragged path, or None (not the suffix strategy, or a model it cannot place)."""
        if self._ragged is False:
            usable = self.strategy == "suffix" and self.layout is not None
            self._ragged = ragged.RaggedPath(self.model._module, self.layout) if usable else None
        return self._ragged

    def run_batch(self, batch: Batch, full_rows: int | None = None) -> torch.Tensor | None:
        """``[rows, len(METRICS)]`` metrics of one batch, in the batch's row order. None: the batch would run in
        full and holds more than ``full_rows`` rows (the caller runs it in parts)."""
        if self.ragged is not None:
            try:
                metrics = suffix.run_batch(self.model, batch, self.layout, self.ragged, self.unembed_module,
                                           stats=self.suffix_stats, skip_no_ops=self.skip_no_ops, needs=self.needs)
            except (ragged.Unsupported, suffix.Unsupported) as exc:
                log.info("batch %d runs in full: %s", batch.index, exc)
            else:
                self.used["suffix"] += 1
                self.suffix_stats["ragged_batches"] += 1
                return metrics
        if full_rows is not None and len(batch.row_role) > full_rows:
            return None
        self.used["full"] += 1
        return full_traces.run_batch(self.model, batch, remote=self.remote, unembed_module=self.unembed_module)

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                modules: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
        """Activations at (module, access) pairs, in execution order (statistics passes: means, noise scales,
        steering vectors)."""
        return full_traces.capture(self.model, input_ids, attention_mask, modules, remote=self.remote)
