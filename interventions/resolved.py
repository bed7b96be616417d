"""A study resolved once: its model(s), probes, site groups (windows, combinations, baselines) and the spec locations
that errors name.

Why one place: plan compilation, the statistics passes, attribution patching and the pre-load checks all need the
same answers (which sites a group names, in which execution order, which stack of layers a window patches, which
probes survive tokenisation). Resolving them in each consumer let the answers drift apart; here they are computed
once and handed on as a :class:`ResolvedStudy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap.devices import resolve_device
from clap.errors import ClapError, closest
from clap.models import BUILTIN_GGUF, LoadedModel, load_model, load_remote_model
from interventions import operations
from interventions.plan import GroupPlan, directions
from interventions.probes import (
    Probe,
    ProbeError,
    ProbeRules,
    check_alignment,
    check_context,
    load_probes,
    raise_problems,
    resolve_positions,
)
from interventions.sites import Site, SiteError, SiteResolver
from interventions.spec import ModelSpec, OperationSpec, StudySpec

#: site kinds a ``window`` can stack: one component of consecutive layers
WINDOW_KINDS = ("resid_pre", "resid_post", "block_out", "attn_out", "mlp_out")


def located(spec: StudySpec, value: str | None) -> str | None:
    """A model or tokenizer source with a relative path resolved like ``probes.file``: against the spec file's
    folder when something exists there, else as given (a hub id, a built-in name, or a path relative to the working
    directory)."""
    base = spec._base_dir
    if not value or value in BUILTIN_GGUF or base is None:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    candidate = base / path
    return str(candidate) if candidate.exists() else value


def load_spec_model(spec: StudySpec, m: ModelSpec) -> LoadedModel:
    """Load one of the spec's models (``model`` or ``source_model``) where ``execution`` says: on NDIF's hosted copy
    (``remote: true``) or locally, on the checked device in the spec's dtype."""
    if spec.execution.remote is True:
        return load_remote_model(m.source, revision=m.revision, tokenizer=m.tokenizer)
    device = resolve_device(spec.execution.device, where=spec.where(("execution", "device")))
    return load_model(located(spec, m.source), gguf_file=m.gguf_file, tokenizer=located(spec, m.tokenizer),
                      revision=m.revision, dtype=spec.execution.dtype, device=device)


def spec_probes(spec: StudySpec, tokenizer: Any, config: Any = None, warn: bool = True,
                problems: list[str] | None = None) -> list[Probe]:
    """The spec's probes tokenised and checked against its :class:`ProbeRules` (answers, fields, alignment, the
    `wrong` answer ``logit_diff`` needs; context length when ``config`` is given), every problem of the set raised as
    one error that points to ``clap probes check --study``. Under ``corrupted_prompt: clean`` (causal tracing,
    cross-model on one prompt, clean-run ablation) the corrupted prompt is the clean one, and a probe may leave it
    out; a trace's probes must carry its subject field. With ``problems`` given, each is appended there instead and
    the probes that could be tokenised are returned (the probe check's resolution)."""
    rules = ProbeRules.of(spec)
    found: list[str] = [] if problems is None else problems
    probes = load_probes(spec.probes, tokenizer, spec.base_dir, corrupted_prompt=rules.corrupted_prompt,
                         subject=rules.subject, problems=found, warn=warn)
    check_alignment(probes, rules.alignment, found)
    if config is not None:
        check_context(probes, config, found)
    if rules.needs_wrong:
        found += [f"{p.origin}: metric logit_diff needs a `wrong` answer for every probe; probe {p.id} has none "
                  f"(or use metric `logit`/`prob`)" for p in probes if not p.wrong_ids]
    if problems is None:
        raise_problems(found, spec.probes.file, spec.model.source, study=spec._source)
    return probes


def group_locations(spec: StudySpec) -> list[tuple]:
    """The spec location of each patch group's ``sites`` (top-level ``sites``, then ``patches[i]``)."""
    return ([("sites",)] if spec.sites else []) + [("patches", g, "sites") for g in range(len(spec.patches or []))]


