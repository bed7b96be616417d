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
    target_name = models.gguf_cache_dir(fake_gguf).name
    (cache / f"{target_name}.tmp-killed").mkdir()
    calls = []
    _fake_transformers(monkeypatch, calls)
    target = models.convert_gguf(fake_gguf, cache_dir=cache)
    assert len(calls) == 1 and [p.name for p in cache.iterdir()] == [target.name]
    assert models.convert_gguf(fake_gguf, cache_dir=cache) == target and len(calls) == 1


def test_cache_key_is_the_files_content_whoever_calls(fake_gguf, tmp_path, monkeypatch):
    """The same GGUF reached from another install (another folder, a symlink, another mtime) finds the one
    conversion; a file whose bytes changed (same size, mtime set back) gets a conversion of its own."""
    import os
    import shutil

    calls = []
    _fake_transformers(monkeypatch, calls)
    cache = tmp_path / "cache"
    other = tmp_path / "other-venv" / "site-packages"
    other.mkdir(parents=True)
    copy = Path(shutil.copy(fake_gguf, other / fake_gguf.name))
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    link = tmp_path / "link.gguf"
    link.symlink_to(fake_gguf)
    assert models.gguf_cache_dir(copy, cache) == models.gguf_cache_dir(fake_gguf, cache)
    assert models.gguf_cache_dir(link, cache).name == f"{fake_gguf.stem}-{models._fingerprint(fake_gguf)}"
    first = models.convert_gguf(fake_gguf, cache_dir=cache)
    renamed = Path(shutil.copy(fake_gguf, other / "renamed.gguf"))
    assert models.convert_gguf(renamed, cache_dir=cache) == first and len(calls) == 1
    assert models.convert_gguf(copy, cache_dir=cache) == first and len(calls) == 1
    monkeypatch.chdir(fake_gguf.parent)
    assert models.convert_gguf(Path(fake_gguf.name), cache_dir=cache) == first and len(calls) == 1

    stat = fake_gguf.stat()
    fake_gguf.write_bytes(b"GGUF not really!"[: stat.st_size].replace(b"really", b"REALLY"))
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what `touch -r` / `cp -p` leave
    assert fake_gguf.stat().st_size == stat.st_size
    changed = models.convert_gguf(fake_gguf, cache_dir=cache)
    assert changed != first and len(calls) == 2


def test_default_cache_folder_does_not_depend_on_the_working_folder(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "shared-cache"))
    here = models.gguf_cache_dir(fake_gguf)
    monkeypatch.chdir(tmp_path)
    assert models.gguf_cache_dir(Path(fake_gguf.name)) == here
    assert here.parent == tmp_path / "shared-cache" / "gguf"
