"""Site addresses: parse, expand ranges and wildcards, resolve to concrete module accesses.

A *site* is one place in the forward pass whose activation a patch replaces: a module's output (or input), or
one attention head's slice of the attention output projection's input. Users write either

* architecture-neutral aliases: ``embed``, ``final_norm``, ``unembed``, ``layers[3].resid_pre``,
  ``layers[0:12].mlp_out`` (``.mlp`` too), ``layers[*].attn_out`` (``.attn``), ``layers[5].resid_post``,
  ``layers[5].block_out``, ``layers[3].heads[7]``, ``layers[3].heads[0:12]``; or
* real module names, with ``*`` / ``[a:b]`` on any segment: ``transformer.h.3.mlp.c_fc``,
  ``transformer.h.*.attn.c_proj``, ``transformer.h[0:3].mlp``; ``:input`` patches the module's input instead.

Everything expands to a list of :class:`Site` in forward-execution order, which is the order nnsight needs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch

from clap.architectures import BY_MODEL_TYPE, ArchitectureMap, n_heads
from clap.errors import ClapError, closest

#: component name in an alias -> (site kind, path relative to the block or None for the block, access)
COMPONENTS: dict[str, tuple[str, str | None, str]] = {
    "resid_pre": ("resid_pre", None, "input"),
    "resid_post": ("resid_post", None, "output"),
    "block_out": ("block_out", None, "output"),
    "attn_out": ("attn_out", "attn", "output"),
    "attn": ("attn_out", "attn", "output"),
    "mlp_out": ("mlp_out", "mlp", "output"),
    "mlp": ("mlp_out", "mlp", "output"),
}
HEAD_COMPONENTS = ("heads", "head")
TOP_LEVEL = {"embed": "embed", "final_norm": "final_norm", "unembed": "unembed"}


class SiteError(ClapError):
    pass


@dataclass(frozen=True)
class Site:
    """One concrete patch location."""

    name: str  #: canonical address, e.g. ``layers.3.mlp_out``, ``layers.3.heads.7``, ``transformer.h.3.mlp.c_fc``
    kind: str  #: one of :data:`clap.contract.SITE_KINDS`
    module: str  #: real module path
    access: str  #: ``input`` or ``output``
    layer: int | None = None
    head: int | None = None
    n_heads: int | None = None  #: for head sites: how many equal slices the module input has
    #: the answer logits are a function of this tensor at the last position alone (unembedding, final norm,
    #: last block's output), so replacing it there reproduces the source run exactly
    terminal: bool = False

    @property
    def access_key(self) -> tuple[str, str]:
        """Sites sharing this key read/write the same tensor (e.g. all heads of one layer)."""
        return (self.module, self.access)


_SPLIT_DOTS = re.compile(r"\.(?![^\[]*\])")
_TOKEN = re.compile(r"^([^\[\]]*)((?:\[[^\]]*\])*)$")


def tokenize(address: str) -> list[str]:
    """``transformer.h[0:3].mlp`` -> ``['transformer', 'h', '[0:3]', 'mlp']`` (selectors keep brackets)."""
    tokens: list[str] = []
    for part in _SPLIT_DOTS.split(address.strip()):
        match = _TOKEN.match(part)
        if not part or match is None:
            raise SiteError(f"malformed site address {address!r} (near {part!r})")
        name, selectors = match.groups()
        if name:
            tokens.append(name)
        tokens.extend(f"[{s}]" for s in re.findall(r"\[([^\]]*)\]", selectors))
    return tokens


def select_indices(selector: str, size: int, what: str, address: str) -> list[int]:
    """Expand ``3``, ``-1``, ``*``, ``0:12``, ``::2``, ``1,4,7`` (with or without brackets) within ``range(size)``."""
    text = selector.strip("[]").strip()
    if text in ("*", ":", ""):
        return list(range(size))
    out: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if ":" in piece:
                parts = [int(p) if p.strip() else None for p in piece.split(":")]
                out.extend(range(size)[slice(*parts)])
            else:
                index = int(piece)
                if not -size <= index < size:
                    raise SiteError(
                        f"{what} {index} is out of range in {address!r}: the model has {size} {what}s (0..{size - 1})"
                    )
                out.append(index % size)
        except ValueError:
            raise SiteError(f"bad {what} selector {selector!r} in {address!r}: use an index, a:b, * or a,b,c") from None
    if not out:
        raise SiteError(f"{what} selector {selector!r} in {address!r} selects nothing (the model has {size})")
    return out


def _is_selector(token: str) -> bool:
    return token.startswith("[") or token == "*" or bool(re.fullmatch(r"-?\d+|[\d:,\s-]*:[\d:,\s-]*", token))


class SiteResolver:
    """Resolves addresses against one model: its architecture map, its modules and its execution order."""

    def __init__(self, hf_model: torch.nn.Module):
        self.hf_model = hf_model
        self.arch: ArchitectureMap | None = BY_MODEL_TYPE.get(getattr(hf_model.config, "model_type", None))
        self.module_names = [name for name, _ in hf_model.named_modules() if name]
        self._module_set = set(self.module_names)
        self.n_layers = len(hf_model.get_submodule(self.arch.layers)) if self.arch else 0
        self.n_heads = n_heads(hf_model) if self.arch else 0
        self._order_map: dict[tuple[str, str], int] | None = None

    @property
    def _order(self) -> dict[tuple[str, str], int]:
        """Recorded on first use (a forward pass), so addresses can be checked on a meta-device model first."""
        if self._order_map is None:
            self._order_map = execution_order(self.hf_model)
        return self._order_map

    # -- public -------------------------------------------------------------------------------------------
    def resolve(self, addresses: Iterable[str]) -> list[Site]:
        """Expand every address, drop duplicates, return sites in forward-execution order."""
        sites: dict[str, Site] = {}
        for address in addresses:
            for site in self.expand(address):
                sites.setdefault(site.name, site)
        return sorted(sites.values(), key=self.order_key)

    def expand(self, address: str) -> list[Site]:
        if not isinstance(address, str) or not address.strip():
            raise SiteError(f"a site address must be a non-empty string, got {address!r}")
        address = address.strip()
        access = "output"
        if address.endswith((":input", ":output")):
            address, access = address.rsplit(":", 1)
        tokens = tokenize(address)
        is_alias = self.arch is not None and address not in self._module_set and (
            (tokens[0] in TOP_LEVEL and len(tokens) == 1) or tokens[0] == "layers"
        )
        if is_alias and access == "input":
            raise SiteError(
                f"{address}:input: `:input` applies to real module names (e.g. "
                f"{self.arch.block(0)}.{self.arch.mlp}:input); an alias already names one tensor "
                f"(the residual stream entering block i is layers[i].resid_pre)"
            )
        if is_alias and tokens[0] in TOP_LEVEL:
            return [self._top_level(tokens[0])]
        if is_alias:
            return self._expand_alias(address, tokens)
        return self._expand_raw(address, tokens, access)

    def order_key(self, site: Site) -> tuple[int, int]:
        """Forward-execution position of a site's tensor (inputs fire before outputs of the same module)."""
        return (self._order.get(site.access_key, 10**9), site.head or 0)

    def valid_names(self) -> list[str]:
        """Every address form this model accepts, for 'did you mean' hints."""
        names = list(self.module_names)
        if self.arch:
            names += list(TOP_LEVEL)
            names += [f"layers[{i}].{c}" for i in range(self.n_layers) for c in COMPONENTS]
            names += [f"layers[{i}].heads[{h}]" for i in range(self.n_layers) for h in range(self.n_heads)]
        return names

    # -- internals ----------------------------------------------------------------------------------------
    def _unknown(self, address: str, detail: str = "") -> SiteError:
        hints = closest(address, self.valid_names())
        hint = f"; closest valid names: {', '.join(hints)}" if hints else ""
        return SiteError(f"unknown site {address!r}{detail}{hint}")

    def _top_level(self, token: str) -> Site:
        arch = self.arch
        module = {"embed": arch.embed, "final_norm": arch.final_norm, "unembed": arch.unembed}[token]
        return Site(name=token, kind=TOP_LEVEL[token], module=module, access="output", terminal=token != "embed")

    def _expand_alias(self, address: str, tokens: list[str]) -> list[Site]:
        arch = self.arch
        if len(tokens) < 3 or not _is_selector(tokens[1]):
            raise self._unknown(address, " (alias form: layers[<i|a:b|*>].<component>)")
        layers = select_indices(tokens[1], self.n_layers, "layer", address)
        component = tokens[2]
        if component in HEAD_COMPONENTS:
            if len(tokens) != 4 or not _is_selector(tokens[3]):
                raise SiteError(f"{address!r}: name the heads, e.g. layers[3].heads[7] or heads[0:12] or heads[*]")
            heads = select_indices(tokens[3], self.n_heads, "head", address)
            return [
                Site(
                    name=f"layers.{layer}.heads.{head}",
                    kind="head",
                    module=f"{arch.block(layer)}.{arch.out_proj}",
                    access="input",
                    layer=layer,
                    head=head,
                    n_heads=self.n_heads,
                )
                for layer in layers
                for head in heads
            ]
        if component not in COMPONENTS or len(tokens) != 3:
            raise self._unknown(
                address, f" (components: {', '.join(list(COMPONENTS) + ['heads[...]'])})"
            )
        kind, relative, access = COMPONENTS[component]
        return [
            Site(
                name=f"layers.{layer}.{kind}",
                kind=kind,
                module=arch.block(layer) + (f".{getattr(arch, relative)}" if relative else ""),
                access=access,
                layer=layer,
                terminal=kind in ("resid_post", "block_out") and layer == self.n_layers - 1,
            )
            for layer in layers
        ]

    def _expand_raw(self, address: str, tokens: list[str], access: str) -> list[Site]:
        matches = [name for name in self.module_names if self._raw_match(tokens, name.split("."), address)]
        if not matches:
            raise self._unknown(address)
        return [self._raw_site(name, access) for name in matches]

    def _raw_match(self, tokens: list[str], parts: list[str], address: str) -> bool:
        if len(tokens) != len(parts):
            return False
        for token, part in zip(tokens, parts, strict=True):
            if token.startswith("["):
                if not part.isdigit():
                    return False
                if int(part) not in select_indices(token, 10**6, "index", address):
                    return False
            elif not fnmatch.fnmatchcase(part, token):
                return False
        return True

    def _raw_site(self, module: str, access: str) -> Site:
        """A raw module; modules that *are* an alias target keep their name but get the alias's kind."""
        kind, layer, terminal = "module", None, False
        arch = self.arch
        if arch:
            terminal = module in (arch.unembed, arch.final_norm) or (
                access == "output" and module == arch.block(self.n_layers - 1)
            )
            if access == "output" and module == arch.unembed:
                kind = "unembed"
            elif access == "output" and module == arch.final_norm:
                kind = "final_norm"
            elif access == "output" and module == arch.embed:
                kind = "embed"
            match = re.match(re.escape(arch.layers) + r"\.(\d+)(\.|$)", module)
            if match:
                layer = int(match.group(1))
                if module == arch.block(layer):
                    kind = "resid_pre" if access == "input" else "block_out"
        name = module if access == "output" else f"{module}:input"
        return Site(name=name, kind=kind, module=module, access=access, layer=layer, terminal=terminal)


@lru_cache(maxsize=8)
def _execution_order_cached(model_id: int, model: torch.nn.Module) -> dict[tuple[str, str], int]:
    order: dict[tuple[str, str], int] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(_mod, _args, name=name):
            order.setdefault((name, "input"), len(order))

        def post(_mod, _args, _out, name=name):
            order.setdefault((name, "output"), len(order))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order


def execution_order(model: torch.nn.Module) -> dict[tuple[str, str], int]:
    """The order in which module inputs/outputs appear in one forward pass (recorded once with hooks)."""
    return _execution_order_cached(id(model), model)
