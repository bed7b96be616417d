"""Attribution patching: a first-order (gradient) approximation of activation patching for every site and position
at once.

Activation patching replaces one activation ``a`` of the target run by the source run's ``a'`` and measures the
metric ``M``; that costs one forward pass per cell. Attribution patching (Nanda 2023; Syed, Rager and Conmy 2023,
"Attribution Patching Outperforms Automated Circuit Discovery") takes the first-order Taylor expansion of ``M``
around the target run instead::

    M(patched) - M(target)  ~=  (a_source - a_target) . dM/da |_target

so the effect of patching *every* site at *every* position comes from one forward pass over the clean and corrupted
prompts and one backward pass. Denoising (the default) patches clean into corrupted, so the gradient is taken at the
corrupted run; noising patches corrupted into clean, with the gradient at the clean run. The metric is the logit
difference (mean answer logit minus mean wrong logit, over each token set) at the last position, as in clap's exact
engine; ``patched`` = the target run's metric + the first-order change, and ``effect = patched - corrupted`` and
``recovery = (patched - corrupted) / (clean - corrupted)`` as for exact rows, in both directions (for denoising the
effect is the first-order change itself). Every row carries ``approximate=True``.

When it fails: the expansion is exact only where ``M`` is linear in the patched activation (the final norm's
output or the unembedding's input at the last position). Through layer norms, attention softmaxes and MLP
nonlinearities a large clean - corrupted difference (early residual stream at the subject tokens, whose patch
changes everything downstream) is poorly approximated, and saturated outputs (a probability near 1) have
gradients near 0 whatever the patch would do. Use it to rank sites and choose what to patch exactly, not as the
final number; ``bench/attribution.py`` measures the agreement with exact patching on SmolLM2-135M.

Integrated gradients along the input path (``steps = k >= 2``; EAP-IG, Hanna, Pezzelle and Belinkov 2024): the
gradient is instead averaged over ``k`` points of the straight line from the target prompt's token embeddings to
the source prompt's (the trapezoid rule, endpoints included), still multiplied by the site's own
``a_source - a_target``. For pairs of equal length the path ends at the source run, so the estimates at the first
layer's input (GPT-2, Llama: nothing nonlinear between the embedding and the first block) add up to the whole
``M(source) - M(target)`` as ``k`` grows (completeness; for pairs of different length the path ends at the source's
tokens in the target's context instead). Large changes downstream of the tokens that differ are followed far
better than by the gradient at one end; small, local patches (a head at the last position), which the target-run
gradient already describes well, are described a little worse, because the path's gradients are taken in contexts
the exact patch never sees. The path points are extra rows of the same pass (``k - 2`` blocks, their embeddings
written inside the trace; the two ends are the target and source rows themselves when every pair has equal length,
else the far end gets rows of its own: the target's attention mask with the source's tokens where both prompts
have one). Tokens without a counterpart stay at the target's embedding along the path.

How the gradients are taken, and why not nnsight's ``with metric.backward(): act.grad``: the trace body reads every
site's activation (nnsight envoys, in forward-execution order), computes the metric from the logits and calls
``torch.autograd.grad(metric, activations)`` on the real tensors inside the same trace. nnsight 0.8.1's backward
tracer serves ``.grad`` through one hook per tensor, and two sites often *are* one tensor (block ``i``'s output is
block ``i+1``'s input; every head of a layer reads one ``o_proj`` input), so a second read of the same tensor's
gradient would wait for a hook that never fires; ``Tensor.backward`` would also accumulate into the model's
parameters' ``.grad``, a side effect on the caller's model, while ``autograd.grad`` computes exactly the gradients
asked for. The body uses only torch operations, envoys and the edit kernel (shipped by value), so it also runs under
nnsight's local simulation of NDIF (``remote="local"``, tested); on NDIF itself it needs a backend that runs traces
with gradients enabled (a backend under ``torch.inference_mode`` cannot), which clap cannot check from here: treat
``remote: true`` as untested.

Layout: one trace per chunk of probes, rows ``[target prompts; source prompts]`` left-padded to one width. Left
padding right-aligns every row, so a column holds the same token of a probe's target and source prompt when they
have equal length (``alignment: strict``) and the right-aligned counterpart otherwise (``alignment: right``).
Batched rows do not interact, so the gradient of the summed target-row metric with respect to a target row's
activation is that row's own gradient. Only ``[probes, columns, heads]`` effect tensors and the baseline metrics
leave the trace.

This module is standalone on purpose: it reuses :mod:`interventions.sites` (site resolution and heads) and
:mod:`interventions.probes` (tokenisation, answers and position selectors) and none of the exact engine's plan or
execution code. ``attribution_sweep`` is the Python entry point. In a study spec it is the operation
``attribution`` (:class:`interventions.operations.Attribution`): ``Study`` runs the groups that name it through
:func:`study_rows` (checked by :func:`check_spec` and :func:`check_sites`) and the other operations through its
batches, in one results frame; :func:`attribution_from_spec` runs a whole spec this way (every ``replace`` estimated).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from pydantic import TypeAdapter, ValidationError

from clap.architectures import BY_MODEL_TYPE
from clap.errors import ClapError
from clap.models import LoadedModel
from interventions import full_traces, kernel
from interventions.alignment import aligned_pairs, left_pad
from interventions.alignment import column as padded_column
from interventions.output import recovery, to_frame
from interventions.plan import directions
from interventions.probes import (
    PositionCell,
    Probe,
    check_alignment,
    check_context,
    resolve_positions,
    tokenize_probes,
)
from interventions.resolved import ResolvedStudy, load_spec_model, resolve_addresses, spec_probes
from interventions.sites import Site, SiteResolver
from interventions.spec import OperationSpec, PositionSelector, ProbeSpec, SpecError, StudySpec

#: the metrics attribution patching approximates (the gradient of the logit difference at the last position)
APPROXIMATED_METRICS = ("logit_diff",)  # the metric whose gradient is taken
#: the operation's name in specs and in the results' ``operation`` column
OPERATION = "attribution"
#: rows of a forward/backward pass when nothing else is said (``rows_per_probe`` rows per probe)
DEFAULT_ROWS_PER_PASS = 64


class AttributionError(ClapError):
    pass


@dataclass
class _Chunk:
    """The tensors of one pass: rows ``0..n-1`` are target prompts, ``n..2n-1`` the same probes' source prompts."""

    probes: list[int]  #: indices into the probe list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor
    answer_mask: torch.Tensor
    wrong_index: torch.Tensor
    wrong_mask: torch.Tensor


