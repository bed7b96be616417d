"""Activation-patching interventions: specs compiled into batched, single-pass nnsight runs.

Python surface (mirrors the YAML spec one to one)::

    from interventions import Study, StudySpec, load_model
    study = Study.from_yaml("study.yaml")        # validated; errors name file, line and field
    frame = study.run("results/")                # results/results.parquet + results/run.json

    from interventions import resid_pre_sweep, to_grid
    to_grid(resid_pre_sweep(load_model("smollm2-135m"), probes))

Layers: :mod:`spec` (schema) -> :mod:`sites` / :mod:`probes` (resolution) -> :mod:`plan` (cells and batches) ->
:mod:`executor` (the substrates, every one applying :mod:`kernel`'s edits) -> :mod:`tidy` / :mod:`output` (tidy
frame and files); :mod:`resolved` resolves a study once and :mod:`study` ties them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clap.lazy import lazy_exports

#: Each public name and the module it lives in: imported on first use, so ``clap --help`` never loads torch.
_EXPORTS = {
    "LoadedModel": "clap.models",
    "load_model": "clap.models",
    "wrap": "clap.models",
    "attribution_from_spec": "interventions.attribution",
    "attribution_sweep": "interventions.attribution",
    "Site": "interventions.sites",
    "SiteResolver": "interventions.sites",
    "OperationSpec": "interventions.spec",
    "PatchGroup": "interventions.spec",
    "ProbeSpec": "interventions.spec",
    "StudySpec": "interventions.spec",
    "Study": "interventions.study",
    "attn_out_sweep": "interventions.sweeps",
    "cross_model_sweep": "interventions.sweeps",
    "head_sweep": "interventions.sweeps",
    "mlp_out_sweep": "interventions.sweeps",
    "resid_pre_sweep": "interventions.sweeps",
    "sweep": "interventions.sweeps",
    "to_grid": "interventions.sweeps",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time the names above are imported on first use
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
