"""Package attributes imported on first use, so that importing a package (or one of its light modules) stays cheap.

Why: every ``clap`` command imports each area's command-line module to register its sub-commands, and Python runs a
package's ``__init__`` before any of its modules. An ``__init__`` that imports torch, transformers or pandas for its
convenience re-exports makes ``clap --help`` wait for all of them. With :func:`lazy_exports` the re-exported names
are resolved by the module-level ``__getattr__`` of PEP 562 the first time they are read
(``from interventions import Study`` works as before).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``exports[name]`` (a module) when ``name`` is read.

    An unknown name raises ``AttributeError``, so ``from package import submodule`` still imports the submodule.
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later reads are plain attribute lookups
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
