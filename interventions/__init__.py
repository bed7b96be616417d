"""Activation-patching interventions: specs compiled into batched, single-pass nnsight runs.

Python surface (mirrors the YAML spec one to one)::

    from interventions import Study, StudySpec, load_model
    study = Study.from_yaml("study.yaml")        # validated; errors name file, line and field
    frame = study.run("results/")                # results/results.parquet + results/run.json

    from interventions import resid_pre_sweep, to_grid
    to_grid(resid_pre_sweep(load_model("smollm2-135m"), probes))

Layers: :mod:`spec` (schema) -> :mod:`sites` / :mod:`probes` (resolution) -> :mod:`plan` (cells and batches) ->
:mod:`execute` (nnsight traces) -> :mod:`results` (tidy frame and files); :mod:`study` ties them together.
"""

from __future__ import annotations

from clap.models import LoadedModel, load_model, wrap
from interventions.attribution import attribution_from_spec, attribution_sweep
from interventions.sites import Site, SiteResolver
from interventions.spec import OperationSpec, PatchGroup, ProbeSpec, StudySpec
from interventions.study import Study
from interventions.sweeps import (
    attn_out_sweep,
    cross_model_sweep,
    head_sweep,
    mlp_out_sweep,
    resid_pre_sweep,
    sweep,
    to_grid,
)

__all__ = [
    "LoadedModel",
    "OperationSpec",
    "PatchGroup",
    "ProbeSpec",
    "Site",
    "SiteResolver",
    "Study",
    "StudySpec",
    "attn_out_sweep",
    "attribution_from_spec",
    "attribution_sweep",
    "cross_model_sweep",
    "head_sweep",
    "load_model",
    "mlp_out_sweep",
    "resid_pre_sweep",
    "sweep",
    "to_grid",
    "wrap",
]
