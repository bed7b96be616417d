"""Small pieces: the grouped split, the store's keying and recovery, gzip streaming, format detection."""

from __future__ import annotations

import gzip
import json

import pytest

from corpora.errors import CorpusError, CorpusInputError
from corpora.records import PubmedRecord
from corpora.sources import detect_format, open_binary
from corpora.splitting import split_groups
from corpora.store import RecordStore


def test_split_sizes_and_grouping():
    pmids = [str(p) for p in range(1000, 1100)]
    train, validation = split_groups(pmids + pmids[:30], 0.2, seed=42)  # repeated PMIDs are one group
    assert len(validation) == 20 and len(train) == 80
    assert train | validation == set(pmids) and not train & validation


def test_split_depends_on_seed_not_order():
    pmids = [str(p) for p in range(1, 51)]
    a = split_groups(pmids, 0.2, seed=42)
    assert split_groups(list(reversed(pmids)), 0.2, seed=42) == a
    assert split_groups(pmids, 0.2, seed=7) != a


def test_split_edge_cases():
    assert split_groups(["1"], 0.2) == ({"1"}, set())
    assert split_groups(["1", "2"], 0.2)[1] and split_groups(["1", "2"], 0.2)[0]  # both non-empty
    assert split_groups(["1", "2", "3"], 0.0) == ({"1", "2", "3"}, set())
    with pytest.raises(CorpusError, match="validation fraction"):
        split_groups(["1"], 1.0)


def test_store_keys_by_pmid_and_keeps_higher_versions(tmp_path):
    store = RecordStore(tmp_path)
    assert store.add([PubmedRecord("1", title="a"), PubmedRecord("2", title="b"), PubmedRecord("1", title="dup")]) == 2
    assert store.add([PubmedRecord("2", title="again")]) == 0
    assert store.add([PubmedRecord("2", title="v2", version=2)]) == 1
    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["pmid"], r["title"]) for r in lines] == [("1", "a"), ("2", "b"), ("2", "v2")]
    reopened = RecordStore(tmp_path)
    assert len(reopened) == 2 and reopened.versions == {"1": 1, "2": 2}
    assert [r.title for r in reopened] == ["a", "b", "v2"]


def test_store_refuses_a_corrupt_middle_line(tmp_path):
    RecordStore(tmp_path).add([PubmedRecord("1"), PubmedRecord("2")])
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{oops\n" + lines[1])
    with pytest.raises(CorpusInputError, match=r"records\.jsonl, line 2: store line is not a JSON record"):
        RecordStore(tmp_path)


def test_store_allows_one_writer(tmp_path):
    with RecordStore(tmp_path):
        with pytest.raises(CorpusError, match="another fetch is writing"):
            with RecordStore(tmp_path):
                pass
    with RecordStore(tmp_path):  # released
        pass


def test_concatenated_gzip_members_are_all_read(tmp_path):
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(b"first member\n" * 5000) + gzip.compress(b"second member\n" * 7000))
    with open_binary(path) as fh:
        data = fh.read()
    assert data == b"first member\n" * 5000 + b"second member\n" * 7000


def test_format_detection_by_content(tmp_path, pubmed_dir):
    renamed = tmp_path / "download.bin"
    renamed.write_bytes((pubmed_dir / "medline16n0902.xml.gz").read_bytes())
    assert detect_format(renamed) == "xml"
    nbib = tmp_path / "citations"
    nbib.write_bytes((pubmed_dir / "medline-text" / "pubmed_result1.txt").read_bytes())
    assert detect_format(nbib) == "medline"
    assert detect_format(pubmed_dir / "medline-text" / "pubmed_result1.txt") == "medline"


def test_record_dict_round_trip():
    record = PubmedRecord("42", title="T", abstract="A", journal="J", year=1999, mesh_terms=["M"],
                          keywords=["k"], source_file="f.xml", version=2)
    assert PubmedRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert record.to_row(["epilepsy"])["text"] == "T\n\nA"


def test_store_repairs_a_torn_tail_only_under_the_writer_lock(tmp_path):
    """A torn last line may be another fetch's line in flight: opening the store must not cut it; the writer does."""
    import json

    from corpora.store import RECORDS, RecordStore

    path = tmp_path / RECORDS
    whole = json.dumps({"pmid": "1", "version": 1}) + "\n"
    path.write_text(whole + '{"pmid": "2", "vers')
    reader = RecordStore(tmp_path)
    assert len(reader) == 1 and path.read_text().endswith('"vers')
    with RecordStore(tmp_path) as writer:
        assert len(writer) == 1
        assert path.read_text() == whole


def test_table_pmids_written_as_float_text_are_accepted():
    from corpora.parse_table import _pmid

    assert [_pmid(v) for v in ("600.0", 600.0, "12345", " 77 ")] == ["600", "600", "12345", "77"]
    assert _pmid("600.5") == "600.5"  # not integral: left for the record validation to refuse
