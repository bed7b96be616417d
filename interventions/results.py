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
========================  ===========================================================================
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
    for column in ("layer", "head", "position"):
        frame[column] = frame[column].astype("Int64")
    for column in ("clean", "corrupted", "patched", "recovery"):
        frame[column] = frame[column].astype("float64")
    ordered = ["probe_id", *group_columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


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
