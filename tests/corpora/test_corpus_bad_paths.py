"""Damaged stores, checkpoints, corpora and arguments: one ``clap: error:`` line (exit 2), never a traceback, and
nothing on disk changed by the refusal."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import corpora.sources
from clap.app.cli import main


def fetch_args(url: str, out: Path, *extra: str) -> list[str]:
    return ["corpus", "fetch", "--base-url", url, "--email", "t@example.org", "--max-retries", "0",
            "--no-progress", "-o", str(out), *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [text for text in err.splitlines() if text.startswith("clap: error:")]
    return line


def test_fetch_refuses_damaged_stores_before_any_request(eutils_server, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert main(fetch_args(eutils_server.url, a_file)) == 2
    assert "file.txt: exists and is not a folder" in error_line(capsys)

    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "fetch_state.json").write_text("[1, 2]")
    assert main(fetch_args(eutils_server.url, listed)) == 2
    assert "fetch_state.json: checkpoint is not valid (expected an object" in error_line(capsys)

    bad_version = tmp_path / "bad-version"
    bad_version.mkdir()
    lines = '{"pmid": "1", "title": "a"}\n{"pmid": "2", "version": "x"}\n'
    (bad_version / "records.jsonl").write_text(lines)
    assert main(fetch_args(eutils_server.url, bad_version)) == 2
    assert "records.jsonl, line 2: store line is not a record (ValueError" in error_line(capsys)
    assert (bad_version / "records.jsonl").read_text() == lines  # a whole line is never cut off as 'torn'

    assert main(fetch_args(eutils_server.url, tmp_path / "s", "--mindate", "last year")) == 2
    assert "--mindate 'last year' is not a date" in error_line(capsys)
    assert eutils_server.calls == {"esearch": 0, "efetch": 0}
    assert main(fetch_args("http://[::1/", tmp_path / "s")) == 2
    assert "is not a URL" in error_line(capsys)
    assert a_file.read_text() == "mine"


def test_stats_on_damaged_corpus_folders(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"terms": {"eeg": r"\bEEG\b"}}))
    (corpus / "train.jsonl").write_text('{"pmid": "1", "text": "EEG and EEG", "year": 2001}\n{"pmid": "2", "te\n')
    (corpus / "validation.jsonl").write_text('{"pmid": "3", "text": "EEG", "year": "n/a"}\n'
                                             '{"pmid": "4", "text": "no", "year": 2003}\n')
    assert main(["corpus", "stats", str(corpus), "-o", str(tmp_path / "s")]) == 2
    assert "train.jsonl, line 2: bad corpus row" in error_line(capsys)
    assert main(["--quiet", "corpus", "stats", str(corpus), "--skip-bad", "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "2 records" in out  # rows 1 and 4; row 2 is torn, row 3 has no usable year
    by_term = (tmp_path / "s" / "by_term.csv").read_text().splitlines()
    assert by_term[1] == r"eeg,\bEEG\b,1,2"

    (corpus / "manifest.json").write_text("{not json")
    assert main(["corpus", "stats", str(corpus)]) == 2
    assert "manifest.json: not a corpus manifest" in error_line(capsys)


def test_unreadable_input_is_a_clear_error(article_chunks, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.xml"
    chunks = [c for c in article_chunks if b"<AbstractText" in c][:5]
    good.write_bytes(b"<PubmedArticleSet>" + b"".join(chunks) + b"</PubmedArticleSet>")
    locked = tmp_path / "locked.xml"
    locked.write_bytes(good.read_bytes())

    def guarded_open(file, *args, **kwargs):  # tests run as root, so chmod cannot make a file unreadable
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(corpora.sources, "open", guarded_open, raising=False)
    args = ["corpus", "build", str(locked), str(good), "--no-filter", "--no-figure"]
    assert main([*args, "-o", str(tmp_path / "strict")]) == 2
    assert "locked.xml: cannot read (Permission denied)" in error_line(capsys)
    assert not (tmp_path / "strict").exists()
    assert main(["--quiet", *args, "--skip-bad", "-o", str(tmp_path / "lenient")]) == 0
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["report"]["kept"] == 5 and manifest["report"]["bad"] == 1
