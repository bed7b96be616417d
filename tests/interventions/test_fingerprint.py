"""Resuming never mixes batches computed with different weights: every tensor is fingerprinted, and a rerun after
the weights changed starts afresh and says so."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import pandas as pd
import pytest
import torch

from clap.models import weights_fingerprint, wrap
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


def _spec():
    return StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre", "layers[*].mlp_out"],
        "positions": ["each"], "metrics": ["logit_diff"], "execution": {"max_rows": 10, "progress": False},
    })


def test_editing_the_last_layer_after_an_interrupted_run_recomputes_every_batch(tmp_path, tiny_gpt2, tokenizer,
                                                                                 batches, caplog):
    model = wrap(copy.deepcopy(tiny_gpt2.hf), tokenizer)
    out = tmp_path / "out"
    batches.reset(stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        Study(_spec(), model=model).run(out)
    stale = next((out / ".partial").iterdir())
    assert len(list(stale.glob("batch-*.parquet"))) == 3
    with torch.no_grad():  # a small edit of the last block only: the weights a first-tensors hash never reads
        model.hf.transformer.h[-1].mlp.c_proj.weight.mul_(1.05)
    batches.reset()
    with caplog.at_level(logging.WARNING, logger="interventions.study"):
        resumed = Study(_spec(), model=model).run(out)
    assert batches.calls[:3] == [0, 1, 2]  # nothing reused
    assert f"{stale} holds 3 finished batches of this study computed with different weights" in caplog.text
    assert "starting afresh" in caplog.text
    fresh = Study(_spec(), model=model).run()
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), fresh.reset_index(drop=True))


def test_in_memory_fingerprint_covers_every_tensor(tiny_gpt2):
    hf = copy.deepcopy(tiny_gpt2.hf)
    before = weights_fingerprint(hf)
    assert before == weights_fingerprint(tiny_gpt2.hf)
    for name, tensor in sorted(hf.state_dict().items()):  # one value of each tensor in turn, the last one too
        flat = tensor.view(-1)
        old = flat[-1].item()
        flat[-1] = old + 1e-3
        assert weights_fingerprint(hf) != before, name
        flat[-1] = old
    assert weights_fingerprint(hf) == before
    assert weights_fingerprint(hf.to(torch.bfloat16)) != before  # dtype is part of it and bf16 bytes hash too


def test_directory_fingerprint_hashes_the_files_once_and_notices_a_resave(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    hf = copy.deepcopy(tiny_gpt2.hf)
    hf.save_pretrained(folder)
    first = weights_fingerprint(hf, folder)
    cached = json.loads((tmp_path / "cache" / "fingerprints.json").read_text())
    weights = folder / "model.safetensors"
    assert list(cached.values()) == [hashlib.blake2b(weights.read_bytes(), digest_size=16).hexdigest()]
    assert weights_fingerprint(hf, folder) == first
    with torch.no_grad():
        hf.transformer.h[-1].ln_2.bias.add_(1e-4)
    hf.save_pretrained(folder)
    assert weights_fingerprint(hf, folder) != first
    assert len(json.loads((tmp_path / "cache" / "fingerprints.json").read_text())) == 2


def test_an_edit_that_keeps_size_and_mtime_changes_the_fingerprint(tmp_path, tiny_gpt2, monkeypatch):
    """``cp -p`` / ``rsync -a`` / ``touch -r`` give edited weights the old size and mtime; the cached digest must
    not be reused (its key holds the inode and change time too), nor a GGUF conversion's cache key."""
    import os
    import shutil

    from clap import models

    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "cache"))
    folder, other = tmp_path / "model", tmp_path / "other"
    hf = copy.deepcopy(tiny_gpt2.hf)
    hf.save_pretrained(folder)
    first = weights_fingerprint(hf, folder)
    with torch.no_grad():
        hf.transformer.h[-1].ln_2.bias.add_(1e-4)
    hf.save_pretrained(other)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    shutil.copyfile(other / "model.safetensors", weights)  # in place: same inode, same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert weights.read_bytes() != b"" and weights_fingerprint(hf, folder) != first
    assert weights_fingerprint(hf, folder) == weights_fingerprint(hf, other)
    assert models._file_digest(weights) == hashlib.blake2b(weights.read_bytes(), digest_size=16).hexdigest()

    gguf = tmp_path / "m.gguf"  # the conversion cache: content, not timestamps
    gguf.write_bytes(b"GGUF" + b"a" * 60)
    stat = gguf.stat()
    key = models._fingerprint(gguf)
    gguf.write_bytes(b"GGUF" + b"b" * 60)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert models._fingerprint(gguf) != key
    shutil.copy2(gguf, tmp_path / "copy.gguf")  # a copy elsewhere shares the conversion
    assert models._fingerprint(tmp_path / "copy.gguf") == models._fingerprint(gguf)
    (tmp_path / "cache" / "fingerprints.json").write_text("[]")  # a cache that is not one: ignored, rewritten
    assert models._file_digest(gguf) == hashlib.blake2b(gguf.read_bytes(), digest_size=16).hexdigest()


def test_weights_are_hashed_again_only_for_a_run_that_writes(tmp_path, tiny_gpt2, tokenizer, monkeypatch):
    """A run with an output folder re-hashes in-memory weights (resuming and the sidecar name them); a run that
    writes nothing skips the hash, a read of every weight."""
    from interventions import study as study_module

    model = wrap(copy.deepcopy(tiny_gpt2.hf), tokenizer)
    calls = []
    real = study_module.weights_fingerprint
    monkeypatch.setattr(study_module, "weights_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    in_memory = Study(_spec(), model=model).run()
    assert calls == []
    with torch.no_grad():
        model.hf.transformer.h[-1].ln_2.bias.add_(1e-3)
    written = Study(_spec(), model=model).run(tmp_path / "out")
    assert calls == [1]
    sidecar = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sidecar["model"]["weights_fingerprint"] == real(model.hf)
    assert not in_memory.reset_index(drop=True).equals(written.reset_index(drop=True))