def operation_label(steps: int) -> str:
    """The results' ``operation`` of attribution rows: ``attribution``, or ``attribution(ig<steps>)`` along a path."""
    return OperationSpec(name=OPERATION, steps=steps).label


def path_points(points: int) -> list[tuple[float, float]]:
    """(alpha, weight) of the gradient evaluations: ``points = 1`` is the target run alone (weight 1: attribution
    patching proper); ``points = k >= 2`` is the trapezoid rule over ``k`` equally spaced points of the straight
    line from the target input (alpha 0) to the source input (alpha 1), whose weights sum to 1."""
    if points < 1:
        raise AttributionError(f"gradient points must be at least 1, got {points}")
    if points == 1:
        return [(0.0, 1.0)]
    step = 1.0 / (points - 1)
    return [(j * step, step / 2 if j in (0, points - 1) else step) for j in range(points)]


def _build_chunk(probes: Sequence[Probe], members: list[int], target: str, source: str, pad_id: int,
                 extra_rows: int = 0) -> _Chunk:
    """Rows ``[target prompts; source prompts]`` and then ``extra_rows`` more blocks of the target prompts (the
    path points between the two runs, whose embeddings the trace overwrites)."""
    targets = [probes[p].prompt_ids(target) for p in members]
    prompts = targets + [probes[p].prompt_ids(source) for p in members] + targets * extra_rows
    input_ids, attention_mask = left_pad(prompts, pad_id)
    answers = [probes[p].answer_ids for p in members] * (2 + extra_rows)
    wrongs = [probes[p].wrong_ids for p in members] * (2 + extra_rows)
    answer_index, answer_mask = kernel.token_sets(answers)
    wrong_index, wrong_mask = kernel.token_sets(wrongs)
    return _Chunk(members, input_ids, attention_mask, answer_index, answer_mask, wrong_index, wrong_mask)


