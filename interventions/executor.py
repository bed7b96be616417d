"""Where and how a study's traces run: one object that owns the nnsight model, the device, the remote mode and the
execution strategy, so the rest of the engine says *what* to run (a :class:`~interventions.plan.Batch`, a capture)
and never threads ``remote`` or strategy flags through its calls.

Strategies (``execution.strategy``):

* ``full``: one trace per batch over every row and column (:func:`interventions.execute.run_batch`);
* ``suffix``: one baseline pass per batch, then each patched row only from its first edited block and column on,
  from its baseline row's cached state (:mod:`interventions.suffix`; exact under causal attention). Rows whose
  edits write the value already there (a restore on tokens clean and corrupted prompts share) are not run at all.
  Locally the patched rows run on the *ragged path* (:mod:`interventions.ragged`): one pass per start column, rows
  joining at their first edited block, the model's own blocks called one by one. Under nnsight's NDIF simulation
  (``remote: local``) they run as nnsight traces, one per group of similar starts; on NDIF itself
  (``remote: true``) the strategy is refused (the server cannot take a client-side cache object).
* ``auto``: ``suffix`` locally, ``full`` under the NDIF simulation and on NDIF. Measured on GPT-2-small (4 pairs,
  768 cells, `bench/side_by_side.py`): locally suffix 4.2 s vs full 20.0 s (11.3 s without skipping no-op rows);
  as nnsight traces without the no-op rows it was slower than full on this 2-core CPU (many small traces).

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
from interventions import execute, ragged, suffix
from interventions.plan import Batch

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "full", "suffix")
#: the suffix strategy's savings (see :class:`Executor`)
SUFFIX_PARTS = ("kv", "layer", "ragged", "no-op")


def resolve_strategy(strategy: str, remote: bool | str) -> str:
    """``auto`` -> ``suffix`` locally, ``full`` otherwise (see the module docstring for why); ``suffix`` on NDIF is
    refused."""
    if strategy not in STRATEGIES:
        raise ClapError(f"unknown execution strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
    if strategy == "auto":
        return "suffix" if remote is False or remote is None else "full"
    if strategy == "suffix" and remote is True:
        raise ClapError("strategy `suffix` cannot run on NDIF (remote: true); use `auto` or `full`")
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
    suffix_parts : sequence of str
        Which savings the suffix strategy uses (all by default; the benchmark and the tests switch some off to
        measure or check the others): "kv" (prefix key/value reuse), "layer" (start at the first edited block),
        "ragged" (locally: one pass per start column as plain module calls, :mod:`interventions.ragged`), "no-op"
        (rows whose edits change nothing are not run, :func:`interventions.suffix.no_op_rows`).
    metrics : sequence of str, optional
        The metrics the caller reads (:data:`clap.contract.METRICS`); None: all. Without ``kl`` the ragged path does
        not compute the KL divergence (a float64 pass over the vocabulary per row); the column is then NaN.
    """

    def __init__(self, model: Any, remote: bool | str = False, strategy: str = "auto",
                 unembed_module: str | None = None, *, suffix_parts: Sequence[str] = SUFFIX_PARTS,
                 metrics: Sequence[str] | None = None):
        self.model = model
        self.remote = remote
        self.unembed_module = unembed_module
        unknown = sorted(set(suffix_parts) - set(SUFFIX_PARTS))
        if unknown:
            raise ClapError(f"unknown suffix parts {unknown} (valid: {', '.join(SUFFIX_PARTS)})")
        self.suffix_parts = tuple(suffix_parts)
        self.kl = metrics is None or "kl" in metrics
        self.strategy = resolve_strategy(strategy, remote)
        self.used: Counter[str] = Counter()
        self._layout: suffix.ModelLayout | None | bool = False  # False: not looked at yet
        self._ragged: ragged.RaggedPath | None | bool = False
        #: suffix strategy counts: rows run, rows skipped as no-ops, batches on the ragged path
        self.suffix_stats: Counter[str] = Counter()

    @property
    def device(self) -> torch.device:
        return execute._device_of(self.model, self.remote)

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
        """The local ragged path of the suffix strategy, or None (remote, simulation, no layout, switched off)."""
        if self._ragged is False:
            usable = self.remote is False and "ragged" in self.suffix_parts and self.layout is not None
            self._ragged = ragged.RaggedPath(self.model._module, self.layout) if usable else None
        return self._ragged

    def run_batch(self, batch: Batch) -> torch.Tensor:
        """``[rows, len(METRICS)]`` metrics of one batch, in the batch's row order."""
        if self.strategy == "suffix" and self.layout is not None:
            parts = {"kv": "kv" in self.suffix_parts, "skip": "layer" in self.suffix_parts,
                     "skip_no_ops": "no-op" in self.suffix_parts, "kl": self.kl}
            if self.ragged is not None:
                try:
                    metrics = suffix.run_batch(self.model, batch, self.layout, self.remote, self.unembed_module,
                                               ragged_path=self.ragged, stats=self.suffix_stats, **parts)
                except (ragged.Unsupported, suffix.Unsupported) as exc:  # the traces below may still take it
                    log.info("batch %d runs as nnsight suffix passes: %s", batch.index, exc)
                else:
                    self.used["suffix"] += 1
                    self.suffix_stats["ragged_batches"] += 1
                    return metrics
            try:
                metrics = suffix.run_batch(self.model, batch, self.layout, self.remote, self.unembed_module,
                                           stats=self.suffix_stats, **parts)
            except suffix.Unsupported as exc:
                log.info("batch %d runs in full: %s", batch.index, exc)
            else:
                self.used["suffix"] += 1
                return metrics
        self.used["full"] += 1
        return execute.run_batch(self.model, batch, remote=self.remote, unembed_module=self.unembed_module)

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                modules: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
        """Activations at (module, access) pairs, in execution order (statistics passes: means, noise scales,
        steering vectors)."""
        return execute.capture(self.model, input_ids, attention_mask, modules, remote=self.remote)
