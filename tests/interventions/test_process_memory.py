"""The study loop hands freed memory back after every batch it runs, not after batches a resume loads."""

from __future__ import annotations

import sys

import pytest

import interventions.study as study_module
from clap.process_memory import release_freed_memory

from .conftest import small_study


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_release_reaches_glibc():
    assert release_freed_memory() is True


def test_called_once_per_batch_run(tiny_gpt2, batches, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(study_module, "release_freed_memory", lambda: calls.append(len(batches.calls)) or True)
    spec = {"sites": ["layers[*].resid_pre"], "positions": ["each"], "execution": {"max_rows": 10, "progress": False}}
    batches.reset(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        small_study(tiny_gpt2, **spec).run(tmp_path)
    assert calls == [1, 2]  # after each finished batch, not the interrupted one
    batches.reset()
    calls.clear()
    small_study(tiny_gpt2, **spec).run(tmp_path)
    assert len(batches.calls) > 1 and calls == list(range(1, len(batches.calls) + 1))  # resumed: only batches run
