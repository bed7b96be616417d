"""Tidy results: one row per (probe, site, position, operation, metric), saved as Parquet + a JSON sidecar.

This schema is the contract with ``analyses/``:

========================  ===========================================================================
column                    meaning
========================  ===========================================================================
probe_id                  the probe's id
<label columns>           one column per probe label (e.g. ``knowledge_type``); named in ``group_columns``
site                      canonical site address (``layers.3.mlp_out``, ``layers.3.heads.7``, raw module path)
site_kind                 embed / resid_pre / attn_out / head / mlp_out / resid_post / block_out /
                          final_norm / unembed / module
module                    the real module path patched
layer, head               Int64 (NA outside the layer stack / for non-head sites)
position                  Int64 token index in the unpadded target prompt (NA when several were patched)
positions                 the position selection's label (``last``, ``3``, ``all``, ``match:Paris``)
token                     the target-prompt token(s) at the patched position(s)
source_token              the source-prompt token(s) aligned with the patched positions (the activation that
                          replace/resample copy in)
operation, direction      e.g. ``replace``, ``denoising``
metric                    logit_diff / logit / prob / logprob / kl
clean, corrupted          the metric on the unpatched clean and corrupted runs
patched                   the metric on the patched run
recovery                  (patched - corrupted) / (clean - corrupted); NaN when |clean - corrupted| <= epsilon
recovery_defined          False where the denominator was (near) zero
trivial                   True where the patched value equals the source run's by construction: the source
                          activation replaces, at the answer position, the unembedding, the final norm or the last
                          block's output (recovery 1 when denoising, 0 when noising)
n_patched_tokens          how many token positions the cell patched
window                    how many sites the cell patched together: 1, a window's layer count (``site`` is then
                          ``layers.L.<kind>@wN``, ``layer`` its centre L), or a combined group's size (``site``
                          ``a+b+...``, ``layer`` of the first)
sample                    Int64 noise draw (0 .. samples - 1); NA in an average over samples (``samples.parquet``
                          holds the per-sample rows when ``samples`` > 1). Every noise draw is seeded by
                          (seed, probe id, sample, site): a probe's corrupted row and its restored rows share it
effect                    patched - corrupted: with metric ``prob`` in a causal trace, the indirect effect
                          p(answer | corrupted + restored) - p(answer | corrupted)
token_group               (causal traces only) ROME's token group of ``position``: first / middle / last subject,
                          first subsequent, further, last
========================  ===========================================================================

With ``samples`` > 1 the results hold, per cell and metric, the mean over samples of ``clean``, ``corrupted`` and
``patched`` (ROME averages probabilities over noise draws), and ``recovery`` and ``effect`` recomputed from those
means. ``run.json`` records the noise stds used (``noise``).
"""

from __future__ import annotations

import json
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from clap.errors import ClapError

RESULTS_FILE = "results.parquet"
SIDECAR_FILE = "run.json"
SAMPLES_FILE = "samples.parquet"
VERSIONED_PACKAGES = ("clap", "torch", "nnsight", "transformers", "pandas", "numpy", "pingouin", "seaborn")


def recovery(clean: np.ndarray, corrupted: np.ndarray, patched: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
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
    """The tidy schema's dtypes (nullable Int64 indices, float64 values) and column order: probe id, labels, rest."""
    frame = frame.copy()
    for column in ("layer", "head", "position", "window", "sample"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    for column in ("clean", "corrupted", "patched", "recovery", "effect"):
        if column in frame:
            frame[column] = frame[column].astype("float64")
    ordered = ["probe_id", *group_columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


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
    a folder without write permission must fail in a second, not after the weights load and the first batch runs.
    Writability is tested by creating a temporary file there (permission bits alone say nothing about read-only
    file systems or root)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ClapError(f"output folder {out_dir} is an existing file; results are written into a folder "
                        f"({RESULTS_FILE} + {SIDECAR_FILE}): choose another path")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ClapError(f"output folder {out_dir} cannot be created: {parent} is a file")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise ClapError(f"output folder {out_dir} is not writable: {exc.strerror or exc}") from None
    return out_dir


def write_results(out_dir: Path, frame: pd.DataFrame, sidecar: dict[str, Any]) -> Path:
    """Write ``results.parquet`` and ``run.json`` (atomically: temp names, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (RESULTS_FILE + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out_dir / RESULTS_FILE)
    sidecar = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **sidecar}
    tmp_json = out_dir / (SIDECAR_FILE + ".tmp")
    tmp_json.write_text(json.dumps(sidecar, indent=2, default=str))
    tmp_json.replace(out_dir / SIDECAR_FILE)
    return out_dir / RESULTS_FILE


def read_results(out_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    out_dir = Path(out_dir)
    return pd.read_parquet(out_dir / RESULTS_FILE), json.loads((out_dir / SIDECAR_FILE).read_text())