def _path_rows(probes: Sequence[Probe], members: list[int], target: str, source: str,
               points: int) -> tuple[list[float], list[float]]:
    """How the path points map to rows: (alphas of the extra row blocks, the weight of every row block: target
    rows, source rows, then the extra blocks). The path's end (alpha 1: the source input under the target's
    attention mask) *is* the source run when every probe's two prompts have equal length, and its gradient is then
    read from the source rows; otherwise the end gets rows of its own (the source run attends to tokens the target
    lacks) and the source rows weigh 0."""
    path = path_points(points)
    if points == 1:
        return [], [1.0, 0.0]
    equal = all(len(probes[p].prompt_ids(target)) == len(probes[p].prompt_ids(source)) for p in members)
    inner = path[1:-1] if equal else path[1:]
    return [a for a, _ in inner], [path[0][1], path[-1][1] if equal else 0.0, *(w for _, w in inner)]


def _accesses(sites: Sequence[Site]) -> list[tuple[str, str, int]]:
    """Distinct (module, access, n_heads) in the sites' (forward-execution) order; n_heads 0 where no head site
    reads the tensor. Sites sharing an access (the heads of one layer) share one gradient."""
    out: dict[tuple[str, str], int] = {}
    for site in sites:
        heads = site.n_heads if site.kind == "head" else 0
        out[site.access_key] = max(out.get(site.access_key, 0), heads or 0)
    return [(module, access, heads) for (module, access), heads in out.items()]


def _forward_kwargs(model: LoadedModel, chunk: _Chunk, sites: Sequence[Site]) -> dict[str, Any]:
    """Logits of the last position only (``logits_to_keep=1``) unless a site is the unembedding's input or output,
    which then needs every position (with ``logits_to_keep`` it would hold the last one alone)."""
    kwargs: dict[str, Any] = {"input_ids": chunk.input_ids, "attention_mask": chunk.attention_mask}
    arch = BY_MODEL_TYPE.get(getattr(model.hf.config, "model_type", None))
    unembed = arch.unembed if arch else None
    touches = any(site.module == unembed for site in sites)
    if unembed is not None and not touches and full_traces.keeps_last_logits(model.hf):
        kwargs["logits_to_keep"] = 1
    return kwargs


