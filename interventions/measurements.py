"""The values a study measures before batching, which the operations compile their edits from.

Why a module of its own: the operations (:mod:`interventions.operations`) read these values and the plan
(:mod:`interventions.plan`) carries them into the batches, while the passes that measure them
(:mod:`interventions.measuring`) run batches of the plan; holding the record here lets all three import it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from interventions.sites import Site


class OperationSettings(Protocol):
    """What these values are looked up by: an operation's settings (:class:`interventions.spec.OperationSpec`; typed
    structurally because the spec's validation asks the operations, which read this module)."""

    name: str
    scale: float
    relative_to: str
    alpha: float
    vector: str | None
    steps: int | None

    def model_dump_json(self) -> str: ...


@dataclass
class Measurements:
    """What the operations need beyond the batch itself, measured once per study before any batch
    (:class:`interventions.measuring.MeasurementPasses`): site widths, probe-set means, noise scales, steering vectors
    and, across models, the source model's activations."""

    widths: dict[str, int]  #: site name -> activation width (head_dim for head sites)
    #: site name -> [max_len, width], index = offset from end - 1
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding_std: float | None = None  #: std of the token embeddings of every prompt of the probe set
    selected_std: float | None = None  #: std of the embeddings of the tokens ``selected_std`` noise selects
    vectors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  #: (op JSON, site name) -> vector
    seed: int = 0
    #: cross-model patching: (module, access) -> per probe the source model's unpadded [len, width] activation on
    #: the probe's source prompt
    source_acts: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=dict)

    def source_value(self, site: Site, probe: int, index: int) -> torch.Tensor:
        """The source model's activation at ``site`` for ``probe``'s source-prompt token ``index`` (a head site's
        slice of it)."""
        value = self.source_acts[site.access_key][probe][index]
        if site.kind == "head":
            value = value.view(site.n_heads, -1)[site.head]
        return value

    def zeros(self, site: Site) -> torch.Tensor:
        return torch.zeros(self.widths[site.name])

    def mean(self, site: Site, offset_from_end: int) -> torch.Tensor:
        table = self.means[site.name]
        return table[offset_from_end - 1]

    def noise_std(self, op: OperationSettings) -> float:
        unit = {"absolute": 1.0, "embedding_std": self.embedding_std, "selected_std": self.selected_std}[op.relative_to]
        return op.scale * unit

    def vector(self, op: OperationSettings, site: Site) -> torch.Tensor:
        return self.vectors[(op.model_dump_json(), site.name)]
