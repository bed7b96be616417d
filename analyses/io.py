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
    results_path,
    validate_results,
    write_results,
)
from clap.errors import ClapError

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
        Naming the file and what is wrong, when either file is missing or malformed, or holds no rows.

    Examples
    --------
    >>> from analyses import load_results
    >>> data, meta = load_results("runs/capitals")          # doctest: +SKIP
    >>> data.groupby("site_kind").recovery.mean()            # doctest: +SKIP

    A folder written by :func:`analyses.synthetic.write_synthetic` reads the same way:

    >>> import tempfile
    >>> from analyses.synthetic import write_synthetic
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     data, meta = load_results(write_synthetic(tmp, n_probes=4, n_layers=3, site_kinds=("mlp_out",)))
    >>> sorted(data["site_kind"].unique())
    ['final_norm', 'mlp_out', 'unembed']
    >>> str(data["layer"].dtype)
    'Int64'
    """
    data, meta = read_results(results_dir)
    if data.empty:  # said here, before exclusions and slices could make it sound like a filter's doing
        raise ClapError(f"{results_path(results_dir)}: the results file holds no rows: nothing to analyse (was the "
                        "probe set empty, or the file written by something other than a finished patching run?)")
    return data, meta


def load_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and check a ``run.json`` sidecar (:func:`clap.contract.read_sidecar`)."""
    return read_sidecar(path)


def save_results(data: pd.DataFrame, meta: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``data`` and ``meta`` in the engine's layout, atomically (used by :mod:`analyses.synthetic` and tests).

    Parameters
    ----------
    data : pandas.DataFrame
        A results table with the columns of :data:`clap.contract.REQUIRED_COLUMNS`.
    meta : dict
        The ``run.json`` sidecar (:func:`analyses.synthetic.make_meta` makes one for synthetic data).
    results_dir : str or Path
        The folder to write ``results.parquet`` and ``run.json`` into.

    Returns
    -------
    Path
        The folder.

    Examples
    --------
    >>> import tempfile
    >>> from analyses import load_results, save_results
    >>> from analyses.synthetic import make_meta, make_results
    >>> data = make_results(n_probes=4, n_layers=3, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = save_results(data, make_meta(data), tmp)
    ...     back, meta = load_results(folder)
    >>> back.shape == data.shape, meta["group_columns"]
    (True, ['knowledge_type'])
    """
    write_results(results_dir, data, meta)
    return Path(results_dir)