def _run_chunk(model: LoadedModel, chunk: _Chunk, sites: Sequence[Site], embed_module: str | None,
               remote: bool | str, path: tuple[list[float], list[float]] = ([], [1.0, 0.0]),
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward and one backward pass. Returns the logit difference of the target and source rows ``[2n]`` and,
    per access, ``[n, width, heads or 1]``: ``(a_source - a_target) . g`` summed over each head's slice (or the
    whole width), per padded column, where ``g`` is the gradient of the metric at the target run, or with path
    points (:func:`_path_rows`: the extra row blocks' alphas, every block's weight) the weighted sum of its
    gradients along the path from the target's input embeddings to the source's."""
    alphas, block_weights = path
    nn = model.nn
    parameter = next(model.hf.parameters())
    device = torch.device("cpu") if remote is True else parameter.device
    accesses = [(nn.get(module), access, heads) for module, access, heads in _accesses(sites)]
    if alphas and not embed_module:
        raise AttributionError("gradient points along the path need the model's token embedding module, which "
                               "clap's architecture table does not name for this model")
    embed_is_site = any(m == embed_module and a == "output" for m, a, _ in _accesses(sites))
    embed = nn.get(embed_module) if embed_module and (alphas or not embed_is_site) else None
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in _forward_kwargs(model, chunk, sites).items()}
    answer_index, answer_mask = chunk.answer_index.to(device), chunk.answer_mask.to(device)
    wrong_index, wrong_mask = chunk.wrong_index.to(device), chunk.wrong_mask.to(device)
    n = len(chunk.probes)
    blocks = len(block_weights)
    # the weight of each row's metric in the differentiated sum: target rows, source rows, then each path block
    row_weight = torch.tensor(block_weights, dtype=torch.float64).repeat_interleave(n).to(device)
    # the path moves only tokens both prompts have (right-aligned): a target token without a source counterpart
    # stays put, as an exact patch leaves it
    shared = (chunk.attention_mask[:n] * chunk.attention_mask[n:2 * n]).unsqueeze(-1)
    mix = (torch.tensor(alphas).reshape(-1, 1, 1, 1) * shared).to(parameter.dtype).to(device)
    remote_kwargs = full_traces.trace_kwargs(remote)
    with torch.enable_grad():
        with nn.trace(**kwargs, **remote_kwargs):
            embedded = None
            if embed is not None:
                start = embed.output
                if alphas:  # path rows: target + alpha (source - target) of the token embeddings
                    ends = start[: 2 * n]
                    inner = ends[:n] + mix * (ends[n:] - ends[:n])
                    start = torch.cat([ends, inner.reshape(-1, *ends.shape[1:])])
                    if not start.requires_grad:
                        start.requires_grad_(True)
                    embed.output = start
                    embedded = start
                elif not start.requires_grad:  # frozen weights: let the graph start at the token embeddings
                    start.requires_grad_(True)
            values = []
            for envoy, access, _heads in accesses:
                if embedded is not None and envoy is embed and access == "output":
                    value = embedded
                else:
                    value = envoy.input if access == "input" else envoy.output
                    value = value[0] if isinstance(value, tuple) else value
                if not value.requires_grad:  # the embedding itself, with frozen weights
                    value.requires_grad_(True)
                values.append(value)
            logit_diff = kernel.logit_difference(nn.output.logits[:, -1, :].to(torch.float64), answer_index,
                                                 answer_mask, wrong_index, wrong_mask)
            # rows never interact, so the gradient of the weighted sum of row metrics is each row's own gradient,
            # weighted (zero for rows of weight 0); summed over a probe's row blocks it is the path's quadrature
            grads = torch.autograd.grad((logit_diff * row_weight).sum(), values, allow_unused=True)
            effects = []
            for value, grad, (_envoy, _access, heads) in zip(values, grads, accesses, strict=True):
                if grad is None:  # the metric does not depend on this tensor
                    grad = torch.zeros_like(value)
                grad = grad.to(torch.float64).reshape(blocks, n, *grad.shape[1:]).sum(0)
                delta = (value[n:2 * n] - value[:n]).detach().to(torch.float64)
                product = delta * grad
                product = product.reshape(n, product.shape[1], heads, -1) if heads else product.unsqueeze(2)
                effects.append(product.sum(-1).reshape(n, -1))
            # one tensor back: the baseline metrics, then each access's [n, width x (heads or 1)] block
            packed = torch.cat([logit_diff[: 2 * n].detach().reshape(2, n).t(), *effects], dim=1).save()
    packed = packed.detach().cpu()
    metric = torch.cat([packed[:, 0], packed[:, 1]])
    width = chunk.input_ids.shape[1]
    out, start = [], 2
    for _module, _access, heads in _accesses(sites):
        size = width * (heads or 1)
        out.append(packed[:, start:start + size].reshape(n, width, heads or 1))
        start += size
    return metric, out


def _parse_positions(positions: Sequence[Any]) -> list[Any]:
    try:
        return TypeAdapter(list[PositionSelector]).validate_python(list(positions))
    except ValidationError:
        raise AttributionError(
            f"bad positions {list(positions)!r}: a position is all | each | last | none | an integer | "
            "{match: text} | {indices: [integers]}"
        ) from None


def _check_sites(sites: Sequence[Site], embed_module: str | None) -> None:
    for site in sites:
        if embed_module and site.module == embed_module and site.access == "input":
            raise AttributionError(f"site {site.name}: the embedding's input is token ids, which have no gradient")


def attribute(
    model: LoadedModel,
    probes: Sequence[Probe],
    groups: Sequence[tuple[Sequence[Site], Sequence[Any]]],
    direction: str = "denoising",
    probes_per_pass: int | None = None,
    remote: bool | str = False,
    recovery_epsilon: float = 1e-6,
    steps: int = 1,
) -> pd.DataFrame:
    """The attribution of every (site, position selection) of every group for every probe, as a tidy frame.

    ``groups`` are (sites, position selectors); a selection of several tokens (``all``, ``indices``, ``match``) gets
    the sum of its tokens' first-order effects, which is what the linear approximation says of patching them
    together. ``steps`` (>= 2) integrates the gradient along the input path (:func:`path_points`); the rows'
    ``operation`` is then ``attribution(ig<steps>)``."""
    target, source = directions(direction)
    missing = [p.id for p in probes if not p.wrong_ids]
    if missing:
        raise AttributionError(f"metric logit_diff needs a `wrong` answer for every probe; missing for "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    arch = BY_MODEL_TYPE.get(getattr(model.hf.config, "model_type", None))
    embed_module = arch.embed if arch else None
    resolver = SiteResolver(model.hf)
    all_sites = sorted({s.name: s for sites, _ in groups for s in sites}.values(), key=resolver.order_key)
    if not all_sites:
        raise AttributionError("no sites to attribute")
    _check_sites(all_sites, embed_module)
    access_index = {(m, a): i for i, (m, a, _) in enumerate(_accesses(all_sites))}
    path_points(steps)  # checks steps
    label = operation_label(steps)
    per_pass = probes_per_pass or max(1, DEFAULT_ROWS_PER_PASS // rows_per_probe(probes, target, source, steps))
    pad_id = model.tokenizer.pad_token_id
    tokenizer = model.tokenizer
    records = []
    for begin in range(0, len(probes), per_pass):
        members = list(range(begin, min(begin + per_pass, len(probes))))
        path = _path_rows(probes, members, target, source, steps)
        chunk = _build_chunk(probes, members, target, source, pad_id, extra_rows=len(path[0]))
        metric, effects = _run_chunk(model, chunk, all_sites, embed_module, remote, path)
        width = chunk.input_ids.shape[1]
        n = len(members)
        for row, p in enumerate(members):
            probe = probes[p]
            target_ids, source_ids = probe.prompt_ids(target), probe.prompt_ids(source)
            n_t, n_s = len(target_ids), len(source_ids)
            values = {target: float(metric[row]), source: float(metric[n + row])}
            clean, corrupted = values["clean"], values["corrupted"]
            for sites, selectors in groups:
                cells = [c for sel in selectors for c in resolve_positions(sel, probe, target, source, tokenizer)]
                for site in sites:
                    table = effects[access_index[site.access_key]][row]  # [width, heads or 1]
                    column = table[:, site.head] if site.kind == "head" else table.sum(-1)
                    for cell in cells:
                        records.append(_record(probe, site, cell, column, width, n_t, n_s, target_ids, source_ids,
                                               tokenizer, clean, corrupted, values[target], direction,
                                               recovery_epsilon, label))
    frame = pd.DataFrame.from_records(records)
    return to_frame(frame, sorted(probes[0].labels))


def _record(probe: Probe, site: Site, cell: PositionCell, column: torch.Tensor, width: int, n_t: int, n_s: int,
            target_ids: Sequence[int], source_ids: Sequence[int], tokenizer: Any, clean: float, corrupted: float,
            baseline: float, direction: str, epsilon: float, label: str) -> dict[str, Any]:
    # right alignment: tokens without a source counterpart patch nothing
    pairs = aligned_pairs(cell.indices, n_t, n_s)
    effect = float(sum(float(column[padded_column(i, n_t, width)]) for i, _ in pairs))
    patched = baseline + effect
    rec, defined = recovery(clean, corrupted, patched, epsilon)
    kept = [i for i, _ in pairs]
    return {
        "probe_id": probe.id,
        **probe.labels,
        "site": site.name,
        "site_kind": site.kind,
        "module": site.module,
        "layer": site.layer,
        "head": site.head,
        "position": cell.position if cell.position in kept else None,
        "positions": cell.label,
        "token": "".join(tokenizer.decode([target_ids[i]]) for i in kept),
        "source_token": "".join(tokenizer.decode([source_ids[j]]) for _, j in pairs),
        "operation": label,
        "direction": direction,
        "metric": "logit_diff",
        "clean": clean,
        "corrupted": corrupted,
        "patched": patched,
        "recovery": float(rec),
        "recovery_defined": bool(defined),
        "trivial": bool(site.terminal and (n_t - 1) in kept),
        "n_patched_tokens": len(kept),
        "effect": patched - corrupted,  # the exact rows' definition in both directions (README), not patched - target
        "approximate": True,
    }


def _probes_from(model: LoadedModel, probes: Sequence[Probe | dict[str, Any] | ProbeSpec], multi_token: str,
                 alignment: str) -> list[Probe]:
    if all(isinstance(p, Probe) for p in probes):
        out = list(probes)
    else:
        specs = []
        for i, item in enumerate(probes):
            try:
                spec = item if isinstance(item, ProbeSpec) else ProbeSpec.model_validate(item)
            except ValidationError as exc:
                raise AttributionError(f"probes[{i}]: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
            specs.append((f"probes[{i}]", spec))
        out = tokenize_probes(specs, model.tokenizer, multi_token)
    check_alignment(out, alignment)
    check_context(out, model.hf.config)
    return out


def attribution_sweep(
    model: LoadedModel,
    probes: Sequence[Probe | dict[str, Any] | ProbeSpec],
    sites: Iterable[str] = ("layers[*].resid_pre",),
    positions: Sequence[Any] = ("each",),
    metric: str = "logit_diff",
    direction: str = "denoising",
    multi_token: str = "error",
    alignment: str = "strict",
    probes_per_pass: int | None = None,
    remote: bool | str = False,
    steps: int = 1,
) -> pd.DataFrame:
    """Approximate the patching sweep over ``sites`` x ``positions`` for every probe in one forward and one backward
    pass per chunk of probes; one tidy row per cell (the exact results' columns, plus ``effect`` and
    ``approximate=True``). ``steps >= 2``: the gradient integrated along the straight line between the two prompts'
    input embeddings (trapezoid rule over ``steps`` points; EAP-IG): ``steps`` rows per probe instead of 2, one more
    when a pair differs in length (:func:`rows_per_probe`).

    >>> frame = attribution_sweep(model, probes, ["layers[*].resid_pre"], positions=["each"])
    >>> to_grid(frame, values="recovery")            # layer x position, approximate recovery
    """
    if metric not in APPROXIMATED_METRICS:
        raise AttributionError(f"attribution patching approximates {', '.join(APPROXIMATED_METRICS)} only, "
                               f"not {metric!r}")
    resolver = SiteResolver(model.hf)
    resolved = resolver.resolve(list(sites))
    return attribute(model, _probes_from(model, probes, multi_token, alignment),
                     [(resolved, _parse_positions(positions))], direction=direction,
                     probes_per_pass=probes_per_pass, remote=remote, steps=steps)


# -- as an operation of the study spec ---------------------------------------------------------------------------
def _locations(spec: StudySpec) -> list[tuple]:
    """The key path of each patch group's ``sites``, in ``spec.groups()`` order."""
    return ([("sites",)] if spec.sites else []) + [("patches", g, "sites") for g in range(len(spec.patches or []))]


