"""Standard patching sweeps as one-line functions, in the manner of TransformerLens's ``patching.py``.

Each function builds a :class:`~interventions.spec.StudySpec`, runs it on an already-loaded model and returns the
tidy results frame; :func:`to_grid` turns a sweep into the familiar ``[layer, position]`` table.

>>> model = load_model("smollm2-135m")
>>> frame = resid_pre_sweep(model, [{"clean": "...", "corrupted": "...", "answer": " brain", "wrong": " heart"}])
>>> to_grid(frame)                                       # layer x position, patched logit difference
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from clap.models import LoadedModel
from interventions.spec import StudySpec
from interventions.study import Study


def sweep(
    model: LoadedModel,
    probes: Sequence[dict[str, Any]],
    sites: Iterable[str],
    positions: Sequence[Any] = ("each",),
    operation: str | dict[str, Any] = "replace",
    direction: str = "denoising",
    metrics: Sequence[str] = ("logit_diff",),
    **execution: Any,
) -> pd.DataFrame:
    """Patch every site at every selected position for every probe; one tidy row per cell and metric."""
    spec = StudySpec.from_dict(
        {
            "model": {"source": model.identity.get("source", "in-memory")},
            "probes": {"inline": list(probes)},
            "sites": list(sites),
            "positions": list(positions),
            "operations": [operation],
            "direction": direction,
            "metrics": list(metrics),
            "execution": {"progress": False, **execution},
        },
        source="<sweep>",
    )
    return Study(spec, model=model).run()


def resid_pre_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """The residual stream entering each block, at each position (``get_act_patch_resid_pre``)."""
    return sweep(model, probes, ["layers[*].resid_pre"], **kwargs)


def attn_out_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """Each attention layer's output, at each position (``get_act_patch_attn_out``)."""
    return sweep(model, probes, ["layers[*].attn_out"], **kwargs)


def mlp_out_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """Each MLP's output, at each position (``get_act_patch_mlp_out``)."""
    return sweep(model, probes, ["layers[*].mlp_out"], **kwargs)


def head_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], positions: Sequence[Any] = ("all",),
               **kwargs: Any) -> pd.DataFrame:
    """Every attention head's output (before the output projection), all positions together by default
    (``get_act_patch_attn_head_out_all_pos``)."""
    return sweep(model, probes, ["layers[*].heads[*]"], positions=positions, **kwargs)


def to_grid(frame: pd.DataFrame, index: str = "layer", columns: str = "position", values: str = "patched",
            metric: str | None = None) -> pd.DataFrame:
    """Mean of ``values`` over probes as an ``index`` x ``columns`` table (e.g. layer x position, layer x head)."""
    if metric is None:
        metrics = frame["metric"].unique()
        if len(metrics) != 1:
            raise ValueError(f"the frame holds several metrics {list(metrics)}; pass metric=")
        metric = metrics[0]
    chosen = frame[frame["metric"] == metric]
    grid = chosen.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    return grid.sort_index().sort_index(axis=1)
