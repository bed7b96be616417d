"""Finished batches on disk, so an interrupted study resumes where it stopped.

Each finished batch is written (temporary name, then rename) to ``<out>/.partial/<plan fingerprint>/`` as it
completes; a rerun of the same plan reads those instead of recomputing them. The fingerprint covers the weights, so
batches computed with other weights are never reused (and the rerun says it starts afresh); a finished run removes
only its own partial folder, since other plans' batches may still be resumed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from clap.contract import atomic_write_frame
from clap.errors import ClapError
from clap.outputs import os_error_text
from interventions.plan import Plan

log = logging.getLogger(__name__)

#: the folder of an output folder that holds finished batches, one subfolder per plan fingerprint
PARTIAL_DIR = ".partial"
#: in each partial folder: which plan content and weights its batches belong to
PLAN_FILE = "plan.json"


class BatchStore:
    """The finished batches of one plan in one output folder (or nowhere, when the study writes no folder)."""

    def __init__(self, out: Path | None, plan: Plan):
        self.folder = open_partial_dir(out, plan) if out else None

    def _path(self, index: int) -> Path | None:
        return self.folder / f"batch-{index:05d}.parquet" if self.folder else None

    def load(self, index: int) -> pd.DataFrame | None:
        """The finished batch ``index``, or None when it still has to run."""
        path = self._path(index)
        return pd.read_parquet(path) if path is not None and path.is_file() else None

    def save(self, index: int, frame: pd.DataFrame) -> None:
        """Write batch ``index`` atomically; a failed write (a full disk) leaves no temporary file and stops the run
        with one line saying that the batches already saved are kept for the rerun."""
        path = self._path(index)
        if path is None:
            return
        try:
            atomic_write_frame(path, frame)
        except OSError as exc:
            kept = len(list(path.parent.glob("batch-*.parquet")))
            raise ClapError(f"{path}: cannot save a finished batch ({os_error_text(exc)}); the {kept} batch(es) "
                            "saved before it are kept and a rerun resumes from them") from None

    def discard(self) -> None:
        """Remove this plan's partial batches (the results are written); other plans' remain."""
        if self.folder is None:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass  # other plans' partial batches remain


def discard_partial(out: Path) -> bool:
    """Remove every plan's finished batches in ``out`` (``clap run`` does, before a patch stage whose inputs
    changed); True when there were any."""
    root = Path(out) / PARTIAL_DIR
    if not root.exists():
        return False
    shutil.rmtree(root)
    return True


def open_partial_dir(out: Path, plan: Plan) -> Path:
    """``<out>/.partial/<plan fingerprint>/`` (created), saying when other partial batches there are not reused.

    Each partial folder records its plan's content key and weights key, so a rerun after the weights changed
    (same spec, different fingerprint) says plainly that it starts afresh instead of silently ignoring them."""
    root = out / PARTIAL_DIR
    partial = root / plan.fingerprint
    for other in sorted(root.glob("*")) if root.is_dir() else []:
        if other == partial or not other.is_dir():
            continue
        n = len(list(other.glob("batch-*.parquet")))
        if not n:
            continue
        try:
            meta = json.loads((other / PLAN_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("content_key") == plan.content_key:
            log.warning("%s holds %d finished batches of this study computed with different weights (%s, now %s); "
                        "they are not reused: starting afresh", other, n, meta.get("model_key"), plan.model_key)
        else:
            log.warning("%s holds %d finished batches of a different spec, probe set or batching; they are not "
                        "reused (this run's batches go to %s)", other, n, partial)
    partial.mkdir(parents=True, exist_ok=True)
    for torn in partial.glob("*.tmp"):  # a write cut short by a killed run (the output folder is locked: no writer)
        torn.unlink(missing_ok=True)
    meta_file = partial / PLAN_FILE
    if not meta_file.is_file():
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"content_key": plan.content_key, "model_key": plan.model_key}))
        tmp.replace(meta_file)
    return partial
