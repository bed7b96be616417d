"""First-time GGUF conversion by two processes at once: one conversion, both get the published folder, no orphan
temporaries; a failed conversion leaves nothing behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from clap import models


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "tiny.Q4.gguf"
    path.write_bytes(b"GGUF not really")
    return path


class FakeModel:
    """Stands in for the dequantised model: transformers' GGUF parsing takes ~30 s; the locking is what is tested."""

    def __init__(self, fail: bool = False):
        self.config = SimpleNamespace()
        self.fail = fail

    def save_pretrained(self, folder):
        time.sleep(0.5)  # long enough for the second caller to arrive while the first converts
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.fail:
            raise RuntimeError("disk full")
        (Path(folder) / "config.json").write_text("{}")


def _fake_transformers(monkeypatch, calls, fail=False):
    import transformers

    def load(*args, **kwargs):
        calls.append(args)
        return FakeModel(fail)

    tokenizer = SimpleNamespace(save_pretrained=lambda folder: (Path(folder) / "tokenizer.json").write_text("{}"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)


def test_concurrent_first_conversions_convert_once_and_share_the_result(fake_gguf, tmp_path, monkeypatch):
    calls = []
    _fake_transformers(monkeypatch, calls)
    cache = tmp_path / "cache"
    results, errors = [], []

    def convert():
        try:
            results.append(models.convert_gguf(fake_gguf, cache_dir=cache))
        except Exception as exc:  # noqa: BLE001 - any failure of either caller fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file() and (results[0] / "clap-source.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [results[0].name]  # no temporaries, no lock file


def test_failed_conversion_leaves_no_temporary_and_the_next_one_succeeds(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_transformers(monkeypatch, [], fail=True)
    with pytest.raises(RuntimeError, match="disk full"):
        models.convert_gguf(fake_gguf, cache_dir=cache)
    assert list(cache.iterdir()) == []
    # an orphan of a process killed mid-conversion (it could not clean up) is removed by the next converter
    target_name = f"{fake_gguf.stem}-{models._fingerprint(fake_gguf)}"
    (cache / f"{target_name}.tmp-killed").mkdir()
    calls = []
    _fake_transformers(monkeypatch, calls)
    target = models.convert_gguf(fake_gguf, cache_dir=cache)
    assert len(calls) == 1 and [p.name for p in cache.iterdir()] == [target.name]
    assert models.convert_gguf(fake_gguf, cache_dir=cache) == target and len(calls) == 1
