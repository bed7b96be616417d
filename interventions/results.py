"""Tidy results: the engine's side of the results contract (:mod:`clap.contract` defines the files, columns,
dtypes, site kinds and metric names once; this module computes what goes into them).

Recovery with undefined denominators, package versions for the sidecar, the tidy frame's dtypes, and the output
folder check that runs before any model is loaded.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from clap import outputs
from clap.contract import (
    RESULTS_FILE,
    SIDECAR_FILE,
    read_results,
    typed_frame,
    write_results,
)

__all__ = ["package_versions", "prepare_output_dir", "read_results", "recovery", "to_frame", "write_results"]

VERSIONED_PACKAGES = ("clap", "torch", "nnsight", "transformers", "pandas", "numpy", "pingouin", "seaborn")


def recovery(
    clean: np.ndarray, corrupted: np.ndarray, patched: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised recovery and whether it is defined; a (near) zero denominator is never divided."""
    denominator = clean - corrupted
    defined = np.abs(denominator) > epsilon
    out = np.full(np.shape(patched), np.nan, dtype=np.float64)
    np.divide(patched - corrupted, denominator, out=out, where=defined)
    return out + 0.0, defined  # + 0.0 turns -0.0 into 0.0


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def to_frame(frame: pd.DataFrame, group_columns: Sequence[str]) -> pd.DataFrame:
    """The contract's dtypes and column order (probe id, labels, rest): :func:`clap.contract.typed_frame`."""
    return typed_frame(frame, group_columns)


#: columns averaged over noise samples; every other column identifies the cell (or is equal across its samples)
_AVERAGED = ("clean", "corrupted", "patched")
_DERIVED = ("recovery", "recovery_defined", "effect", "sample")


def average_samples(frame: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """One row per cell and metric: clean, corrupted and patched averaged over the noise samples, recovery and effect
    recomputed from the means, ``sample`` NA."""
    keys = [c for c in frame.columns if c not in _AVERAGED + _DERIVED]
    means = frame.groupby(keys, dropna=False, sort=False)[list(_AVERAGED)].mean().reset_index()
    rec, defined = recovery(means.clean.to_numpy(), means.corrupted.to_numpy(), means.patched.to_numpy(), epsilon)
    means["recovery"], means["recovery_defined"] = rec, defined
    means["effect"] = means.patched - means.corrupted
    means["sample"] = pd.array([pd.NA] * len(means), dtype="Int64")
    return means[[c for c in frame.columns]]


def prepare_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove it writable, before any model is loaded: a typo'd ``-o`` that names a file or
    a folder without write permission must fail in a second, not after the weights load and the first batch runs
    (:func:`clap.outputs.prepare_output_dir`)."""
    return outputs.prepare_output_dir(out_dir, holds=f"results are written into a folder ({RESULTS_FILE} + "
                                                     f"{SIDECAR_FILE})")