def named_groups(spec: StudySpec) -> list[tuple[int, tuple, tuple]]:
    """(group index, key path of its sites, key path of the operation) for every ``attribution`` operation of every
    patch group (a group without its own ``operations`` takes the study's); a group naming it twice (with different
    ``steps``) appears twice."""
    out = []
    for g, (location, (_, _, ops)) in enumerate(zip(_locations(spec), spec.groups(), strict=True)):
        own = location[0] == "patches" and spec.patches[location[1]].operations
        for index, op in enumerate(ops):
            if op.name == OPERATION:
                out.append((g, location, (location[:-1] + ("operations", index)) if own else ("operations", index)))
    return out


def check_spec(spec: StudySpec, named: Sequence[tuple[int, tuple, tuple]] | None = None) -> None:
    """Refuse, naming file and line, what a first-order expansion of the logit difference around the plain target
    run cannot estimate: other metrics, a baseline intervention (the expansion point would be an intervened run),
    noise samples, windows and combined sites (several sites patched together in one cell), and a second model.
    Checked before any weights load."""
    named = named_groups(spec) if named is None else named
    if not named:
        return
    at = spec.where(named[0][2])
    if spec._source and at.startswith(f"{spec._source}:"):  # the same file: its line is enough
        at = "line " + at[len(spec._source) + 1:].lstrip()

    def refuse(location: tuple, what: str) -> None:
        raise SpecError(f"{spec.where(location)}: {what} (operation `attribution` at {at})")

    other = [m for m in spec.metrics if m not in APPROXIMATED_METRICS]
    if other:
        refuse(("metrics",), f"attribution patching approximates {', '.join(APPROXIMATED_METRICS)} only; remove "
                             f"{', '.join(other)}, or run the exact operations in a spec of their own")
    if spec.baseline:
        refuse(("baseline",), "attribution patching expands around the plain target run and cannot include a "
                              "baseline intervention; use exact operations for causal tracing")
    if spec.samples > 1:
        refuse(("samples",), "attribution patching draws no noise; `samples` must be 1")
    for _g, location, _op in named:
        if location[0] != "patches":
            continue
        group = spec.patches[location[1]]
        if group.window > 1:
            refuse(("patches", location[1], "window"), "attribution patching estimates one site at a time; "
                                                       "`window` stacks several layers")
        if group.combine:
            refuse(("patches", location[1], "combine"), "attribution patching estimates one site at a time; "
                                                        "`combine` patches the group's sites together")
    if spec.source_model is not None:
        refuse(("source_model",), "attribution patching takes both runs from one model; remove `source_model`")


