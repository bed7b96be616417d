"""Runs derived from a study's own spec: the additivity check (layers patched jointly) and clean-run ablations.

Why a module of its own: both are ordinary patching specs (:class:`interventions.spec.StudySpec`) built from the
study's spec, so ``clap patch`` can run what ``clap run`` derives, and ``run.json`` records the exact groups. What is
new lives in the spec: ``cumulative`` stacks and ``probes``-restricted groups (:class:`interventions.spec.PatchGroup`),
and the clean-run ablation (``corrupted_prompt: clean`` with ``zero`` / ``mean`` / ``resample``).

**Additivity** (:func:`additivity_spec`): do single-layer effects add up when the layers are patched together? From
the single-layer results of the same study (one component, one token selection), it builds the joint patches

* ``cumulative``: every layer's component at layers 0..k (``bottom``) and k..n_layers-1 (``top``), one cell per k;
* ``top``: each probe's m layers of largest single-layer recovery, together (per probe: ``probes: [id]``);
* ``pairs``: every pair among each probe's top ``pairs`` layers,

and a *design* table saying which layers each joint cell holds, so the analysis
(:mod:`analyses.additivity`) compares each joint effect with the sum of its layers' single effects without parsing
site labels. Attention and MLP outputs only: a residual-stream state at the patched tokens already holds every
earlier layer's contribution there, so a joint patch of residual-stream layers at the last token equals the last
layer's patch alone and its "gap" would be minus the other layers' effects by construction.

**Ablation** (:func:`ablation_spec`): the clean prompt is both runs, and each site is zeroed, replaced by its mean
over the probe set's clean prompts, or replaced by another probe's clean activation (a seeded derangement, the
token at the same distance from the end: ``alignment: right``). The ``effect`` column is then the change in the
clean metric (ablated - clean); recovery is undefined by design (:attr:`StudySpec.ablates_clean_run`).
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from clap.errors import ClapError
from clap.validation import StrictModel
from interventions.spec import Metric, OperationSpec, PositionSelector, StudySpec, expand_operation_names

if TYPE_CHECKING:  # the study file reads this module's sections: `clap --help` must not import pandas
    import pandas as pd

#: components whose layers can be patched jointly (see the module docstring for the residual stream)
ADDITIVE_KINDS = ("attn_out", "mlp_out")
#: operations that ablate the clean run
ABLATIONS = ("zero", "mean", "resample")
#: the columns of an additivity design table
DESIGN_COLUMNS = ["probe_id", "site_kind", "family", "k", "size", "layers", "ranks", "site"]


class AdditivitySection(StrictModel):
    """``additivity:`` of a study file: which joint patches to derive from the study's single-layer results."""

    #: per-layer components patched jointly (attention and MLP outputs; each on its own)
    kinds: list[str] = Field(default_factory=lambda: list(ADDITIVE_KINDS), min_length=1)
    #: the token selection: ``last`` (default), ``all`` or a token index; the study must patch it one layer at a time
    position: Literal["last", "all"] | int = "last"
    cumulative: bool = True  #: layers 0..k and k..n_layers-1 together, for every k
    top: list[int] = Field(default_factory=lambda: [2, 3, 5])  #: each probe's top-m layers together, per m
    pairs: int = Field(default=5, ge=0)  #: every pair among each probe's top ``pairs`` layers (0 or 1: none)
    #: the metric whose single-layer recovery ranks each probe's layers
    metric: Metric = "logit_diff"

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        for kind in value:
            if kind in ("resid_pre", "resid_post", "block_out"):
                raise ValueError(f"{kind}: a residual-stream state at the patched tokens already holds every earlier "
                                 "layer's contribution there, so a joint patch of residual-stream layers equals its "
                                 f"last layer's patch alone; use {' / '.join(ADDITIVE_KINDS)}")
            if kind not in ADDITIVE_KINDS:
                raise ValueError(f"unknown kind {kind!r}; additivity patches layers of {' / '.join(ADDITIVE_KINDS)}")
        return list(dict.fromkeys(value))

    @field_validator("top")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(m < 2 for m in value):
            raise ValueError("each top-m set holds at least 2 layers (one layer is the single-layer patch)")
        return sorted(set(value))

    def position_label(self) -> str:
        """The ``positions`` label the single-layer rows carry for this selection."""
        return str(self.position)


