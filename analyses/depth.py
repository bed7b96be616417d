"""Relative depth: the layers of two models of different depth put on one axis, for ``clap compare``.

Layer 3 of a 4-layer model and layer 3 of a 6-layer model are not the same place, so a comparison of models of
different depth cannot pair values by layer. It pairs them by **relative depth bin** instead:

* layer ``l`` of a model of ``N`` layers sits at relative depth ``(l + 0.5) / N`` (the middle of its share of the
  stack, so the first and last layers of every model are equally far from 0 and 1);
* ``[0, 1)`` is cut into ``K`` equal bins; the layer falls in bin ``floor((l + 0.5) / N * K)`` (computed in
  integers, so a layer on an edge goes to the upper bin without rounding error). With the default ``K = min(N_A,
  N_B)`` every bin holds at least one layer of each model, and the shallower model has exactly one layer per bin;
* a probe's value in a bin is made from its per-layer values (each reduced by the analysis rules first: its last
  token, heads summed per layer, as ``clap analyze`` does) over the layers of that model in the bin that the run
  measured; a probe lacking one of them has no value in that bin (every value of a bin is over the same layers).

What a bin's value is depends on what a site measures:

* **states** (the residual stream, ``resid_pre`` / ``resid_post`` / ``block_out``): the recovery of restoring the
  stream is cumulative (everything computed below that layer is in it), a level, not a contribution: the bin's value
  is the **mean** over its layers, the stream's level at that depth. It is never summed;
* **per-layer contributions** (``attn_out``, ``mlp_out``, ``head`` summed per layer): a deeper model spreads its
  work over more layers, so its single-layer values are smaller. The bin's value is the mean per-layer value times
  ``N / K``, the number of layers per bin: the contribution per ``1 / K`` of depth. For the model with ``N = K``
  layers (the shallower one under the default) it is exactly its per-layer value; summed over bins it is about the
  model's total (exactly when each bin holds ``N / K`` layers);
* raw module sites (``module``) are architecture-specific and are not aligned; heads analysed one by one
  (``head_reduction: each``) have no counterpart in another model and are not aligned either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clap.errors import ClapError

#: site kinds whose recovery is a state of the residual stream (cumulative): a bin holds their mean
STATE_KINDS = ("resid_pre", "resid_post", "block_out")
#: site kinds whose recovery is one layer's contribution: a bin holds the mean per layer times N / K
CONTRIBUTION_KINDS = ("attn_out", "mlp_out", "head")
#: the level column of a relative-depth comparison (``layer`` in a comparison of models of equal depth)
LEVEL = "depth_bin"
#: how tables, figures and findings name that level
LEVEL_WORDS = ("relative depth bin", "relative depth bins")


def relative_depth(layer: int | np.ndarray, n_layers: int) -> float | np.ndarray:
    """``(layer + 0.5) / n_layers``: the middle of the layer's share of the stack, in ``(0, 1)``."""
    return (np.asarray(layer, float) + 0.5) / n_layers


def depth_bin(layer: int | np.ndarray, n_layers: int, bins: int) -> int | np.ndarray:
    """The bin of ``[0, 1)`` cut into ``bins`` equal parts that holds the layer's relative depth (integer arithmetic:
    ``floor((2 layer + 1) bins / (2 n_layers))``)."""
    return (2 * np.asarray(layer, np.int64) + 1) * bins // (2 * n_layers)


def bin_range(index: int, bins: int) -> str:
    """``[0.25, 0.50)``: the relative depths a bin covers."""
    return f"[{index / bins:.2f}, {(index + 1) / bins:.2f})"


def resolve_bins(requested: int | None, n_a: int, n_b: int) -> int | None:
    """How many bins a comparison uses: ``requested`` (``--relative-depth``), else ``min(n_a, n_b)`` when the models'
    depths differ, else None (pair by layer, as for one model before and after fine-tuning)."""
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise ClapError(f"relative depth bins: expected a whole number of at least 1, got {requested!r}")
        return int(requested)
    return min(n_a, n_b) if n_a != n_b else None