def spec_groups(spec: StudySpec, resolver: SiteResolver,
                named: Sequence[tuple[int, tuple, tuple]] | None = None) -> list[tuple[list[Site], list]]:
    """(sites in forward order, position selectors) of the given groups (default: those naming ``attribution``);
    a bad address, or a site with no gradient (the embedding's input: token ids), names the spec's file and line."""
    named = named_groups(spec) if named is None else named
    embed = resolver.arch.embed if resolver.arch else None
    groups = spec.groups()
    out = []
    for g, location, _op in named:
        addresses, positions, _ = groups[g]
        sites = resolve_addresses(spec, resolver, list(addresses), location)
        for site in sites:
            if embed and site.module == embed and site.access == "input":
                i = next(i for i, a in enumerate(addresses) if site in resolver.expand(a))
                raise AttributionError(f"{spec.where(location + (i,))}: operation `attribution` cannot "
                                       f"differentiate {site.name}: the embedding's input is token ids, which "
                                       "have no gradient (patch the embedding's output, `embed`, instead)")
        out.append((sorted(sites, key=resolver.order_key), list(positions)))
    return out


def check_sites(spec: StudySpec, resolver: SiteResolver) -> None:
    """The sites of the groups naming ``attribution`` resolve and can be differentiated (see :func:`spec_groups`)."""
    spec_groups(spec, resolver)


