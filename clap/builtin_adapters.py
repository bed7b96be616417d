"""Built-in fine-tuned models: a built-in base model plus a LoRA adapter shipped in ``clap/data/models/``.

Why merge once and cache: every clap step loads models through :func:`clap.models.resolve_source`, which
hands transformers a directory. Merging the adapter into the base weights (peft's ``merge_and_unload``) and saving
the result as safetensors gives that directory, so patching, reporting and further fine-tuning see an ordinary
model whose modules are the base architecture's (no peft wrappers for nnsight to walk through). The cache key
covers the adapter's bytes and the base model's location, so a changed adapter is never served stale.
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
    digest = hashlib.sha256(base_location.encode())
    for name in ADAPTER_FILES:
        digest.update((adapter / name).read_bytes())
    return digest.hexdigest()[:16]


def merge_builtin_adapter(name: str, base_location: str, cache_dir: Path) -> Path:
    """Directory of built-in ``name`` with its adapter merged into the base weights (made once, then cached under
    ``cache_dir``). ``base_location`` is the resolved folder of its base model (:func:`clap.models.resolve_source`
    resolves it and calls this: the dependency runs one way).

    Written under a per-process temporary name and renamed when complete, so an interrupted merge is never
    mistaken for a finished one and two processes merging at once cannot mix their files.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_name, _ = BUILTIN_ADAPTERS[name]
    adapter = builtin_adapter_dir(name)
    target = cache_dir / f"{name}-{_fingerprint(adapter, base_location)}"
    if (target / "config.json").is_file():
        return target
    log.info("merging the %s adapter into %s (once) -> %s", adapter.name, base_name, target)
    base = AutoModelForCausalLM.from_pretrained(base_location, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    merged.save_pretrained(partial)
    AutoTokenizer.from_pretrained(base_location).save_pretrained(partial)
    if target.exists():  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
        return target
    partial.rename(target)
    return target


__all__ = ["ADAPTERS_DIR", "BUILTIN_ADAPTERS", "builtin_adapter_dir", "merge_builtin_adapter"]
