"""Run batches as nnsight traces (local, NDIF, or nnsight's local simulation of NDIF).

Each batch is one ``model.trace`` over all its rows. The trace body applies each module access's edits and reduces
the last position's logits to metrics with :mod:`interventions.kernel`, the one place that defines both; the kernel
imports only torch and is shipped to NDIF by value, so the body runs there unchanged (tests run every plan with
``remote="local"``, which hides clap from the deserialised request, to prove it). Only a ``[rows, n_metrics]``
tensor comes back.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from clap.errors import ClapError
from interventions import kernel
from interventions.plan import Batch

log = logging.getLogger(__name__)

#: metric columns computed in every forward pass, in this order


class RemoteError(ClapError):
    pass


def trace_kwargs(remote: bool | str) -> dict[str, Any]:
    """nnsight's ``remote`` argument: False, True (NDIF) or "local" (simulation). A remote trace ships the edit
    kernel by value (the server has no clap)."""
    if remote is False or remote is None:
        return {}
    kernel.register_for_remote()
    return {"remote": remote}


def check_remote(remote: bool | str, model_source: str) -> None:
    """Fail fast (and never print the key) when NDIF is requested but cannot be used."""
    if remote is not True:
        return
    import requests
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY") or getattr(CONFIG.API, "APIKEY", None)
    if not key:
        raise RemoteError(
            "remote: true needs an NDIF API key: set NDIF_API_KEY or run `python -c \"import nnsight; "
            "nnsight.CONFIG.set_default_api_key('...')\"`"
        )
    if os.environ.get("NDIF_API_KEY"):
        CONFIG.API.APIKEY = os.environ["NDIF_API_KEY"]
    if os.path.exists(os.path.expanduser(model_source)) or model_source.endswith(".gguf"):
        raise RemoteError(
            f"remote: true runs on NDIF's hosted models, addressed by hub id; {model_source!r} is a local file"
        )
    host = CONFIG.API.HOST
    url = host if host.startswith("http") else f"https://{host}"
    try:
        requests.get(url.rstrip("/") + "/status", timeout=5)
    except requests.RequestException as exc:
        raise RemoteError(
            f"NDIF at {url} cannot be reached ({type(exc).__name__}); check the network or run with "
            f"remote: false (local) or remote: local (simulation)"
        ) from None


def _plain_accesses(model: Any, batch: Batch) -> list[tuple]:
    """Batch patches as tuples ``(envoy, access, n_heads, stages)``, each stage a ``(full, heads)`` pair of
    ``(copy, set, add, mix)`` tuples of :class:`~interventions.kernel.Edits`: what :func:`kernel.edit_access`
    takes, picklable where clap is not installed (the kernel ships by value)."""
    return [
        (model.get(p.module), p.access, p.n_heads or 0,
         [(full.as_tuple(), heads.as_tuple()) for full, heads in p.stages])
        for p in batch.accesses
    ]


def forward_kwargs(model: Any, batch: Batch, unembed_module: str | None) -> dict[str, Any]:
    """Inputs of the forward pass. Only the last position's logits are read, so unless a patch touches the
    unembedding itself, the model computes logits for the last position alone (``logits_to_keep=1``): the
    vocabulary projection of every other position is skipped, a large share of time and memory for short prompts."""
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    touches_unembed = any(p.module == unembed_module for p in batch.accesses)
    if unembed_module is not None and not touches_unembed and keeps_last_logits(model._module):
        kwargs["logits_to_keep"] = 1
    return kwargs


def keeps_last_logits(module: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do): then only the last
    position need be unembedded."""
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def device_of(model: Any, remote: bool | str) -> torch.device:
    """Where batch tensors must live: the model's device locally; CPU for NDIF (the server places them)."""
    if remote is True:
        return torch.device("cpu")
    parameter = next(model._module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def metric_dtype_for(device: torch.device) -> torch.dtype:
    """float64 for the metric reductions (softmax, KL, log-probability of an answer set), except on Apple's MPS,
    which has no float64: there they stay float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, (torch.Tensor, kernel.Edits)):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def run_batch(model: Any, batch: Batch, remote: bool | str = False, unembed_module: str | None = None) -> torch.Tensor:
    """One forward pass with every patch of the batch; returns ``[rows, len(METRICS)]`` metrics, reduced in float64
    (``metric_dtype_for``) from the model's last-position logits."""
    device = device_of(model, remote)
    metric_dtype = metric_dtype_for(device)
    accesses = [(envoy, access, n_heads, _moved(stages, device))
                for envoy, access, n_heads, stages in _plain_accesses(model, batch)]
    inputs = _moved(forward_kwargs(model, batch, unembed_module), device)
    answer_index, answer_mask, wrong_index, wrong_mask, clean_row = _moved(
        (batch.answer_index, batch.answer_mask, batch.wrong_index, batch.wrong_mask, batch.clean_row), device
    )
    with torch.no_grad():
        with model.trace(**inputs, **trace_kwargs(remote)):
            for envoy, access, n_heads, stages in accesses:
                if access == "input":
                    envoy.input = kernel.edit_access(envoy.input, n_heads, stages)
                else:
                    envoy.output = kernel.edit_access(envoy.output, n_heads, stages)
            metrics, _ = kernel.reduce_metrics(model.output.logits[:, -1, :], answer_index, answer_mask, wrong_index,
                                               wrong_mask, clean_row=clean_row, dtype=metric_dtype)
            metrics = metrics.save()
    return metrics.detach().cpu()


def capture(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, modules: Sequence[tuple[str, str]],
            remote: bool | str = False) -> list[torch.Tensor]:
    """Activations at (module, access) pairs, in the given (execution) order, for statistics such as means."""
    envoys = [(model.get(module), access) for module, access in modules]
    device = device_of(model, remote)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    saved = []
    with torch.no_grad():
        with model.trace(input_ids=input_ids, attention_mask=attention_mask, **trace_kwargs(remote)):
            for envoy, access in envoys:
                value = envoy.input if access == "input" else envoy.output
                if isinstance(value, tuple):
                    value = value[0]
                saved.append(value.clone().save())
    return [s.detach().cpu() for s in saved]