class AblationSection(StrictModel):
    """``ablation:`` of a study file: ablate sites of the clean run (no corrupted prompt) with each operation."""

    sites: list[str] = Field(default_factory=lambda: ["layers[*].heads[*]", "layers[*].attn_out", "layers[*].mlp_out"],
                             min_length=1)
    #: the tokens ablated (default the last, where the study's head patching looks)
    positions: list[PositionSelector] = Field(default_factory=lambda: ["last"], min_length=1)
    operations: list[OperationSpec] = Field(
        default_factory=lambda: [OperationSpec(name=n) for n in ABLATIONS], min_length=1)
    metrics: list[Metric] = Field(default_factory=lambda: ["logit_diff"], min_length=1)

    _operation_shorthand = field_validator("operations", mode="before")(expand_operation_names)

    @field_validator("operations")
    @classmethod
    def _ablations(cls, value: list[OperationSpec]) -> list[OperationSpec]:
        for op in value:
            if op.name not in ABLATIONS:
                raise ValueError(f"operation {op.name!r} does not ablate; an ablation is one of {', '.join(ABLATIONS)}")
        return value


def _derived(spec: StudySpec, **fields: Any) -> StudySpec:
    """``spec`` with its patch groups replaced by ``fields`` (validated anew; the base folder kept)."""
    data = spec.to_dict()
    data.update({"sites": None, "patches": None, "trace": None, "baseline": None, "samples": 1, **fields})
    derived = StudySpec.from_dict(data, source=f"{spec.name} (derived)")
    derived._base_dir = spec._base_dir
    return derived


def ablation_spec(spec: StudySpec, section: AblationSection) -> StudySpec:
    """The clean-run ablation of ``spec``'s model and probes: both runs the clean prompt, ``section``'s sites,
    positions, operations and metrics; right alignment so that ``resample`` can read a probe of another length."""
    if spec.source_model is not None:
        raise ClapError("ablation: a cross-model spec has no single model to ablate")
    return _derived(spec, name=f"{spec.name} [ablation]", corrupted_prompt="clean", alignment="right",
                    direction="denoising", positions=section.positions,
                    patches=[{"sites": section.sites}],
                    operations=[op.model_dump(mode="json") for op in section.operations],
                    metrics=section.metrics)


def additivity_spec(spec: StudySpec, singles: pd.DataFrame, section: AdditivitySection,
                    n_layers: int | None = None) -> tuple[StudySpec, pd.DataFrame]:
    """The joint patches of the additivity check and their design table, from ``singles`` (the tidy single-layer
    results of ``spec``).

    Each probe's layers are ranked by their single-layer recovery of ``section.metric`` at ``section.position``
    (largest first, ties to the lower layer); a probe whose recovery is undefined at any layer gets the cumulative
    stacks only. ``n_layers`` defaults to the layers present in ``singles``.

    Returns the derived spec and the design: ``probe_id``, ``site_kind``, ``family`` (``bottom``, ``top``,
    ``top_m``, ``pair``), ``k`` (the varying end layer of a cumulative stack, m of a top-m set, NA for pairs),
    ``size``, ``layers`` (comma-separated, ascending), ``ranks`` (each layer's rank among the probe's layers,
    1 = largest single recovery; empty for cumulative stacks), ``site`` (the label the joint run reports)."""
    if spec.source_model is not None or spec.baseline or spec.trace is not None or spec.corrupted_prompt != "probe":
        raise ClapError("additivity: derived from a study with paired clean/corrupted prompts of one model (not a "
                        "trace, a baseline intervention or cross-model patching)")
    ranked = rank_layers(singles, section, n_layers)
    n = n_layers or (int(max(r for per in ranked.values() for r in per["layers"])) + 1 if ranked else 0)
    patches: list[dict[str, Any]] = []
    design: list[dict[str, Any]] = []
    for kind in section.kinds:
        if section.cumulative:
            _cumulative(kind, sorted(ranked), n, patches, design)
        for probe in sorted(ranked):
            order = ranked[probe]["order"].get(kind)
            if order is not None:
                _per_probe_sets(probe, kind, order, section, patches, design)
    if not patches:
        raise ClapError("additivity: nothing to patch jointly (no cumulative stacks, and no probe with a defined "
                        "single-layer recovery at every layer)")
    derived = _derived(spec, name=f"{spec.name} [additivity]", positions=[section.position], patches=patches,
                       operations=["replace"])
    import pandas as pd

    return derived, pd.DataFrame(design, columns=DESIGN_COLUMNS)


