"""Built-in fine-tuned models: a built-in base model plus a LoRA adapter shipped in ``clap/data/models/``.

Why merge once and cache: every clap step loads models through :func:`clap.models.resolve_source`, which
hands transformers a directory. Merging the adapter into the base weights (peft's ``merge_and_unload``) and saving
the result as safetensors gives that directory, so patching, reporting and further fine-tuning see an ordinary
model whose modules are the base architecture's (no peft wrappers for nnsight to walk through). The cache key
covers the adapter's bytes and the base model's identity (for a built-in GGUF base, the content key of its
conversion), so a changed adapter is never served stale and every caller finds the same merged folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from clap.errors import ClapError

log = logging.getLogger(__name__)

#: Where shipped adapters live (``adapter_config.json`` + ``adapter_model.safetensors`` per folder).
ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "clap" / "data" / "models"

#: Built-in name -> (built-in base model, adapter folder under :data:`ADAPTERS_DIR`).
BUILTIN_ADAPTERS = {
    "smollm2-135m-epilepsy": ("smollm2-135m", "smollm2-135m-epilepsy-lora"),
}

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def builtin_adapter_dir(name: str) -> Path:
    """The shipped adapter folder of built-in model ``name``, checked to hold both peft files."""
    folder = ADAPTERS_DIR / BUILTIN_ADAPTERS[name][1]
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise ClapError(f"built-in model {name!r}: {', '.join(missing)} missing in {folder} (damaged install?)")
    return folder


def _fingerprint(adapter: Path, base_location: str) -> str:
    """The adapter's bytes and the base model's identity: the name of its folder when that folder is a GGUF
    conversion made by clap (it holds ``clap-source.json``; the name carries the GGUF's content digest,
    :func:`clap.models.gguf_cache_dir`), else its location.

    Why not the full path of a converted base: it holds the cache root, so two callers with different
    ``CLAP_CACHE`` or home folders would merge the same adapter into the same weights twice."""
    base = Path(base_location)
    converted = (base / "clap-source.json").is_file()
    digest = hashlib.sha256((f"gguf:{base.name}" if converted else base_location).encode())
    for name in ADAPTER_FILES:
        digest.update((adapter / name).read_bytes())
    return digest.hexdigest()[:16]


def merge_builtin_adapter(name: str, base_location: str, cache_dir: Path) -> Path:
    """Directory of built-in ``name`` with its adapter merged into the base weights (made once, then cached under
    ``cache_dir``). ``base_location`` is the resolved folder of its base model (:func:`clap.models.resolve_source`
    resolves it and calls this: the dependency runs one way).

    Merged under a file lock (a second process waits, then finds the published folder) into a per-process
    temporary folder renamed when complete, so an interrupted merge is never mistaken for a finished one and two
    processes never merge the same adapter twice or mix their files; a temporary left by a killed merge is removed
    by the next one (it holds the lock).
    """
    from clap.locks import exclusive_lock

    adapter = builtin_adapter_dir(name)
    root = Path(cache_dir)
    target = root / f"{name}-{_fingerprint(adapter, base_location)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"{target.name}.lock", wait=True):
        if (target / "config.json").is_file():  # another process merged it while we waited
            return target
        for orphan in root.glob(f"{target.name}.partial-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            _merge_into(base_location, adapter, partial)
            if target.exists():  # an incomplete folder (no config.json): replace it
                shutil.rmtree(target)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _merge_into(base_location: str, adapter: Path, folder: Path) -> None:
    """Merge ``adapter`` into the base weights and save the model and the base's tokenizer into ``folder``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("merging the %s adapter into %s (once) -> %s", adapter.name, base_location, folder)
    base = AutoModelForCausalLM.from_pretrained(base_location, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    folder.mkdir(parents=True)
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_location).save_pretrained(folder)


__all__ = ["ADAPTERS_DIR", "BUILTIN_ADAPTERS", "builtin_adapter_dir", "merge_builtin_adapter"]
