"""Device strings checked before any model is loaded, so a typo or a missing GPU is one clear line, not a torch
traceback minutes into a run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from clap.errors import ClapError, closest

#: Device types a user can name; ``auto`` picks CUDA when available, else CPU.
KNOWN_DEVICE_TYPES = ("auto", "cpu", "cuda", "mps", "xpu", "meta")


def resolve_device(name: str, *, where: str = "device") -> str:
    """Validate ``name`` and return the concrete device string to use (``auto`` resolved).

    Why: ``torch.device("cuda:7")`` parses on any machine and only fails when the first tensor moves; checking the
    type, availability and index up front turns that into an error that names the setting (``where``) and what is
    available here.
    """
    text = str(name).strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        kind = text.split(":")[0]
        hint = closest(kind, KNOWN_DEVICE_TYPES)
        raise ClapError(
            f"{where}: {text!r} is not a device; expected one of {', '.join(KNOWN_DEVICE_TYPES)}, optionally with an "
            f"index such as 'cuda:0'" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ClapError(f"{where}: {text!r} asks for CUDA, but no CUDA device is available on this machine; "
                            f"use 'cpu' (or 'auto')")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ClapError(f"{where}: {text!r} names CUDA device {device.index}, but this machine has {count} "
                            f"(valid: {', '.join(f'cuda:{i}' for i in range(count))})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ClapError(f"{where}: {text!r} asks for Apple MPS, which is not available on this machine")
    elif device.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ClapError(f"{where}: {text!r} asks for an Intel XPU, which is not available on this machine")
    elif device.type not in ("cpu", "meta"):
        raise ClapError(f"{where}: device type {device.type!r} is not supported; expected one of "
                        f"{', '.join(KNOWN_DEVICE_TYPES)}")
    return text


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU thread count set to ``threads`` for the block and restored afterwards (None: unchanged).

    Why a setting: torch starts one thread per core in every process; several processes on a shared or loaded
    machine then contend for the same cores, and each runs far slower than with one thread. Results do not depend
    on it.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ClapError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
