"""Reading and writing a results directory, through the results contract (:mod:`clap.contract`).

The patching engine writes ``results.parquet`` and the ``run.json`` sidecar; everything in :mod:`analyses` starts
from them. Reading them in one place means a malformed directory fails once, early, with a message naming the file
and the columns or keys at fault, instead of as a ``KeyError`` deep inside a statistics call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from clap.contract import (
    REQUIRED_COLUMNS,
    read_results,
    read_sidecar,
    validate_results,
    write_results,
)

__all__ = ["REQUIRED_COLUMNS", "load_results", "load_sidecar", "save_results", "validate_results"]


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read ``RESULTS_DIR``: ``(data, meta)``, validated and with the contract's dtypes.

    Parameters
    ----------
    results_dir : str or Path
        A folder written by ``clap patch`` (or :func:`save_results`).

    Returns
    -------
    data : pandas.DataFrame
        The tidy results: one row per probe x site x position x operation x metric, the columns of
        :data:`clap.contract.REQUIRED_COLUMNS` plus the label columns named in ``meta["group_columns"]``.
    meta : dict
        The ``run.json`` sidecar.

    Raises
    ------
    clap.errors.ClapError
        Naming the file and what is wrong, when either file is missing or malformed.

    Examples
    --------
    >>> from analyses import load_results
    >>> data, meta = load_results("runs/capitals")          # doctest: +SKIP
    >>> data.groupby("site_kind").recovery.mean()            # doctest: +SKIP
    """
    return read_results(results_dir)


def load_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and check a ``run.json`` sidecar (:func:`clap.contract.read_sidecar`)."""
    return read_sidecar(path)


def save_results(data: pd.DataFrame, meta: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``data`` and ``meta`` in the engine's layout, atomically (used by :mod:`analyses.synthetic` and tests).
    Returns the folder."""
    write_results(results_dir, data, meta)
    return Path(results_dir)
