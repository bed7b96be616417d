"""From a built corpus to tokenised training and validation rows, in the seed study's two layouts.

Why tokenise here into plain lists instead of ``Dataset.map``: ``map`` on a dataset loaded from disk writes cache
files next to the corpus, i.e. into another step's output folder; corpora are small (thousands of abstracts), so
tokenising in memory is fast and leaves the corpus untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clap.errors import ClapError, closest
from finetuning.config import FinetuneConfig

log = logging.getLogger(__name__)


class FinetuneDataError(ClapError):
    """The corpus cannot be fine-tuned on (missing, empty, no validation split, no text column)."""


def corpus_dataset_path(path: str | Path) -> Path:
    """Accept the output folder of ``clap corpus build`` or its ``dataset`` sub-folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FinetuneDataError(f"corpus not found: {path} does not exist (build one with `clap corpus build`)")
    if (path / "dataset").is_dir() and not (path / "dataset_dict.json").is_file():
        path = path / "dataset"
    if not (path / "dataset_dict.json").is_file() and not (path / "dataset_info.json").is_file():
        raise FinetuneDataError(
            f"{path} holds no saved Hugging Face dataset (no dataset_dict.json); expected the output folder "
            "of `clap corpus build` or its dataset/ sub-folder"
        )
    return path


def _empty_saved_splits(location: Path) -> list[str]:
    """Splits saved with no data shard: ``datasets`` writes them but cannot load them back (IndexError)."""
    import json

    try:
        splits = json.loads((location / "dataset_dict.json").read_text())["splits"]
        return [s for s in splits
                if not json.loads((location / s / "state.json").read_text()).get("_data_files", [None])]
    except (OSError, KeyError, ValueError, TypeError):
        return []


def load_corpus(path: str | Path, text_column: str = "text") -> Any:
    """Load the corpus as a ``DatasetDict`` with non-empty ``train`` and ``validation`` splits.

    Every way a corpus can be unusable is checked here, before a model is loaded: a missing folder, a single
    split, an empty split, a missing text column (with the closest column name).

    Parameters
    ----------
    path : str or Path
        The output folder of ``clap corpus build`` or its ``dataset`` sub-folder.
    text_column : str, default "text"
        The column fine-tuned on.

    Returns
    -------
    datasets.DatasetDict
        With ``train`` and ``validation`` splits, loaded into memory.

    Raises
    ------
    FinetuneDataError
        A corpus that cannot be fine-tuned on (see above).

    Examples
    --------
    >>> from finetuning import load_corpus
    >>> corpus = load_corpus("corpus/")  # doctest: +SKIP
    >>> sorted(corpus)  # doctest: +SKIP
    ['train', 'validation']
    """
    import datasets

    location = corpus_dataset_path(path)
    for split in _empty_saved_splits(location):
        raise FinetuneDataError(f"{location}: the corpus's {split!r} split is empty")
    try:
        data = datasets.load_from_disk(str(location), keep_in_memory=True)
    except (FileNotFoundError, ValueError, OSError, IndexError) as exc:
        raise FinetuneDataError(f"{location}: cannot load the corpus dataset: {exc}") from None
    if isinstance(data, datasets.Dataset):
        raise FinetuneDataError(
            f"{location}: the corpus has a single split and no 'validation' split; early stopping needs one "
            "(rebuild it with `clap corpus build`, which splits 80/20 with seed 42)"
        )
    for split in ("train", "validation"):
        if split not in data:
            raise FinetuneDataError(
                f"{location}: the corpus has no {split!r} split (it has: {', '.join(data) or 'none'}); "
                "fine-tuning needs 'train' and 'validation'"
            )
        if text_column not in data[split].column_names:
            hint = closest(text_column, data[split].column_names, n=1)
            raise FinetuneDataError(
                f"{location}: split {split!r} has no {text_column!r} column "
                f"(columns: {', '.join(data[split].column_names)})"
                + (f"; did you mean {hint[0]!r}? (set text_column)" if hint else "; choose one with text_column")
            )
        if len(data[split]) == 0:
            raise FinetuneDataError(f"{location}: the corpus's {split!r} split is empty")
    return data


