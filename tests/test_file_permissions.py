"""Output files honour the umask: the atomic writers of ``clap/contract.py`` create files with the mode a plain
``open()`` would give them (0644 under umask 022, 0664 under 002), not the 0600 of ``tempfile.mkstemp``; and every
atomic writer in the tree goes through that one helper."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest

from clap.contract import atomic_write_frame, atomic_write_json, atomic_write_text, current_umask

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask
    assert current_umask() == umask  # reading it does not change it


def test_atomic_writers_honour_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    frame = pd.DataFrame({"a": [1, 2]})
    written = [
        atomic_write_text(tmp_path / "report.md", "# report\n"),
        atomic_write_json(tmp_path / "run.json", {"a": 1}),
        atomic_write_frame(tmp_path / "table.csv", frame),
        atomic_write_frame(tmp_path / "results.parquet", frame),
    ]
    # a file that existed with another mode gets the umask's mode too (it is replaced, not edited)
    old = tmp_path / "old.md"
    old.write_text("x")
    old.chmod(0o600)
    written.append(atomic_write_text(old, "y"))
    for path in written:
        assert _mode(path) == expected, (path.name, oct(_mode(path)))
    assert {0o022: 0o644, 0o002: 0o664}[umask] == expected
    assert not list(tmp_path.glob(".*.tmp"))


def test_figures_and_reports_honour_the_umask(tmp_path, umask):
    from analyses.report import write_report
    from analyses.synthetic import write_synthetic

    run = write_synthetic(tmp_path / "run", n_probes=6, n_layers=3, site_kinds=("mlp_out",), metrics=("logit_diff",),
                          tokens=("x",), trivial_sites=False)
    files = write_report(run, out_dir=tmp_path / "analysis", n_boot=100)
    outputs = [p for p in (tmp_path / "analysis").rglob("*") if p.is_file()]
    assert files.html in outputs and any(p.suffix == ".png" for p in outputs)
    assert {oct(_mode(p)) for p in outputs} == {oct(0o666 & ~umask)}
    assert {oct(_mode(p)) for p in run.iterdir() if p.is_file()} == {oct(0o666 & ~umask)}


def test_every_atomic_writer_uses_the_one_helper():
    """Temporary files that are renamed into place are made by ``clap.contract.atomic_write`` only: a second
    ``mkstemp`` / ``NamedTemporaryFile`` writer would bring the 0600 mode back."""
    pattern = re.compile(r"\b(mkstemp|NamedTemporaryFile)\s*\(")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".venv/", "build/")) or "/." in f"/{rel}":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if pattern.search(line) and rel != "clap/contract.py":
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, offenders
    contract = (ROOT / "clap" / "contract.py").read_text(encoding="utf-8")
    assert len(pattern.findall(contract)) == 1


def test_converted_model_folder_is_not_private(tmp_path, umask, monkeypatch):
    """``mkdtemp`` makes a 0700 folder; the GGUF conversion cache renames one into place, so it is opened up to
    the umask's directory mode first."""
    import clap.models as models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def fake_convert(source, folder):
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_into", fake_convert)
    target = models.convert_gguf(gguf, cache_dir=tmp_path / "cache")
    assert (target / "config.json").is_file()
    assert _mode(target) == 0o777 & ~umask