def resolve_addresses(spec: StudySpec, resolver: SiteResolver, addresses: list[str], location: tuple) -> list[Site]:
    """Site addresses expanded (ranges, wildcards, aliases), first occurrence kept; an error names the spec file,
    line and field of the address."""
    sites: dict[str, Site] = {}
    for i, address in enumerate(addresses):
        try:
            expanded = resolver.expand(address)
        except SiteError as exc:
            raise SiteError(f"{spec.where(location + (i,))}: {exc}") from None
        for site in expanded:
            sites.setdefault(site.name, site)
    return list(sites.values())


def site_groups(spec: StudySpec, hf_model: torch.nn.Module) -> tuple[SiteResolver, list[list[Site]]]:
    """Every patch group's sites and every baseline intervention's, resolved on ``hf_model`` (loaded, or a
    meta-device skeleton for the checks before loading)."""
    resolver = SiteResolver(hf_model)
    groups = [resolve_addresses(spec, resolver, addresses, location)
              for location, (addresses, _, _) in zip(group_locations(spec), spec.groups(), strict=True)]
    for b, intervention in enumerate(spec.baseline or []):
        resolve_addresses(spec, resolver, intervention.sites, ("baseline", b, "sites"))
    return resolver, groups


def group_plans(spec: StudySpec, resolver: SiteResolver, groups: list[list[Site]]) -> list[GroupPlan]:
    """Patch groups with windows and combinations resolved into the stack of sites each cell patches; exact
    operations only (``attribution`` cells run on the gradient path)."""
    plans = []
    for location, sites, (_, positions, ops), (window, combine), (cumulative, probes) in zip(
            group_locations(spec), groups, spec.groups(), spec.group_options(), spec.group_stacks(), strict=True):
        sites = sorted(sites, key=resolver.order_key)
        group = GroupPlan(sites, list(positions), [op for op in ops if not operations.get(op.name).approximate],
                          probes=frozenset(probes) if probes is not None else None)
        if cumulative is not None:
            stack_cumulative(group, cumulative, resolver, spec.where(location))
        if combine:
            group.sites = [sites[0]]
            group.stacks[sites[0].name] = tuple(sites)
            group.labels[sites[0].name] = "+".join(s.name for s in sites)
        elif window > 1:
            for site in sites:
                if site.layer is None or site.kind not in WINDOW_KINDS:
                    raise SiteError(f"{spec.where(location)}: a window stacks consecutive layers of one component; "
                                    f"{site.name} is not a layer's {' / '.join(WINDOW_KINDS)}")
                low, high = max(0, site.layer - window // 2), min(resolver.n_layers, site.layer - (-window // 2))
                group.stacks[site.name] = tuple(resolver.expand(f"layers[{low}:{high}].{site.kind}"))
                group.labels[site.name] = f"{site.name}@w{window}"
        plans.append(group)
    return plans


def stack_cumulative(group: GroupPlan, cumulative: str, resolver: SiteResolver, where: str) -> None:
    """``cumulative: bottom|top``: each site's cell patches its component at layers 0..L or L..n_layers-1 together,
    reported as ``layers[a:b].<kind>`` at layer L."""
    for site in group.sites:
        if site.layer is None or site.kind not in ("attn_out", "mlp_out"):
            raise SiteError(f"{where}: `cumulative` stacks a layer's attention or MLP output over the layers below "
                            f"or above it; {site.name} is not a layer's attn_out / mlp_out (a residual-stream state "
                            f"already holds the layers below it, so a stack of them equals its last layer's patch)")
        low, high = (0, site.layer + 1) if cumulative == "bottom" else (site.layer, resolver.n_layers)
        group.stacks[site.name] = tuple(resolver.expand(f"layers[{low}:{high}].{site.kind}"))
        group.labels[site.name] = f"layers[{low}:{high}].{site.kind}"


def check_group_probes(spec: StudySpec, probes: list[Probe]) -> None:
    """A patch group restricted to ``probes:`` must name probes of the study (a typo would drop its cells)."""
    ids = [p.id for p in probes]
    for g, group in enumerate(spec.patches or []):
        unknown = [i for i in group.probes or [] if i not in ids]
        if unknown:
            hint = closest(unknown[0], ids, n=1)
            raise ClapError(f"{spec.where(('patches', g, 'probes'))}: no probe {unknown[0]!r} in the study"
                            + (f"; did you mean {hint[0]!r}?" if hint else ""))


def baseline_sites(spec: StudySpec, resolver: SiteResolver) -> list[tuple[list[Site], list, OperationSpec]]:
    """Each baseline intervention as (sites in execution order, positions, operation)."""
    return [(sorted(resolve_addresses(spec, resolver, b.sites, ("baseline", i, "sites")), key=resolver.order_key),
             b.positions, b.operation) for i, b in enumerate(spec.baseline or [])]


def position_problems(study: ResolvedStudy) -> list[str]:
    """Every probe's position selectors (its patch groups' and the baseline interventions') that cannot be resolved
    on it (a substring not in the prompt, an index past its end, a missing field): what plan compilation would
    refuse, one problem per probe and selector."""
    target, source = directions(study.spec.direction)
    tokenizer = study.model.tokenizer
    found: list[str] = []
    for probe in study.probes:
        selectors = [sel for group in study.groups if group.probes is None or probe.id in group.probes
                     for sel in group.positions] + [sel for _, positions, _ in study.baseline for sel in positions]
        for selector in selectors:
            try:
                resolve_positions(selector, probe, target, source, tokenizer)
            except ProbeError as exc:
                if str(exc) not in found:
                    found.append(str(exc))
    return found


def unembed_module(hf_model: torch.nn.Module) -> str | None:
    """The module path of the model's unembedding, or None for an architecture clap has no map of."""
    from clap.architectures import BY_MODEL_TYPE

    arch = BY_MODEL_TYPE.get(getattr(hf_model.config, "model_type", None))
    return arch.unembed if arch else None


@dataclass
class ResolvedStudy:
    """Everything a study's consumers need, resolved once on the loaded model: the run (plan, measuring passes),
    attribution and ``clap probes check --study`` read it."""

    spec: StudySpec
    model: LoadedModel
    probes: list[Probe]
    resolver: SiteResolver
    groups: list[GroupPlan]  #: exact patch groups, in spec order
    baseline: list[tuple[list[Site], list, OperationSpec]]
    source_model: LoadedModel | None = None
    unembed_module: str | None = None
    #: every operation of the spec's cells (deduplicated) and of its baseline interventions
    cell_operations: list[OperationSpec] = field(default_factory=list)
    baseline_operations: list[OperationSpec] = field(default_factory=list)
    rules: ProbeRules = field(default_factory=ProbeRules)
    #: the probe problems found (only a resolution for the probe check keeps them; a run raises them)
    probe_problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, spec: StudySpec, model: LoadedModel, probes: list[Probe],
           source_model: LoadedModel | None = None) -> ResolvedStudy:
        resolved = cls._resolve(spec, model, probes, source_model)
        if not probes:
            raise ClapError(f"{spec.where(('probes',))}: the probe set is empty")
        check_group_probes(spec, probes)
        return resolved

    @classmethod
    def for_probe_check(cls, spec: StudySpec, model: LoadedModel,
                        source_model: LoadedModel | None = None) -> ResolvedStudy:
        """The study resolved with its probe problems kept rather than raised (``probes`` holds those that could
        be tokenised, possibly none): sites, windows and baselines still resolve, so a spec whose run would fail
        for another reason fails here too, before the check reports its probes."""
        problems: list[str] = []
        probes = spec_probes(spec, model.tokenizer, model.hf.config, warn=False, problems=problems)
        resolved = cls._resolve(spec, model, probes, source_model)
        resolved.probe_problems = problems + position_problems(resolved)
        return resolved

    @classmethod
    def _resolve(cls, spec: StudySpec, model: LoadedModel, probes: list[Probe],
                 source_model: LoadedModel | None) -> ResolvedStudy:
        resolver, sites = site_groups(spec, model.hf)
        return cls(spec=spec, model=model, probes=probes, resolver=resolver,
                   groups=group_plans(spec, resolver, sites), baseline=baseline_sites(spec, resolver),
                   source_model=source_model, unembed_module=unembed_module(model.hf),
                   cell_operations=list({op.model_dump_json(): op for op in spec.all_operations()}.values()),
                   baseline_operations=[b.operation for b in spec.baseline or []], rules=ProbeRules.of(spec))
