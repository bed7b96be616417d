"""Standard activation-patching sweeps as one-line functions, in the manner of TransformerLens's ``patching.py``.

The method
----------
Activation patching asks which internal activations carry the information that makes a model prefer one answer.
Each probe is a pair of prompts that differ in one fact, e.g. *clean* ``"Epilepsy is a disorder of the"`` (answer
``" brain"``) and *corrupted* ``"Tachycardia is a disorder of the"`` (where the model prefers ``" heart"``). The
metric is the logit difference ``logit(answer) - logit(wrong)`` at the last position.

* **Denoising** (the default): run the corrupted prompt, but overwrite one activation (a site at a position) with
  its value from the clean run. If the metric moves back towards the clean value, that activation is *sufficient*
  to carry the fact there.
* **Noising**: run the clean prompt and overwrite one activation with its corrupted value. If the metric drops, the
  activation is *necessary*.

The **recovery** normalises the patched metric: ``(patched - corrupted) / (clean - corrupted)``; 0 means the patch
did nothing, 1 means it restored the clean behaviour entirely. It is undefined (NaN, never divided) when the clean
and corrupted runs barely differ (``|clean - corrupted| <= recovery_epsilon``): such a probe cannot be studied.

**Trivial sites** recover 100 % by construction, so they say nothing about where a fact is stored: the unembedding,
the final norm, and the last block's residual output at the answer position (everything downstream of them is the
clean computation). They are flagged ``trivial`` in the results and left out of the statistics by default.

Each function builds a :class:`~interventions.spec.StudySpec`, runs it on an already-loaded model in batched nnsight
traces (many cells per forward pass) and returns the tidy results frame (columns in :mod:`clap.contract`);
:func:`to_grid` turns a sweep into the familiar ``[layer, position]`` table.

Examples
--------
>>> from interventions import load_model, resid_pre_sweep, to_grid
>>> model = load_model("smollm2-135m")                                                   # doctest: +SKIP
>>> probe = {"clean": "Epilepsy is a disorder of the", "corrupted": "Tachycardia is a disorder of the",
...          "answer": " brain", "wrong": " heart"}
>>> frame = resid_pre_sweep(model, [probe])                                             # doctest: +SKIP
>>> to_grid(frame, values="recovery")                # layer x position: where the fact flows   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from clap.errors import ClapError
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
    """Patch every site at every selected position for every probe; one tidy row per cell and metric.

    Parameters
    ----------
    model : LoadedModel
        A model from :func:`interventions.load_model` or :func:`interventions.wrap`.
    probes : sequence of dict
        Each with ``clean``, ``corrupted``, ``answer`` and (for ``logit_diff``) ``wrong``; optional ``id`` and labels
        such as ``knowledge_type``. Clean and corrupted prompts must have the same token length.
    sites : iterable of str
        Site addresses: aliases such as ``"layers[*].resid_pre"``, ``"layers[3].heads[0:4]"`` or real module names.
    positions : sequence
        Position selectors: ``"each"`` (one cell per token), ``"last"``, ``"all"``, an index, ``{"match": text}``.
    operation : str or dict
        ``"replace"`` (copy the source run's activation; the classic patch), ``"zero"``, ``"mean"``,
        ``{"name": "noise", "scale": 3, "relative_to": "embedding_std"}``, ``"resample"``.
    direction : {"denoising", "noising"}
        Denoising patches clean activations into the corrupted run; noising the reverse.
    metrics : sequence of str
        Any of :data:`clap.contract.METRICS`.
    **execution
        ``execution:`` settings of the spec, e.g. ``max_rows=64``, ``device="cpu"``, ``remote="local"``.

    Returns
    -------
    pandas.DataFrame
        One row per probe x site x position x operation x metric with ``clean``, ``corrupted``, ``patched``,
        ``recovery``, ``recovery_defined`` and ``trivial`` (see :mod:`clap.contract`).

    Examples
    --------
    >>> frame = sweep(model, [probe], ["layers[*].mlp_out"], positions=["last"])            # doctest: +SKIP
    >>> frame.groupby("layer").recovery.mean()                                                # doctest: +SKIP
    """
    spec = _sweep_spec("<sweep>", model, probes, sites, positions, operation, direction, metrics, execution)
    return Study(spec, model=model).run()


def _sweep_spec(origin: str, model: LoadedModel, probes: Sequence[dict[str, Any]], sites: Iterable[str],
                positions: Sequence[Any], operation: str | dict[str, Any], direction: str, metrics: Sequence[str],
                execution: dict[str, Any], **fields: Any) -> StudySpec:
    """The study spec a one-line sweep runs (``fields``: further spec fields, e.g. a source model)."""
    return StudySpec.from_dict(
        {
            "model": {"source": model.identity.get("source", "in-memory")},
            "probes": {"inline": list(probes)},
            "sites": list(sites),
            "positions": list(positions),
            "operations": [operation],
            "direction": direction,
            "metrics": list(metrics),
            "execution": {"progress": False, **execution},
            **fields,
        },
        source=origin,
    )


def cross_model_sweep(
    target: LoadedModel,
    source: LoadedModel,
    probes: Sequence[dict[str, Any]],
    sites: Iterable[str] = ("layers[*].resid_pre",),
    positions: Sequence[Any] = ("last",),
    same_prompt: bool = False,
    operation: str | dict[str, Any] = "replace",
    direction: str = "denoising",
    metrics: Sequence[str] = ("logit_diff",),
    **execution: Any,
) -> pd.DataFrame:
    """Patch ``source``'s activations into ``target`` (same architecture, sizes and tokenizer; e.g. a fine-tuned
    model into its base model) at every site and selected position: where did fine-tuning put what it changed?

    ``same_prompt=True``: both models run each probe's clean prompt (only the models differ; probes need no
    corrupted prompt beyond a placeholder); otherwise the source model runs the source prompt (clean when
    denoising) and the target model the other one. ``operation``: ``replace`` or ``{"name": "interpolate",
    "alpha": a}``. The frame adds ``source_model_clean`` / ``source_model_corrupted`` (the source model's own runs),
    and ``recovery`` runs from the target model on the target prompt (0) to the source model on the source prompt
    (1); see :class:`~interventions.study.Study`.

    Examples
    --------
    >>> base, tuned = load_model("smollm2-135m"), load_model("smollm2-135m-epilepsy")    # doctest: +SKIP
    >>> frame = cross_model_sweep(base, tuned, [probe], same_prompt=True)                  # doctest: +SKIP
    >>> frame.groupby("layer").recovery.mean()     # how much of the tuned answer each layer carries  # doctest: +SKIP
    """
    spec = _sweep_spec("<cross_model_sweep>", target, probes, sites, positions, operation, direction, metrics,
                       execution, source_model={"source": source.identity.get("source", "in-memory")},
                       corrupted_prompt="clean" if same_prompt else "probe")
    return Study(spec, model=target, source_model=source).run()


def resid_pre_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """The residual stream entering each block, at each position (TransformerLens: ``get_act_patch_resid_pre``).

    Shows *where and when* the fact flows: early layers carry it at the subject's tokens, later layers at the last
    token. ``kwargs`` go to :func:`sweep`.

    Examples
    --------
    >>> to_grid(resid_pre_sweep(model, [probe]), values="recovery")                           # doctest: +SKIP
    """
    return sweep(model, probes, ["layers[*].resid_pre"], **kwargs)


def attn_out_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """Each attention layer's output, at each position (TransformerLens: ``get_act_patch_attn_out``).

    Attention moves information between positions: a large recovery at the last position marks layers that read
    the fact from earlier tokens. ``kwargs`` go to :func:`sweep`.

    Examples
    --------
    >>> to_grid(attn_out_sweep(model, [probe], positions=["last"]), values="recovery")       # doctest: +SKIP
    """
    return sweep(model, probes, ["layers[*].attn_out"], **kwargs)


def mlp_out_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], **kwargs: Any) -> pd.DataFrame:
    """Each MLP's output, at each position (TransformerLens: ``get_act_patch_mlp_out``).

    MLPs are where factual associations are often stored (Meng et al. 2022); a recovery at the subject's last
    token in early-middle layers is the classic signature. ``kwargs`` go to :func:`sweep`.

    Examples
    --------
    >>> to_grid(mlp_out_sweep(model, [probe]), values="recovery")                             # doctest: +SKIP
    """
    return sweep(model, probes, ["layers[*].mlp_out"], **kwargs)


def head_sweep(model: LoadedModel, probes: Sequence[dict[str, Any]], positions: Sequence[Any] = ("all",),
               **kwargs: Any) -> pd.DataFrame:
    """Every attention head's output (its slice of the output projection's input), all positions together by
    default (TransformerLens: ``get_act_patch_attn_head_out_all_pos``).

    Heads of one layer add up to the layer's attention output, so analyse them per head or summed, never averaged.
    ``kwargs`` go to :func:`sweep`.

    Examples
    --------
    >>> to_grid(head_sweep(model, [probe]), columns="head", values="recovery")               # doctest: +SKIP
    """
    return sweep(model, probes, ["layers[*].heads[*]"], positions=positions, **kwargs)


def to_grid(frame: pd.DataFrame, index: str = "layer", columns: str = "position", values: str = "patched",
            metric: str | None = None) -> pd.DataFrame:
    """Mean of ``values`` over probes as an ``index`` x ``columns`` table (e.g. layer x position, layer x head).

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep's results.
    index, columns : str
        Result columns for rows and columns (``layer``, ``position``, ``head``, ``site_kind``...).
    values : str
        ``patched`` (the metric itself), ``recovery``, ``effect``...
    metric : str, optional
        Which metric's rows; required when the frame holds several.

    Returns
    -------
    pandas.DataFrame
        ``index`` x ``columns``, sorted, NaN where no cell was measured.

    Examples
    --------
    >>> to_grid(frame, values="recovery").round(2)                                           # doctest: +SKIP
    """
    if metric is None:
        metrics = frame["metric"].unique()
        if len(metrics) != 1:
            raise ClapError(f"the frame holds several metrics {list(metrics)}; pass metric= one of them")
        metric = metrics[0]
    chosen = frame[frame["metric"] == metric]
    grid = chosen.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    return grid.sort_index().sort_index(axis=1)
