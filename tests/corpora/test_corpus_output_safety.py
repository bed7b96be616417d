"""A failed or interrupted ``clap corpus build`` leaves the previous corpus byte for byte as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clap.app.cli import main
from corpora import build as build_module
from corpora.build import BuildConfig, build_corpus


def write_xml(path: Path, chunks: list[bytes]) -> Path:
    path.write_bytes(b'<?xml version="1.0"?>\n<PubmedArticleSet>\n' + b"\n".join(chunks) + b"\n</PubmedArticleSet>\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def corpus(article_chunks, tmp_path) -> tuple[Path, Path]:
    """A small corpus built through the CLI (with a file of the user's next to it), and its input."""
    source = write_xml(tmp_path / "in.xml", [c for c in article_chunks if b"<AbstractText" in c][:30])
    out = tmp_path / "corpus"
    assert main(["--quiet", "corpus", "build", str(source), "--no-filter", "--no-figure", "-o", str(out)]) == 0
    (out / "notes.txt").write_text("my notes")
    return source, out


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_failed_rebuild_leaves_the_previous_corpus_untouched(corpus, tmp_path, capsys, overwrite):
    source, out = corpus
    before = snapshot(out)
    assert len([k for k, v in before.items() if v is not None]) >= 8  # dataset files, JSONL, stats, manifest
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    failing = [
        ([str(empty)], "file is empty"),                                         # bad input
        ([str(source), "--term", r"nothing=\bzzqqxx\b"], "no record left after filtering"),  # filter keeps nothing
        ([str(tmp_path / "missing.xml")], "no such file"),
    ]
    for args, message in failing:
        assert main(["corpus", "build", *args, "--no-figure", *overwrite, "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty.xml", "in.xml"]  # no staging left


def test_interrupted_rebuild_leaves_the_previous_corpus_untouched(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the new corpus is being written: the old one stays, the half-written one is removed."""
    source, out = corpus
    before = snapshot(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_stats", interrupt)  # after the dataset and JSONL are written
    assert main(["corpus", "build", str(source), "--no-filter", "--no-figure", "-o", str(out)]) == 130
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "in.xml"]


def test_successful_rebuild_replaces_outputs_and_keeps_other_files(corpus, article_chunks, tmp_path):
    _source, out = corpus
    smaller = write_xml(tmp_path / "small.xml", [c for c in article_chunks if b"<AbstractText" in c][:10])
    report = build_corpus(BuildConfig(inputs=[smaller], out=out, filter_terms=False, figure=False))
    assert report.kept == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [str(smaller)] and sum(manifest["splits"].values()) == 10
    assert (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "in.xml", "small.xml"]


def test_corpus_rebuilt_from_its_own_files(corpus):
    """The old code emptied the folder before reading: a corpus could not be rebuilt from its own JSONL."""
    _source, out = corpus
    kept = sum(len((out / name).read_text().splitlines()) for name in ("train.jsonl", "validation.jsonl"))
    assert main(["--quiet", "corpus", "build", str(out / "train.jsonl"), str(out / "validation.jsonl"),
                 "--no-filter", "--no-figure", "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["report"]["kept"] == kept


def test_output_that_is_a_file_is_refused(corpus, tmp_path, capsys):
    source, _out = corpus
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["corpus", "build", str(source), "--overwrite", "-o", str(target)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_full_disk_is_one_line_and_leaves_the_previous_corpus(corpus, tmp_path, capsys, monkeypatch):
    """ENOSPC while the new corpus is written: one line naming the file, the staging folder removed."""
    import errno

    source, out = corpus
    before = snapshot(out)

    def full(path, rows):
        Path(path).write_text("half a line")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(build_module, "_write_jsonl", full)
    assert main(["corpus", "build", str(source), "--no-filter", "--no-figure", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0
    assert "No space left on device (free some space and rerun)" in err and f"{out} is unchanged" in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "in.xml"]


def test_folders_of_killed_builds_are_removed_under_the_lock(corpus, tmp_path, capsys):
    import subprocess
    import sys

    from clap.locks import exclusive_lock

    source, out = corpus
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone
    killed = [tmp_path / f".corpus.building-{dead.pid}-0123abcd", tmp_path / ".corpus.building-89ab4567"]
    alive = tmp_path / ".corpus.building-1-feedbeef"  # pid 1 runs: a build from before the lock, left alone
    for folder in [*killed, alive]:
        (folder / "dataset").mkdir(parents=True)
        (folder / "train.jsonl").write_text("half")
    other = tmp_path / ".corpus-old.building-1234-aaaa0000"  # another output's: never touched
    other.mkdir()
    assert main(["--quiet", "corpus", "build", str(source), "--no-filter", "--no-figure", "-o", str(out)]) == 0
    assert not any(f.exists() for f in killed) and alive.is_dir() and other.is_dir()
    with exclusive_lock(tmp_path / ".corpus.lock", wait=False):
        assert main(["corpus", "build", str(source), "--no-filter", "--no-figure", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"corpus folder {out} is in use by pid" in err
    assert not (tmp_path / ".corpus.lock").exists()
