"""``clap corpus build`` / ``stats``: counts on the real files, update semantics, splits, saved formats, tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
from corpus_testutil import ARTICLE, TERM_PATTERNS, reference_fields

from clap.app.cli import main
from corpora.build import BuildConfig, build_corpus
from corpora.errors import CorpusError, CorpusInputError, ProblemLog
from corpora.parse_table import iter_table
from corpora.records import COLUMNS


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(big_files, tmp_path_factory):
    """The two large shared files built once through the command line."""
    out = tmp_path_factory.mktemp("corpus") / "epilepsy"
    code = main(["--quiet", "corpus", "build", *map(str, big_files), "-o", str(out)])
    assert code == 0
    return out


def test_big_files_corpus_matches_independent_count(built, big_files_truth, capsys):
    manifest = json.loads((built / "manifest.json").read_text())
    report = manifest["report"]
    assert report["read"] == big_files_truth["read"] == 50788
    assert report["unique"] == big_files_truth["distinct"]
    assert report["deletions_listed"] == big_files_truth["deletions_listed"] == 20
    truth = big_files_truth["corpus"]
    assert report["kept"] == len(truth) and 450 < len(truth) < 530  # the data README: "roughly 490"
    rows = read_jsonl(built / "train.jsonl") + read_jsonl(built / "validation.jsonl")
    assert sorted(r["pmid"] for r in rows) == sorted(truth)
    assert {r["pmid"]: r["text"] for r in rows} == truth
    assert report["seconds"] < 60
    by_term = pd.read_csv(built / "stats" / "by_term.csv")
    assert dict(zip(by_term.term, by_term.mentions, strict=True)) == big_files_truth["mentions"]
    assert dict(zip(by_term.term, by_term.records, strict=True)) == big_files_truth["records"]


def test_split_is_80_20_grouped_and_seeded(built, big_files_truth):
    train = read_jsonl(built / "train.jsonl")
    validation = read_jsonl(built / "validation.jsonl")
    n = len(big_files_truth["corpus"])
    assert len(validation) == round(0.2 * n) and len(train) == n - len(validation)
    assert not {r["pmid"] for r in train} & {r["pmid"] for r in validation}
    assert [r["pmid"] for r in train] == sorted((r["pmid"] for r in train), key=int)


def test_saved_dataset_round_trips(built):
    dataset = datasets.load_from_disk(str(built / "dataset"))
    assert set(dataset) == {"train", "validation"}
    for split in ("train", "validation"):
        assert dataset[split].column_names == list(COLUMNS)
        assert dataset[split].to_list() == read_jsonl(built / f"{split}.jsonl")
    row = dataset["train"][0]
    assert row["text"] == f"{row['title']}\n\n{row['abstract']}"
    assert row["url"] == f"https://pubmed.ncbi.nlm.nih.gov/{row['pmid']}/"
    assert row["source_file"] in {"pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"}
    assert isinstance(row["year"], int) and isinstance(row["mesh_terms"], list)
    assert dataset["train"].features["year"].dtype == "int32"


def test_stats_command_reports_the_build(built, big_files_truth, capsys, tmp_path):
    assert main(["corpus", "stats", str(built), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(big_files_truth['corpus'])} records" in out
    for term, mentions in big_files_truth["mentions"].items():
        assert re.search(rf"\b{term}\b.*\b{big_files_truth['records'][term]}\s+{mentions}\b", out), term
    assert (tmp_path / "abstracts_per_year.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_year = pd.read_csv(tmp_path / "by_year.csv")
    assert by_year.records.sum() == len(big_files_truth["corpus"])
    rows = read_jsonl(built / "train.jsonl") + read_jsonl(built / "validation.jsonl")
    per_year = pd.Series([r["year"] for r in rows]).value_counts()
    assert dict(zip(by_year.year.astype(int), by_year.records, strict=True)) == per_year.to_dict()


def _write_xml(path: Path, chunks: list[bytes], deletions: list[str] = ()) -> None:
    tail = b""
    if deletions:
        tail = b"<DeleteCitation>" + b"".join(f'<PMID Version="1">{p}</PMID>'.encode() for p in deletions) \
            + b"</DeleteCitation>"
    path.write_bytes(b'<?xml version="1.0"?>\n<PubmedArticleSet>\n' + b"\n".join(chunks) + tail
                     + b"\n</PubmedArticleSet>\n")


def test_updates_deletions_and_versions(article_chunks, tmp_path):
    with_abstract = [c for c in article_chunks if b"<AbstractText" in c][:6]
    a, b, c, d, e, f = with_abstract
    pmid = lambda chunk: reference_fields(chunk)["pmid"]  # noqa: E731
    b_revised = re.sub(rb"<ArticleTitle>.*?</ArticleTitle>", b"<ArticleTitle>Revised title.</ArticleTitle>", b,
                       count=1, flags=re.S)
    e_v2 = re.sub(rb'(<MedlineCitation[^>]*>\s*<PMID) Version="1"', rb'\1 Version="2"', e, count=1)
    e_v1_stale = re.sub(rb"<ArticleTitle>.*?</ArticleTitle>", b"<ArticleTitle>Stale.</ArticleTitle>", e, count=1,
                        flags=re.S)
    _write_xml(tmp_path / "base.xml", [a, b, c, e])
    _write_xml(tmp_path / "update1.xml", [b_revised, d, e_v2], deletions=[pmid(c)])
    _write_xml(tmp_path / "update2.xml", [e_v1_stale, f])
    out = tmp_path / "out"
    report = build_corpus(BuildConfig(
        inputs=[tmp_path / "base.xml", tmp_path / "update1.xml", tmp_path / "update2.xml"], out=out,
        filter_terms=False, figure=False))
    rows = {r["pmid"]: r for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")}
    assert set(rows) == {pmid(x) for x in (a, b, d, e, f)}  # c deleted
    assert rows[pmid(b)]["title"] == "Revised title."  # later copy wins
    assert rows[pmid(e)]["title"] == reference_fields(e)["title"]  # version 2 beats a later version 1
    assert (report.read, report.deletions, report.replaced, report.superseded) == (9, 1, 2, 1)


def test_deleted_then_readded(article_chunks, tmp_path):
    a = next(c for c in article_chunks if b"<AbstractText" in c)
    _write_xml(tmp_path / "1.xml", [a])
    _write_xml(tmp_path / "2.xml", [], deletions=[reference_fields(a)["pmid"]])
    _write_xml(tmp_path / "3.xml", [a])
    with pytest.raises(CorpusError, match="no record left"):
        build_corpus(BuildConfig(inputs=[tmp_path / "1.xml", tmp_path / "2.xml"], out=tmp_path / "out",
                                 filter_terms=False, figure=False))
    report = build_corpus(BuildConfig(inputs=[tmp_path / "1.xml", tmp_path / "2.xml", tmp_path / "3.xml"],
                                      out=tmp_path / "out2", filter_terms=False, figure=False,
                                      validation_fraction=0.0))
    assert report.kept == 1


# -- tables and Hugging Face datasets ---------------------------------------------------------------------------


@pytest.fixture
def seed_table(pubmed_dir) -> pd.DataFrame:
    """The seed spreadsheet's columns filled from the real efetch samples (fields read by regex)."""
    rows = []
    for path in sorted((pubmed_dir / "efetch-xml").glob("*.xml")):
        for chunk in ARTICLE.findall(path.read_bytes()):
            f = reference_fields(chunk)
            journal = re.search(rb"<Title>(.*?)</Title>", chunk).group(1).decode()
            rows.append({"PMID": int(f["pmid"]), "Title": f["title"], "Abstract": f["abstract"], "Journal": journal,
                         "Keywords": "; ".join(f["keywords"]), "URL": f"https://pubmed.ncbi.nlm.nih.gov/{f['pmid']}/"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".xlsx"])
