"""Where each architecture keeps its residual stream, attention, MLP, heads, final norm and unembedding.

Why a table: a spec says ``layers[3].attn_out`` or ``layers[3].heads[7]`` and must mean the same thing on GPT-2,
Llama and their relatives, while the module names differ (``transformer.h.3.attn`` vs ``model.layers.3.self_attn``).
Each entry maps the architecture-neutral site kinds to a module path and whether the site is that module's input
or output. Per-head sites are the input of the attention output projection (each head's output before the heads
are mixed), sliced by head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clap.errors import ClapError


@dataclass(frozen=True)
class ArchitectureMap:
    """Module paths of one architecture family. ``{i}`` stands for the layer index."""

    family: str
    layers: str  #: the ModuleList of blocks
    embed: str  #: token embedding
    final_norm: str
    unembed: str
    attn: str  #: attention module inside a block, relative to the block
    mlp: str
    out_proj: str  #: attention output projection inside a block (its input is the concatenated head outputs)
    n_heads_attr: str = "num_attention_heads"
    #: the per-token projections inside a block that make the attention's queries, keys and values from the
    #: block's (normed) input; empty where unknown
    qkv: tuple[str, ...] = ()

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


GPT2 = ArchitectureMap(
    family="gpt2",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    mlp="mlp",
    out_proj="attn.c_proj",
    n_heads_attr="n_head",
    qkv=("attn.c_attn",),
)

LLAMA = ArchitectureMap(
    family="llama",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)

GPT_NEOX = ArchitectureMap(
    family="gpt_neox",
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",  # transformers 5 (was `embed_out` before)
    attn="attention",
    mlp="mlp",
    out_proj="attention.dense",
    qkv=("attention.query_key_value",),
)

#: transformers ``config.model_type`` -> module map. Llama-style decoders share one layout.
BY_MODEL_TYPE: dict[str, ArchitectureMap] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "olmo": LLAMA,
    "phi3": LLAMA,
    "gpt_neox": GPT_NEOX,
}


class ArchitectureError(ClapError):
    pass


def architecture_of(hf_model: torch.nn.Module) -> ArchitectureMap:
    """The module map for a transformers model, or a clear error naming the supported families."""
    model_type = getattr(hf_model.config, "model_type", None)
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ArchitectureError(
            f"no architecture-neutral aliases for model_type {model_type!r} (supported: "
            f"{', '.join(sorted(BY_MODEL_TYPE))}); address modules by their real names instead, "
            f"e.g. {next(iter(dict(hf_model.named_modules())), '')!r}"
        )
    return arch


def n_layers(hf_model: torch.nn.Module) -> int:
    arch = architecture_of(hf_model)
    return len(hf_model.get_submodule(arch.layers))


def n_heads(hf_model: torch.nn.Module) -> int:
    arch = architecture_of(hf_model)
    config = hf_model.config
    return int(getattr(config, arch.n_heads_attr, None) or config.num_attention_heads)