def _group_steps(spec: StudySpec, named: Sequence[tuple[int, tuple, tuple]], default: int = 1) -> list[int]:
    """The ``steps`` of each entry's ``attribution`` operation, ``default`` where it does not set them or the entry
    names none (an operation path without an index)."""
    groups = spec.groups()
    out = []
    for g, _location, op_location in named:
        index = op_location[-1]
        steps = groups[g][2][index].steps if isinstance(index, int) else None
        out.append(default if steps is None else steps)
    return out


def _attribute_groups(spec: StudySpec, model: LoadedModel, probes: Sequence[Probe],
                      named: Sequence[tuple[int, tuple, tuple]], resolver: SiteResolver,
                      default_steps: int = 1) -> pd.DataFrame:
    """Every named group estimated, one :func:`attribute` call per distinct ``steps`` (groups sharing it share
    passes)."""
    groups = spec_groups(spec, resolver, named)
    by_steps: dict[int, list] = {}
    for group, steps in zip(groups, _group_steps(spec, named, default_steps), strict=True):
        by_steps.setdefault(steps, []).append(group)
    max_rows = spec.execution.max_rows
    target, source = directions(spec.direction)
    frames = []
    for steps, members in by_steps.items():
        per_pass = max(1, max_rows // rows_per_probe(probes, target, source, steps)) if max_rows else None
        frames.append(attribute(model, probes, members, direction=spec.direction, probes_per_pass=per_pass,
                                remote=spec.execution.remote, recovery_epsilon=spec.recovery_epsilon, steps=steps))
    return pd.concat(frames, ignore_index=True)


def rows_per_probe(probes: Sequence[Probe], target: str, source: str, steps: int) -> int:
    """Rows a probe takes in a pass: its target and source prompts, and the path's inner points (and its far end
    when some pair differs in length), so that ``execution.max_rows`` bounds a pass's rows whatever ``steps``."""
    alphas, _ = _path_rows(probes, list(range(len(probes))), target, source, steps)
    return 2 + len(alphas)


def study_rows(study: ResolvedStudy) -> pd.DataFrame | None:
    """The rows of every cell whose operation is ``attribution`` (None when no group names it), as ``Study`` reports
    them: cells the exact plan would drop (no token left to patch) are dropped, a cell named by two groups with the
    same ``steps`` is reported once, ``window`` is 1 and ``sample`` 0. ``execution.max_rows`` bounds the rows of a
    pass (:func:`rows_per_probe`)."""
    spec = study.spec
    named = named_groups(spec)
    if not named:
        return None
    check_spec(spec, named)
    frame = _attribute_groups(spec, study.model, study.probes, named, study.resolver)
    frame = frame[(frame["n_patched_tokens"] > 0) | (frame["positions"] == "none")]
    frame = frame.drop_duplicates(["probe_id", "site", "positions", "position", "operation"]).reset_index(drop=True)
    return frame.assign(window=1, sample=0)


def with_exact(frames: list[pd.DataFrame], rows: pd.DataFrame | None) -> list[pd.DataFrame]:
    """The exact batches' frames and the attribution rows, to be concatenated: when there are attribution rows the
    exact ones say ``approximate=False``; a study without them has no ``approximate`` column."""
    if rows is None:
        return frames
    return [f.assign(approximate=False) for f in frames] + [rows]


def attribution_from_spec(spec: StudySpec, model: LoadedModel | None = None, steps: int = 1) -> pd.DataFrame:
    """Run a whole study spec as attribution patching: its probes, sites, positions and direction, every group
    estimated; every operation must be ``replace`` or ``attribution`` and every metric ``logit_diff`` (the only ones
    a gradient approximates). ``model`` is loaded from ``spec.model`` when not given. A group naming ``attribution``
    uses that operation's ``steps`` where it sets them, every other group ``steps`` (1: attribution patching at the
    target run). To mix exact and approximate cells, name ``operations: [replace, attribution]`` and run the spec
    with ``Study`` (or ``clap patch``)."""
    path_points(steps)
    for index, operation in enumerate(spec.all_operations()):
        if operation.name not in ("replace", OPERATION):
            raise AttributionError(
                f"{spec.where(('operations', index)) if spec.operations else 'operations'}: attribution patching "
                f"approximates `replace` only (the source activation patched in), not {operation.label!r}"
            )
    named = named_groups(spec)
    named += [(g, location, ("operations",)) for g, location in enumerate(_locations(spec))
              if all(entry[0] != g for entry in named)]
    check_spec(spec, named)
    if model is None:
        model = load_spec_model(spec, spec.model)
    probes = spec_probes(spec, model.tokenizer, model.hf.config)
    frame = _attribute_groups(spec, model, probes, named, SiteResolver(model.hf), default_steps=steps)
    # a cell named twice with the same estimate (two groups, or `attribution` twice in one) is reported once
    return frame.drop_duplicates(["probe_id", "site", "positions", "position", "operation"]).reset_index(drop=True)