def training_tokenizer(tokenizer: Any) -> Any:
    """Right padding and a pad token, as causal-LM training wants (the saved tokenizer is left as loaded)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    tok.model_max_length = int(1e12)  # lengths are handled here; silences the "sequence too long" warning
    return tok


@dataclass
class SplitStats:
    """What one split became: how many records went in, how many rows and real tokens came out."""

    records: int
    rows: int
    tokens: int
    truncated: int = 0  #: truncate mode: records longer than max_length (their tail is not trained on)
    dropped_tokens: int = 0  #: chunk mode: the remainder after the last full block


def _texts(split: Any, config: FinetuneConfig, limit: int | None, eos: str | None) -> list[str]:
    texts = [t for t in split[config.text_column] if isinstance(t, str) and t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if config.append_eos and eos:
        texts = [t + eos for t in texts]
    return texts


def _truncate(ids: list[list[int]], config: FinetuneConfig) -> tuple[list[list[int]], int]:
    cut = [seq[: config.max_length] for seq in ids]
    return cut, sum(len(seq) > config.max_length for seq in ids)


def _chunk(ids: list[list[int]], block: int) -> tuple[list[list[int]], int]:
    """Concatenate and cut into ``block``-token rows; the remainder is dropped (as Hugging Face's run_clm does),
    except when the whole split is shorter than one block, which is then kept as one row."""
    flat = [t for seq in ids for t in seq]
    if len(flat) < block:
        return ([flat] if flat else []), 0
    usable = (len(flat) // block) * block
    return [flat[i : i + block] for i in range(0, usable, block)], len(flat) - usable


def tokenize_split(
    split: Any, tokenizer: Any, config: FinetuneConfig, limit: int | None = None
) -> tuple[Any, SplitStats]:
    """Token-id rows for one split: ``input_ids`` of at most ``max_length`` tokens, unpadded."""
    import datasets

    texts = _texts(split, config, limit, tokenizer.eos_token)
    if not texts:
        raise FinetuneDataError(f"no non-empty {config.text_column!r} texts in this split")
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    if config.mode == "truncate":
        rows, truncated = _truncate(ids, config)
        stats = SplitStats(len(texts), len(rows), sum(map(len, rows)), truncated=truncated)
    else:
        rows, dropped = _chunk(ids, config.max_length)
        stats = SplitStats(len(texts), len(rows), sum(map(len, rows)), dropped_tokens=dropped)
    return datasets.Dataset.from_dict({"input_ids": rows}), stats


def prepare_datasets(corpus: Any, tokenizer: Any, config: FinetuneConfig) -> tuple[Any, Any, dict[str, SplitStats]]:
    """Tokenised (train, validation) datasets and their statistics.

    ``config.mode`` chooses the layout: ``truncate`` (one abstract per row, cut at ``max_length``) or ``chunk``
    (all abstracts concatenated and cut into ``max_length``-token blocks, the remainder dropped); ``subset`` /
    ``eval_subset`` limit the records used.

    Parameters
    ----------
    corpus : datasets.DatasetDict
        From :func:`load_corpus`.
    tokenizer : transformers tokenizer
        The model's tokenizer.
    config : FinetuneConfig
        The run's settings.

    Returns
    -------
    train, validation : datasets.Dataset
        Rows of ``input_ids`` (unpadded; the collator pads).
    stats : dict of str to SplitStats
        Per split: records in, rows and real tokens out, truncated rows or dropped tokens.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from finetuning import from_preset, load_corpus, prepare_datasets
    >>> train, valid, stats = prepare_datasets(load_corpus("corpus/"), AutoTokenizer.from_pretrained("gpt2-dir/"),
    ...                                        from_preset("config-ii"))  # doctest: +SKIP
    >>> stats["train"].rows  # doctest: +SKIP
    """
    train, train_stats = tokenize_split(corpus["train"], tokenizer, config, config.subset)
    valid, valid_stats = tokenize_split(corpus["validation"], tokenizer, config, config.eval_subset)
    for name, stats in (("train", train_stats), ("validation", valid_stats)):
        log.info(
            "%s: %d records -> %d rows of <= %d tokens (%d tokens%s)", name, stats.records, stats.rows,
            config.max_length, stats.tokens,
            f", {stats.truncated} truncated" if config.mode == "truncate" else f", {stats.dropped_tokens} dropped",
        )
    return train, valid, {"train": train_stats, "validation": valid_stats}


class CausalLMCollator:
    """Right-pads a batch; labels are the input ids with padding set to -100 (ignored by the loss).

    Why not ``DataCollatorForLanguageModeling``: it masks every token equal to the pad id, and the pad id is
    usually the EOS id, so real EOS tokens (``append_eos``) would silently stop being trained on.
    """

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [list(f["input_ids"]) for f in features]
        width = self.pad_to or max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[row, : len(seq)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_collator(tokenizer: Any, config: FinetuneConfig) -> CausalLMCollator:
    """Config I pads every row to ``max_length`` (as the seed did) unless ``padding: longest`` is chosen."""
    pad_to = config.max_length if (config.mode == "truncate" and config.padding == "max_length") else None
    return CausalLMCollator(tokenizer.pad_token_id, pad_to)
