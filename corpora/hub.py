"""Hugging Face datasets as corpus inputs: the seed study's ``nubahador/Retrieved_Data_from_PubMed`` or any
dataset (on the Hub or saved with ``save_to_disk``) whose columns match the seed spreadsheet.

Rows go through :func:`corpora.parse_table.records_from_rows`, the same path as a local CSV/XLSX, so a Hub copy
and a hand export of the same table give the same records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from corpora.errors import CorpusError, ProblemLog
from corpora.parse_table import records_from_rows
from corpora.records import PubmedRecord

SEED_DATASET = "nubahador/Retrieved_Data_from_PubMed"


def _load(name_or_path: str | Path, split: str | None):
    import datasets

    path = Path(name_or_path)
    if path.is_dir():
        inner = path / "dataset"
        target = inner if (inner / "dataset_dict.json").is_file() else path
        try:
            loaded = datasets.load_from_disk(str(target))
        except (FileNotFoundError, ValueError) as exc:
            raise CorpusError(f"{path}: not a dataset saved with save_to_disk ({exc})") from exc
    else:
        try:
            loaded = datasets.load_dataset(str(name_or_path), split=split)
        except Exception as exc:  # network, offline mode, unknown name: all reported the same way
            raise CorpusError(
                f"Hugging Face dataset {name_or_path!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "check the name, the network, or HF_HUB_OFFLINE"
            ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split is not None:
            if split not in loaded:
                raise CorpusError(f"{name_or_path}: no split {split!r} (splits: {', '.join(loaded)})")
            return [(f"{name_or_path}:{split}", loaded[split])]
        return [(f"{name_or_path}:{name}", part) for name, part in loaded.items()]
    return [(str(name_or_path), loaded)]


def iter_hf_dataset(name_or_path: str | Path, split: str | None = None, problems: ProblemLog | None = None
                    ) -> Iterator[PubmedRecord]:
    """Records from every split (or one ``split``) of a Hub dataset or a ``save_to_disk`` folder."""
    problems = problems if problems is not None else ProblemLog()
    for source, dataset in _load(name_or_path, split):
        yield from records_from_rows(iter(dataset), dataset.column_names, source, problems)
