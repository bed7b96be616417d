"""A module's input as nnsight's ``.input`` names it, changed inside a PyTorch forward pre-hook.

nnsight's ``envoy.input`` is the first positional argument of the module's call, or the first keyword argument when
there is none (Llama's attention gets ``hidden_states=``). The ragged path's pre-hooks (edits at an input, the last
block's cut to the last column, the projection reuse's compact input) all replace that one value and pass the rest
through; this is the one place that knows where it sits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def replace_input(args: tuple, kwargs: dict[str, Any], change: Callable[[Any], Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a pre-hook with the input (first positional, else first keyword argument) replaced by
    ``change(input)``."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: change(kwargs[first])}
