"""Reading and writing a results directory: ``results.parquet`` plus the ``run.json`` sidecar.

The patching engine writes these two files; everything in :mod:`analyses` starts from them. Reading them in one
place means a malformed directory fails once, early, with a message naming the file and the columns or keys at
fault, instead of as a ``KeyError`` deep inside a statistics call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from clap.errors import ClapError

RESULTS_FILE = "results.parquet"
SIDECAR_FILE = "run.json"

#: Column -> kind of values expected. ``str`` columns are read as plain object strings, ``Int64`` as pandas'
#: nullable integers (NA outside the layer stack), ``float`` as float64 and ``bool`` as bool.
REQUIRED_COLUMNS: dict[str, str] = {
    "probe_id": "str",
    "site": "str",
    "site_kind": "str",
    "layer": "Int64",
    "head": "Int64",
    "position": "Int64",
    "positions": "str",
    "token": "str",
    "operation": "str",
    "direction": "str",
    "metric": "str",
    "clean": "float",
    "corrupted": "float",
    "patched": "float",
    "recovery": "float",
    "recovery_defined": "bool",
    "trivial": "bool",
}

#: Site kinds the engine emits; anything else is refused so that a typo cannot silently empty a selection.
SITE_KINDS = (
    "resid_pre",
    "resid_post",
    "attn_out",
    "mlp_out",
    "block_out",
    "head",
    "final_norm",
    "unembed",
    "embed",
    "module",
)

REQUIRED_SIDECAR_KEYS = ("spec", "model", "versions", "seed", "group_columns", "created", "n_probes")


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read ``RESULTS_DIR/results.parquet`` and ``RESULTS_DIR/run.json``, validated and with normalised dtypes.

    Returns ``(data, meta)``: the tidy results (one row per probe x site x position x operation x metric, columns
    as in :data:`REQUIRED_COLUMNS` plus the group columns named in ``meta["group_columns"]``) and the sidecar dict.
    Raises :class:`~clap.errors.ClapError` naming the file and what is wrong when either file is missing or
    malformed.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ClapError(f"{root}: results directory not found (expected a folder with {RESULTS_FILE} and {SIDECAR_FILE})")
    meta = load_sidecar(root / SIDECAR_FILE)
    path = root / RESULTS_FILE
    if not path.is_file():
        raise ClapError(f"{path}: results file not found (the patching run writes {RESULTS_FILE} beside {SIDECAR_FILE})")
    try:
        data = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise ClapError(f"{path}: not a readable Parquet file ({exc})") from exc
    data = validate_results(data, source=str(path), group_columns=meta["group_columns"])
    return data, meta


def load_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and check ``run.json``: a JSON object holding :data:`REQUIRED_SIDECAR_KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise ClapError(f"{path}: sidecar not found (the patching run writes {SIDECAR_FILE} beside {RESULTS_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClapError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(meta, dict):
        raise ClapError(f"{path}: expected a JSON object with keys {', '.join(REQUIRED_SIDECAR_KEYS)}")
    missing = [k for k in REQUIRED_SIDECAR_KEYS if k not in meta]
    if missing:
        raise ClapError(f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(REQUIRED_SIDECAR_KEYS)}")
    groups = meta["group_columns"]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ClapError(f"{path}: 'group_columns' must be a list of column names, got {groups!r}")
    for key in ("spec", "model", "versions"):
        if not isinstance(meta[key], dict):
            raise ClapError(f"{path}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
    return meta


def validate_results(
    data: pd.DataFrame, source: str = "results", group_columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """Check the columns of a results frame and return a copy with the documented dtypes.

    ``source`` names the file in error messages. Integer-like columns become nullable ``Int64``; string columns
    become plain Python strings (so comparisons and grouping behave the same whatever Parquet stored).
    """
    expected = list(REQUIRED_COLUMNS) + list(group_columns)
    missing = [c for c in expected if c not in data.columns]
    if missing:
        raise ClapError(
            f"{source}: missing column(s) {', '.join(missing)}; a results table needs "
            f"{', '.join(expected)} (group columns come from run.json 'group_columns')"
        )
    out = data.copy()
    for col, kind in REQUIRED_COLUMNS.items():
        try:
            out[col] = _coerce(out[col], kind)
        except (TypeError, ValueError) as exc:
            raise ClapError(f"{source}: column {col!r} must hold {_KIND_WORDS[kind]} ({exc})") from exc
    for col in group_columns:
        if out[col].isna().any():
            raise ClapError(f"{source}: group column {col!r} has missing labels; every probe needs a group")
        out[col] = out[col].astype(str).astype(object)
    unknown = sorted(set(out["site_kind"]) - set(SITE_KINDS))
    if unknown:
        raise ClapError(f"{source}: column 'site_kind' has unknown value(s) {', '.join(unknown)}; expected one of {', '.join(SITE_KINDS)}")
    return out


_KIND_WORDS = {"str": "text", "Int64": "integers or missing values", "float": "numbers", "bool": "true/false values"}


def _coerce(series: pd.Series, kind: str) -> pd.Series:
    if kind == "str":
        present = series.notna()
        out = series.astype(object).where(present, None)
        out[present] = out[present].astype(str)
        return out
    if kind == "Int64":
        if pd.api.types.is_float_dtype(series):
            values = series.dropna()
            if not (values == values.round()).all():
                raise ValueError("found non-integer values")
        return series.astype("Int64")
    if kind == "float":
        return pd.to_numeric(series, errors="raise").astype("float64")
    if kind == "bool":
        if series.isna().any():
            raise ValueError("found missing values")
        return series.astype(bool)
    raise AssertionError(kind)


def save_results(data: pd.DataFrame, meta: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``data`` and ``meta`` in the engine's layout (used by :mod:`analyses.synthetic` and tests)."""
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    data.to_parquet(root / RESULTS_FILE, index=False)
    (root / SIDECAR_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return root