def model_depth(meta: dict[str, Any], data: pd.DataFrame, name: str) -> int:
    """The number of layers of a run's model, from its ``run.json`` (``model.n_layers``); a run that does not record
    it, or whose results hold a layer beyond it, is refused (a relative depth needs the model's true depth, not the
    highest layer patched)."""
    n = (meta.get("model") or {}).get("n_layers")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ClapError(f"{name}: run.json records no model.n_layers ({n!r}); a comparison by relative depth needs "
                        "each model's number of layers")
    layers = data["layer"].dropna() if "layer" in data else pd.Series([], dtype=float)
    if len(layers) and int(layers.max()) >= n:
        raise ClapError(f"{name}: the results hold layer {int(layers.max())} but run.json says the model has {n} "
                        "layers")
    return int(n)


def bin_table(n_layers: int, bins: int, layers: list[int] | None = None) -> pd.DataFrame:
    """One row per layer (all of the model's, or ``layers``): ``layer``, ``relative_depth``, ``depth_bin``,
    ``depth_range``."""
    layer = np.arange(n_layers) if layers is None else np.asarray(sorted(layers), np.int64)
    index = depth_bin(layer, n_layers, bins)
    return pd.DataFrame({"layer": layer, "relative_depth": relative_depth(layer, n_layers), LEVEL: index,
                         "depth_range": [bin_range(int(i), bins) for i in index]})


@dataclass
class Binned:
    """A run's per-probe values in relative depth bins, and which of its layers each bin was made from."""

    values: pd.DataFrame  #: ``probe_id``, ``depth_bin``, the value column, and the group column if any
    layers: dict[int, list[int]]  #: bin -> the measured layers in it
    scale: float  #: what the mean per layer was multiplied by (``N / K`` for contributions, 1 for states)


def to_bins(values: pd.DataFrame, n_layers: int, bins: int, site_kind: str, value: str = "value",
            keys: tuple[str, ...] = ("probe_id",)) -> Binned:
    """Per probe (and ``keys``) and bin, the value of the module docstring from per-layer ``values`` (columns
    ``layer``, ``value`` and ``keys``). A probe lacking one of the bin's measured layers has no value there."""
    if site_kind not in STATE_KINDS + CONTRIBUTION_KINDS:
        raise ClapError(f"site kind {site_kind!r} cannot be aligned by relative depth (only "
                        f"{', '.join(STATE_KINDS + CONTRIBUTION_KINDS)})")
    frame = values[[*keys, "layer", value]].copy()
    frame["layer"] = frame["layer"].astype(np.int64)
    frame[LEVEL] = depth_bin(frame["layer"].to_numpy(), n_layers, bins)
    measured = frame.drop_duplicates("layer").groupby(LEVEL)["layer"].apply(lambda s: sorted(s.tolist()))
    per_bin = frame.dropna(subset=[value]).groupby([*keys, LEVEL], sort=True)[value].agg(["mean", "size"])
    per_bin = per_bin.reset_index()
    complete = per_bin["size"].to_numpy() == per_bin[LEVEL].map(measured.map(len)).to_numpy()
    scale = n_layers / bins if site_kind in CONTRIBUTION_KINDS else 1.0
    out = per_bin.loc[complete, [*keys, LEVEL]].copy()
    out[value] = per_bin.loc[complete, "mean"].to_numpy() * scale
    return Binned(out.reset_index(drop=True), {int(k): v for k, v in measured.items()}, scale)


def method_sentence(n_a: int, n_b: int, bins: int) -> str:
    """The Methods sentence of a relative-depth comparison (the rules of the module docstring, with its numbers)."""
    why = (f"The models differ in depth (A: {n_a} layers, B: {n_b} layers), so values" if n_a != n_b else
           f"Both models have {n_a} layers; as asked (--relative-depth), values")
    return (f"{why} are paired per probe and relative depth bin, not per layer: layer l of a model of N layers "
            f"sits at relative depth (l + 0.5) / N, and [0, 1) is cut into {bins} equal bins (depth_bins.csv lists "
            "each model's layers per bin). A probe's value in a bin is made from its per-layer values (reduced as "
            "above) over the model's measured layers in that bin; a probe lacking one of them has no value there. "
            "Residual-stream sites are cumulative states: a bin holds their mean, the stream's level at that depth. "
            "Attention and MLP outputs and heads summed per layer are per-layer contributions: a bin holds the mean "
            f"per layer times N / {bins} (layers per bin), the contribution per 1/{bins} of depth, so a deeper model "
            "that spreads the same work over more layers is not made to look weaker "
            f"(A x {n_a / bins:.3g}, B x {n_b / bins:.3g}).")
