"""The layering of the tree, checked by reading its imports and names (ARCHITECTURE.md draws the same picture).

ground floor (``clap.*`` except ``clap.app``) <- areas (corpora, finetuning, interventions, analyses) <- roof
(``clap.app``). A layer imports only from layers below it, an area never imports another area, no module imports
another package's private names, and the results contract's names are defined in :mod:`clap.contract` alone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clap import contract

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("corpora", "finetuning", "interventions", "analyses")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("clap", *AREAS):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names], node.lineno))
    return out


def _layer(module: str) -> str | None:
    top = module.split(".")[0]
    if module in ("clap.app", "clap.__main__") or module.startswith("clap.app."):  # `python -m clap` is the CLI
        return "roof"
    if top == "clap":
        return "ground"
    return top if top in AREAS else None


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_only_from_layers_below_it(name):
    here = _layer(name)
    wrong = []
    for imported, _, line in _imports(MODULES[name]):
        there = _layer(imported)
        if there is None or there == here or here == "roof":
            continue
        if here == "ground" or there == "roof":
            wrong.append(f"line {line}: {imported}")  # the ground floor imports no area; nothing imports the roof
        elif there != "ground":
            wrong.append(f"line {line}: {imported} (an area importing another area)")
    assert not wrong, f"{name} imports across layers: {wrong}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_another_packages_private_names(name):
    package = name.split(".")[0] if _layer(name) != "roof" else "clap.app"
    private = [f"line {line}: {imported}.{n}" for imported, names, line in _imports(MODULES[name])
               for n in names if n.startswith("_") and not n.startswith("__")
               and not (imported == package or imported.startswith(package + "."))]
    assert not private, f"{name} imports private names of another package: {private}"


@pytest.mark.parametrize("definition", [r"^RESULTS_FILE\s*=", r"^SIDECAR_FILE\s*=", r"^SITE_KINDS\b.*=",
                                        r"^METRICS\b.*=", r"^REQUIRED_COLUMNS\b.*=", r"^REQUIRED_SIDECAR_KEYS\b.*=",
                                        r"[\"']results\.parquet[\"']"])
def test_the_results_contract_is_defined_in_one_module(definition):
    pattern = re.compile(definition, re.M)
    where = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if pattern.search(p.read_text(encoding="utf-8")))
    assert where == ["clap/contract.py"], f"{definition!r} is defined in {where}"


def test_the_spec_offers_exactly_the_contracts_metrics():
    from typing import get_args

    from interventions.spec import Metric

    assert set(get_args(Metric)) == set(contract.METRICS)


def test_the_engine_emits_only_contract_site_kinds():
    from interventions import sites

    kinds = {kind for kind, _, _ in sites.COMPONENTS.values()} | set(sites.TOP_LEVEL.values()) | {"head", "module"}
    assert kinds <= set(contract.SITE_KINDS)


def _module_edges() -> dict[str, set[str]]:
    """Module -> the project's modules it imports, at any depth (imports inside functions count: they hide a cycle,
    they do not remove it). ``from package import name`` is an edge to ``package.name`` where that is a module."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for imported, names, _line in _imports(path):
            if imported.split(".")[0] not in ("clap", *AREAS):
                continue
            subs = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in MODULES]
            targets.update(subs)
            if len(subs) < len(names) or not names:
                targets.add(imported)
        edges[name] = {t for t in targets if t in MODULES and t != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_file_level_import_cycles():
    """No two modules import each other, directly or through others, even from inside a function (a package's
    ``__init__`` re-exporting its modules is not a cycle: it is imported, it imports nothing back)."""
    edges = _module_edges()
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    edges = {m: {t for t in targets if t not in packages} for m, targets in edges.items()}
    assert not _cycles(edges), f"import cycles: {_cycles(edges)}"


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
