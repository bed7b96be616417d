"""Run batches as nnsight traces (local, NDIF, or nnsight's local simulation of NDIF).

Each batch is one ``model.trace`` over all its rows. The trace body only uses torch operations on plain tensors
and the model's envoys, never clap's own functions, so nnsight can ship it to NDIF unchanged (tests run every plan
with ``remote="local"`` to prove it). Metrics are computed inside the trace from the last position's logits and
only a ``[rows, n_metrics]`` tensor comes back.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from clap.errors import ClapError
from interventions.plan import Batch

log = logging.getLogger(__name__)

#: metric columns computed in every forward pass, in this order


class RemoteError(ClapError):
    pass


def trace_kwargs(remote: bool | str) -> dict[str, Any]:
    """nnsight's ``remote`` argument: False, True (NDIF) or "local" (simulation)."""
    if remote is False or remote is None:
        return {}
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
    """Batch patches as plain tuples ``(envoy, access, n_heads, stages)``, each stage a list of ``(full, heads)``
    groups, each group a ``(copy, set, add, mix)`` tuple of dicts of tensors: picklable where clap is not installed
    (NDIF)."""
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
    if unembed_module is not None and not touches_unembed:
        if "logits_to_keep" in inspect.signature(model._module.forward).parameters:
            kwargs["logits_to_keep"] = 1
    return kwargs


def _device_of(model: Any, remote: bool | str) -> torch.device:
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
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def run_batch(model: Any, batch: Batch, remote: bool | str = False, unembed_module: str | None = None) -> torch.Tensor:
    """One forward pass with every patch of the batch; returns ``[rows, len(METRICS)]`` metrics, reduced in float64
    (``metric_dtype_for``) from the model's last-position logits."""
    device = _device_of(model, remote)
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
                # Patch a copy and hand it back: writing into the live tensor in place would also change every
                # other reader of it (q/k/v projections share their input; a norm's input is the residual).
                original = envoy.input if access == "input" else envoy.output
                value = (original[0] if isinstance(original, tuple) else original).clone()
                for full, heads in stages:  # baseline interventions, then the cells' own
                    views = [(value, full)]
                    if n_heads:
                        views.append((value.view(value.shape[0], value.shape[1], n_heads, -1), heads))
                    for view, (copy, set_, add, mix) in views:
                        by_head = view.dim() == 4
                        if copy:
                            target = (copy["t_row"], copy["t_col"]) + ((copy["head"],) if by_head else ())
                            source = (copy["s_row"], copy["s_col"]) + ((copy["head"],) if by_head else ())
                            view[target] = view[source]
                        if set_:
                            target = (set_["t_row"], set_["t_col"]) + ((set_["head"],) if by_head else ())
                            view[target] = set_["values"].to(view.dtype)
                        if add:
                            target = (add["t_row"], add["t_col"]) + ((add["head"],) if by_head else ())
                            view[target] = view[target] + add["values"].to(view.dtype)
                        if mix:
                            target = (mix["t_row"], mix["t_col"]) + ((mix["head"],) if by_head else ())
                            source = (mix["s_row"], mix["s_col"]) + ((mix["head"],) if by_head else ())
                            alpha = mix["alpha"].to(view.dtype)
                            # towards given values (another model's activations) or a row of this batch
                            towards = mix["values"].to(view.dtype) if "values" in mix else view[source]
                            view[target] = view[target] + alpha * (towards - view[target])
                patched = (value, *original[1:]) if isinstance(original, tuple) else value
                if access == "input":
                    envoy.input = patched
                else:
                    envoy.output = patched
            # metrics in float64: a float32 sum over a 50k-150k vocabulary is off by ~2e-5 relative (3e-4 at a KL
            # of 16), and the reduction order would make numbers depend on what else shares the batch
            logits = model.output.logits[:, -1, :].to(metric_dtype)
            logprobs = torch.log_softmax(logits, dim=-1)
            answer_logit = (logits.gather(1, answer_index) * answer_mask).sum(1) / answer_mask.sum(1)
            wrong_logit = (logits.gather(1, wrong_index) * wrong_mask).sum(1) / wrong_mask.sum(1)
            # log P(answer set) by logsumexp over the set: exact where the probability underflows float32
            answer_logprobs = logprobs.gather(1, answer_index).masked_fill(answer_mask == 0, float("-inf"))
            logprob = torch.logsumexp(answer_logprobs, dim=1)
            prob = logprob.exp()
            clean_logprobs = logprobs[clean_row]
            kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(1)
            metrics = torch.stack(
                [answer_logit - wrong_logit, answer_logit, prob, logprob, kl], dim=1
            ).save()
    return metrics.detach().cpu()


def capture(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, modules: Sequence[tuple[str, str]],
            remote: bool | str = False) -> list[torch.Tensor]:
    """Activations at (module, access) pairs, in the given (execution) order, for statistics such as means."""
    envoys = [(model.get(module), access) for module, access in modules]
    device = _device_of(model, remote)
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
