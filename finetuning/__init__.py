"""Fine-tuning a causal LM on a corpus built by ``clap corpus build`` (``clap finetune``).

Python surface::

    from finetuning import finetune, from_preset
    result = finetune("corpus/", "gpt2-dir/", "run/", from_preset("config-ii", epochs=3))
    result.model_dir                             # run/model: loads like any model folder (``clap patch``)

Modules, one job each:

- ``config``  :class:`FinetuneConfig`: the seed study's presets, YAML and ``--set`` overrides, one pydantic schema
- ``data``    corpus loading and tokenisation in the two layouts (truncate: one abstract per row; chunk: blocks)
- ``log``     the CSV training log and the loss-curve figure
- ``train``   the Trainer run: checkpoints, resumption, early stopping, LoRA
- ``checkpoints`` which checkpoint a rerun resumes from (the newest complete one; half-written ones set aside)
- ``cli``     ``clap finetune``

Why a package of its own: fine-tuning reads the corpus folder that :mod:`corpora` writes but uses none of its
code; models are loaded through :mod:`clap.models`, the same loader ``clap patch`` uses.
"""

from __future__ import annotations

from finetuning.config import (
    PRESETS,
    FinetuneConfig,
    FinetuneConfigError,
    from_preset,
    load_config,
)
from finetuning.data import FinetuneDataError, load_corpus, prepare_datasets
from finetuning.train import FinetuneError, FinetuneResult, finetune

__all__ = [
    "PRESETS",
    "FinetuneConfig",
    "FinetuneConfigError",
    "FinetuneDataError",
    "FinetuneError",
    "FinetuneResult",
    "finetune",
    "from_preset",
    "load_config",
    "load_corpus",
    "prepare_datasets",
]