def test_tables_with_seed_columns(seed_table, tmp_path, suffix):
    path = tmp_path / f"seed{suffix}"
    if suffix == ".xlsx":
        seed_table.to_excel(path, index=False)
    else:
        seed_table.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    got = list(iter_table(path))
    assert [r.pmid for r in got] == [str(p) for p in seed_table.PMID]
    assert [r.abstract for r in got] == list(seed_table.Abstract.fillna(""))
    assert [r.title for r in got] == list(seed_table.Title)
    assert [r.journal for r in got] == list(seed_table.Journal)
    assert [r.keywords for r in got] == [k.split("; ") if k else [] for k in seed_table.Keywords]


def test_table_without_abstract_column(seed_table, tmp_path):
    path = tmp_path / "export.csv"
    seed_table.rename(columns={"Abstract": "Summary"}).to_csv(path, index=False)
    with pytest.raises(CorpusInputError, match=r"export\.csv, line 1: table has no Abstract column "
                                               r"\(columns: PMID, Title, Summary, Journal, Keywords, URL"):
        list(iter_table(path))
    xlsx = tmp_path / "export.xlsx"
    seed_table.drop(columns="Abstract").to_excel(xlsx, index=False)
    with pytest.raises(CorpusInputError, match=r"export\.xlsx, line 1: table has no Abstract column"):
        list(iter_table(xlsx))


def test_table_bad_row_names_its_line(seed_table, tmp_path):
    table = seed_table.astype({"PMID": str})
    table.loc[2, "PMID"] = "n/a"
    path = tmp_path / "seed.csv"
    table.to_csv(path, index=False)
    text = path.read_text()
    bad_line = text[: text.index("\nn/a,")].count("\n") + 2
    with pytest.raises(CorpusInputError, match=rf"seed\.csv, line {bad_line}: PMID is 'n/a', expected digits"):
        list(iter_table(path))
    problems = ProblemLog(skip_bad=True)
    assert len(list(iter_table(path, problems=problems))) == len(table) - 1
    assert [p.line for p in problems] == [bad_line]