def _cumulative(kind: str, probes: list[str], n: int, patches: list, design: list) -> None:
    """Layers 0..k and k..n-1 of ``kind`` together, one cell per k (shared by every probe)."""
    for end in ("bottom", "top"):
        patches.append({"sites": [f"layers[*].{kind}"], "cumulative": end})
        for probe in probes:
            for k in range(n):
                low, high = (0, k + 1) if end == "bottom" else (k, n)
                design.append(_design_row(probe, kind, end, k, range(low, high), (), f"layers[{low}:{high}].{kind}"))


def _per_probe_sets(probe: str, kind: str, order: list[int], section: AdditivitySection, patches: list,
                    design: list) -> None:
    """A probe's top-m sets and the pairs among its top layers; a set that is both (top-2) is patched once."""
    sets: dict[tuple[int, ...], str] = {}
    for m in section.top:
        if m <= len(order):
            layers = tuple(sorted(order[:m]))
            sets[layers] = _combined_label(layers, kind)
            design.append(_design_row(probe, kind, "top_m", m, layers, _ranks(layers, order), sets[layers]))
    for pair in combinations(order[: section.pairs], 2):
        layers = tuple(sorted(pair))
        sets[layers] = _combined_label(layers, kind)
        design.append(_design_row(probe, kind, "pair", None, layers, _ranks(layers, order), sets[layers]))
    for layers in sets:
        patches.append({"sites": [f"layers[{layer}].{kind}" for layer in layers], "combine": True, "probes": [probe]})


def rank_layers(singles: pd.DataFrame, section: AdditivitySection, n_layers: int | None = None) -> dict[str, Any]:
    """Per probe: ``layers`` (every layer of the section's kinds present) and ``order`` (kind -> layers by single
    recovery, largest first; absent where any layer's recovery is undefined). Refuses singles that lack a layer."""
    rows = singles[(singles["metric"] == section.metric) & singles["site_kind"].isin(section.kinds)
                   & (singles["positions"].astype(str) == section.position_label())
                   & (singles["operation"] == "replace") & singles["head"].isna()]
    if "window" in rows.columns:
        rows = rows[rows["window"].fillna(1) == 1]
    if rows.empty:
        raise ClapError(f"additivity: the study has no single-layer `replace` rows of {', '.join(section.kinds)} at "
                        f"positions `{section.position_label()}` with metric {section.metric}; patch those sites one "
                        f"layer at a time there (e.g. patches: [{{sites: [\"layers[*].{section.kinds[0]}\"], "
                        f"positions: [{section.position_label()}]}}])")
    out: dict[str, Any] = {}
    for kind in section.kinds:
        part = rows[rows["site_kind"] == kind]
        layers = sorted(int(v) for v in rows["layer"].dropna().unique())
        expected = list(range(n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)))
        have = sorted(int(v) for v in part["layer"].dropna().unique())
        if have != expected:
            missing = sorted(set(expected) - set(have))
            raise ClapError(f"additivity: single-layer {kind} rows lack layers "
                            f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}; the joint "
                            f"patches are compared with every layer's single effect")
        for probe, per in part.groupby("probe_id", sort=True):
            entry = out.setdefault(str(probe), {"layers": set(), "order": {}})
            entry["layers"].update(int(v) for v in per["layer"])
            values = per.set_index(per["layer"].astype(int))["recovery"].astype(float)
            if len(values) == len(expected) and values.notna().all():
                entry["order"][kind] = sorted(values.index, key=lambda layer, v=values: (-v[layer], layer))
    return out


def _combined_label(layers: tuple[int, ...], kind: str) -> str:
    """The ``site`` a combined group of these layers reports (``a+b+...`` in forward order)."""
    return "+".join(f"layers.{layer}.{kind}" for layer in layers)


def _ranks(layers: tuple[int, ...], order: list[int]) -> tuple[int, ...]:
    return tuple(order.index(layer) + 1 for layer in layers)


def _design_row(probe: str, kind: str, family: str, k: int | None, layers: Any, ranks: tuple[int, ...],
                site: str) -> dict[str, Any]:
    layers = list(layers)
    return {"probe_id": probe, "site_kind": kind, "family": family, "k": k, "size": len(layers),
            "layers": ",".join(map(str, layers)), "ranks": ",".join(map(str, ranks)), "site": site}
