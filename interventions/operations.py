"""Operations as first-class objects: what a patched activation becomes, what it needs, how it compiles.

Every operation is one :class:`Operation` subclass registered in :data:`REGISTRY` by name; adding an operation
touches only this module. An operation declares

* ``copies_source``: it reads the source run's activation at aligned token positions (so strict alignment and the
  right-alignment counterpart apply, and a study whose source equals its target would measure nothing);
* ``needs``: the measuring passes it needs before batching (:mod:`interventions.measuring`; ``mean``: probe-set
  means per site; ``noise_std``: an embedding std; ``vector``: a steering vector loaded from a file or captured as a
  mean difference);
* ``check(spec)``: what its spec fields must satisfy (a ``ValueError`` becomes a file:line error);
* ``label(spec)``: its name in the results' ``operation`` column;
* ``approximate``: it is estimated, not measured: executed by the gradient path (:mod:`interventions.attribution`,
  one forward and backward pass per chunk of probes) instead of being compiled into batch edits;
* ``compile(edit)``: the batch primitives it writes, as entries of ``copy`` (``x[t] = x[s]``), ``set``
  (``x[t] = v``), ``add`` (``x[t] += v``) and ``mix`` (``x[t] += alpha * (x[s] - x[t])``, or towards given values
  ``v``), which every substrate applies with :func:`interventions.kernel.apply_edits`.

Cross-model patching (``source_model``): the source run is another model's, captured before batching
(``Measurements.source_acts``), so ``replace`` compiles to ``set`` and ``interpolate`` to a ``mix`` towards those
values instead of reading a row of the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from interventions.measurements import Measurements, OperationSettings
from interventions.sites import Site


@dataclass
class EditContext:
    """One operation applied to one row at one site: where (padded columns) and with what it can work."""

    op: OperationSettings  #: the cell's :class:`interventions.spec.OperationSpec`
    site: Site
    t_row: int
    t_cols: list[int]
    indices: tuple[int, ...]  #: target-prompt token indices of ``t_cols``
    s_row: int | None
    s_cols: list[int]
    n_target: int
    head: int  #: -1 for whole-width sites
    constants: Measurements
    noise_key: str  #: identifies the noise draw: seed, probe, sample, site, role (see ``noise_seed``)
    source_probe: int | None = None  #: the probe whose source run supplies the activation (None: a baseline edit)
    source_indices: tuple[int, ...] = ()  #: source-prompt token indices matched to ``indices``

    def source_values(self) -> list[Any] | None:
        """The source model's captured activations at the source tokens (cross-model patching), else None: the
        source run is then a row of the same batch, addressed by ``s_row`` / ``s_cols``."""
        if self.source_probe is None or not getattr(self.constants, "source_acts", None):
            return None
        return [self.constants.source_value(self.site, self.source_probe, j) for j in self.source_indices]


def noise_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (study seed, probe id, sample, site, role): the same draw wherever those agree
    (the corrupted baseline row and every restored row of one probe and sample), a different one otherwise.
    ``sha256("|".join(str(p) for p in parts))``, first 15 hex digits, as an integer."""
    return int(hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


class Operation:
    name: ClassVar[str]
    copies_source: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()
    #: estimated by attribution patching (the gradient path), never compiled into batch edits
    approximate: ClassVar[bool] = False
    #: spec fields this operation accepts beyond ``name``
    fields: ClassVar[frozenset[str]] = frozenset()

    def check(self, spec: Any) -> None:
        """Raise ValueError naming what is wrong with the operation's fields."""

    def label(self, spec: Any) -> str:
        return self.name

    def compile(self, edit: EditContext) -> list[tuple[str, tuple]]:
        raise NotImplementedError


REGISTRY: dict[str, Operation] = {}


def register(cls: type[Operation]) -> type[Operation]:
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Operation:
    return REGISTRY[name]


@register
class Replace(Operation):
    """The source run's activation (clean for denoising, corrupted for noising): a restore."""

    name = "replace"
    copies_source = True

    def compile(self, edit):
        values = edit.source_values()
        if values is not None:  # cross-model: the source model's activation, captured beforehand
            return [("set", (edit.t_row, tc, edit.head, v)) for tc, v in zip(edit.t_cols, values, strict=True)]
        # not strict: a baseline edit has no source row (s_cols empty), so it copies nothing
        return [("copy", (edit.t_row, tc, edit.s_row, sc, edit.head))
                for tc, sc in zip(edit.t_cols, edit.s_cols, strict=False)]


@register
class Resample(Replace):
    """The source activation of another probe (a seeded derangement of the probe set)."""

    name = "resample"


@register
class Zero(Operation):
    name = "zero"

    def compile(self, edit):
        value = edit.constants.zeros(edit.site)
        return [("set", (edit.t_row, tc, edit.head, value)) for tc in edit.t_cols]


@register
class Mean(Operation):
    """The probe-set mean source activation at the same position counted from the end."""

    name = "mean"
    needs = frozenset({"mean"})

    def compile(self, edit):
        return [("set", (edit.t_row, tc, edit.head, edit.constants.mean(edit.site, edit.n_target - i)))
                for tc, i in zip(edit.t_cols, edit.indices, strict=True)]


@register
class Noise(Operation):
    """The target activation plus Gaussian noise of std ``scale`` (absolute), or ``scale`` x the std of the token
    embeddings of all prompts (``embedding_std``) or of the selected tokens over the probe set (``selected_std``,
    ROME's 3 sigma over the subjects' tokens)."""

    name = "noise"
    needs = frozenset({"noise_std"})
    fields = frozenset({"scale", "relative_to"})

    def check(self, spec):
        if spec.scale is None or spec.scale <= 0:
            raise ValueError("operation `noise` needs a positive `scale`")

    def label(self, spec):
        unit = {"absolute": "", "embedding_std": "sd", "selected_std": "sd_sel"}[spec.relative_to]
        return f"noise({spec.scale:g}{unit})"

    def compile(self, edit):
        std = edit.constants.noise_std(edit.op)
        generator = torch.Generator().manual_seed(noise_seed(edit.noise_key))
        draws = torch.randn((len(edit.t_cols), edit.constants.widths[edit.site.name]), generator=generator) * std
        return [("add", (edit.t_row, tc, edit.head, draws[k])) for k, tc in enumerate(edit.t_cols)]


@register
class Steer(Operation):
    """``x + alpha * v``: a vector from a ``.pt``/``.npy`` file (``vector``) or the mean difference of the
    last-token activations of two prompt sets at the site (``vector_from: {plus: [...], minus: [...]}``)."""

    name = "steer"
    needs = frozenset({"vector"})
    fields = frozenset({"alpha", "vector", "vector_from"})

    def check(self, spec):
        if spec.alpha is None:
            raise ValueError("operation `steer` needs `alpha` (the vector's multiplier)")
        if (spec.vector is None) == (spec.vector_from is None):
            raise ValueError("operation `steer` needs exactly one of `vector` (a .pt/.npy file) or `vector_from` "
                             "({plus: [prompts], minus: [prompts]})")

    def label(self, spec):
        return f"steer({spec.alpha:g})"

    def compile(self, edit):
        value = edit.constants.vector(edit.op, edit.site) * edit.op.alpha
        return [("add", (edit.t_row, tc, edit.head, value)) for tc in edit.t_cols]


@register
class Interpolate(Operation):
    """``(1 - alpha) * target + alpha * source``: alpha 0 leaves the target run, 1 equals ``replace``."""

    name = "interpolate"
    copies_source = True
    fields = frozenset({"alpha"})

    def check(self, spec):
        if spec.alpha is None:
            raise ValueError("operation `interpolate` needs `alpha` (0 = target, 1 = source)")

    def label(self, spec):
        return f"interpolate({spec.alpha:g})"

    def compile(self, edit):
        values = edit.source_values()
        if values is not None:  # cross-model: mix towards the source model's captured activation
            return [("mix", (edit.t_row, tc, -1, -1, edit.head, float(edit.op.alpha), v))
                    for tc, v in zip(edit.t_cols, values, strict=True)]
        # not strict, as in ``Replace``: a baseline edit has no source columns to mix in
        return [("mix", (edit.t_row, tc, edit.s_row, sc, edit.head, float(edit.op.alpha)))
                for tc, sc in zip(edit.t_cols, edit.s_cols, strict=False)]


@register
class Attribution(Operation):
    """``replace`` estimated to first order (attribution patching): ``(a_source - a_target) . dM/da`` at the target
    run, for every cell of its groups from one forward and one backward pass per chunk of probes
    (:mod:`interventions.attribution`). Its rows say ``approximate=True``; beside ``replace`` in one spec it gives the
    exact and the approximate value of the same cells. It reads the source activation at aligned tokens, as
    ``replace`` does. ``steps: k >= 2`` takes the gradient at ``k`` points of the straight line from the target's to
    the source's input embeddings, trapezoid-weighted (EAP-IG, Hanna et al. 2024), at ``k / 2`` times the rows: much
    closer to exact patching for large changes (the early residual stream at the tokens that differ), less close for
    small ones (components at the last position), as ``bench/attribution.py`` measures."""

    name = "attribution"
    copies_source = True
    approximate = True
    fields = frozenset({"steps"})

    def label(self, spec):
        return self.name if (spec.steps or 1) == 1 else f"{self.name}(ig{spec.steps})"

    def compile(self, edit):
        raise NotImplementedError("operation `attribution` runs on the gradient path (interventions.attribution), "
                                  "not in batches")


#: every spec field an operation may use (those outside ``fields`` of the named operation are refused)
OPTIONAL_FIELDS = ("scale", "relative_to", "alpha", "vector", "vector_from", "steps")