def test_hf_dataset_and_table_load_through_the_same_path(seed_table, tmp_path):
    csv_path = tmp_path / "seed.csv"
    seed_table.to_csv(csv_path, index=False)
    hf_path = tmp_path / "hf"
    datasets.Dataset.from_pandas(seed_table).save_to_disk(str(hf_path))
    for name, args in (("from_csv", [str(csv_path)]), ("from_hf", ["--hf-dataset", str(hf_path)])):
        assert main(["--quiet", "corpus", "build", *args, "--no-filter", "--no-figure",
                     "-o", str(tmp_path / name)]) == 0
    a = read_jsonl(tmp_path / "from_csv" / "train.jsonl") + read_jsonl(tmp_path / "from_csv" / "validation.jsonl")
    b = read_jsonl(tmp_path / "from_hf" / "train.jsonl") + read_jsonl(tmp_path / "from_hf" / "validation.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source_file"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert len(a) == int((seed_table.Abstract.str.len() > 0).sum())


def test_seed_hub_dataset_offline_gives_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["corpus", "build", "--hf-dataset", "nubahador/Retrieved_Data_from_PubMed", "-o", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "clap: error: Hugging Face dataset 'nubahador/Retrieved_Data_from_PubMed' could not be loaded" in err


def test_skip_bad_through_the_command_line(pubmed_dir, tmp_path, capsys):
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    no_abstract = tmp_path / "table.csv"
    no_abstract.write_text("PMID,Title\n1,A title\n")
    args = ["corpus", "build", str(empty), str(pubmed_dir / "medline16n0902.xml.gz"), str(no_abstract),
            "--no-filter", "--no-figure"]
    assert main([*args, "-o", str(tmp_path / "strict")]) == 2
    assert "clap: error: " in capsys.readouterr().err
    assert main(["--quiet", *args, "--skip-bad", "-o", str(tmp_path / "lenient")]) == 0
    bad = read_jsonl(tmp_path / "lenient" / "bad_records.jsonl")
    assert [Path(b["source"]).name for b in bad] == ["empty.xml", "table.csv"]
    raw = __import__("gzip").open(pubmed_dir / "medline16n0902.xml.gz").read()
    citations = re.findall(rb"<MedlineCitation .*?</MedlineCitation>", raw, re.S)
    with_abstract = sum(bool(reference_fields(c)["abstract"]) for c in citations)
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["report"]["kept"] == with_abstract
    assert manifest["report"]["bad"] == 2


def test_custom_terms_and_output_guard(pubmed_dir, tmp_path, capsys):
    raw = __import__("gzip").open(pubmed_dir / "medline16n0902.xml.gz").read()
    texts = [f"{f['title']}\n\n{f['abstract']}" for f in map(reference_fields,
             re.findall(rb"<MedlineCitation .*?</MedlineCitation>", raw, re.S)) if f["abstract"]]
    expected = sum(bool(re.search(r"\bmismatch negativity\b|\bMMN\b", t, re.I)) for t in texts)
    assert expected > 0
    out = tmp_path / "mmn"
    assert main(["--quiet", "corpus", "build", str(pubmed_dir / "medline16n0902.xml.gz"), "--no-figure",
                 "--term", r"mmn=\bmismatch negativity\b|\bMMN\b", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["report"]["kept"] == expected and manifest["terms"] == {"mmn": r"\bmismatch negativity\b|\bMMN\b"}
    # rebuilding into a corpus folder is fine; into some other non-empty folder is refused
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["corpus", "build", str(pubmed_dir / "medline16n0902.xml.gz"), "-o", str(other)]) == 2
    assert "not a built corpus" in capsys.readouterr().err
    assert main(["corpus", "build", str(pubmed_dir / "medline16n0902.xml.gz"), "--term", "(unclosed",
                 "-o", str(tmp_path / "x")]) == 2
    assert "invalid regular expression" in capsys.readouterr().err


def test_default_terms_are_the_documented_ones():
    from corpora.filtering import DEFAULT_TERMS, TermFilter

    assert DEFAULT_TERMS == TERM_PATTERNS
    found = TermFilter(DEFAULT_TERMS).matches(
        "Epileptic seizures and a seizure on EEG; EEGs of epilepsy; anticonvulsant and anti-epileptic drugs; "
        "antiepileptics. No match: epileptogenic, electroencephalogram, seizured.")
    assert found == {"epilepsy": 3, "seizure": 2, "EEG": 2, "anticonvulsant": 1, "antiepileptic": 2}


def test_corpus_without_subcommand_prints_help(capsys):
    assert main(["corpus"]) == 2
    out = capsys.readouterr().out
    assert "fetch" in out and "build" in out and "stats" in out
