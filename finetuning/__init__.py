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

from typing import TYPE_CHECKING

from clap.lazy import lazy_exports

#: Each public name and the module it lives in: imported on first use, so ``clap --help`` never loads transformers.
_EXPORTS = {
    "PRESETS": "finetuning.config",
    "FinetuneConfig": "finetuning.config",
    "FinetuneConfigError": "finetuning.config",
    "from_preset": "finetuning.config",
    "load_config": "finetuning.config",
    "FinetuneDataError": "finetuning.data",
    "load_corpus": "finetuning.data",
    "prepare_datasets": "finetuning.data",
    "FinetuneError": "finetuning.train",
    "FinetuneResult": "finetuning.train",
    "finetune": "finetuning.train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time the names above are imported on first use
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
