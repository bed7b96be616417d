"""Shared test fixtures: paths to the team's shared real data, skipped clearly when absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when a user's checkout lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def gpt2_tokenizer(shared_data: Path):
    """The real GPT-2 tokenizer from the shared files, for tests whose subject is that tokenizer or data made for it
    (the engine tests use tests/tiny_tokenizer.py instead). ``GPT2TokenizerFast(vocab_file=...)`` would silently give
    an empty tokenizer, so the slow class is built from the parsed files."""
    from transformers import GPT2Tokenizer

    folder = shared_data / "gpt2-tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().split("\n")[1:]
    return GPT2Tokenizer(vocab=vocab, merges=[tuple(line.split(" ")) for line in lines if line])


@pytest.fixture(scope="session")
def real_gpt2_tokenizer(shared_data):
    """The real GPT-2 tokenizer; skips where ``../shared/data`` is absent."""
    return gpt2_tokenizer(shared_data)
