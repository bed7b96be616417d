"""E-utilities acquisition against a real HTTP server on loopback, with injected failures and interruptions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from corpus_testutil import article_pmid

from clap.app.cli import main
from corpora.errors import CorpusError, EutilsError
from corpora.eutils import EutilsClient, RateLimiter
from corpora.fetch import FetchQuery, fetch
from corpora.store import RecordStore

STORE_PMID = re.compile(r'"pmid": "(\d+)"')


def stored_pmids(store: Path) -> list[str]:
    """PMIDs in the store file, read with a regex over its raw text (not through the store class)."""
    return STORE_PMID.findall((store / "records.jsonl").read_text(encoding="utf-8"))


def client_for(server, sleeps: list[float], **kwargs) -> EutilsClient:
    """A client whose backoff sleeps are recorded in ``sleeps`` and whose rate-limit waits are skipped."""
    client = EutilsClient(server.url, email="tests@example.org", sleep=sleeps.append, backoff=0.5, **kwargs)
    client.rate.sleep = lambda seconds: None
    return client


def test_server_fixture_is_built_from_real_records(eutils_server):
    pmids = [article_pmid(a) for a in eutils_server.articles]
    assert len(pmids) == 500
    assert len(set(pmids)) == 500
    assert pmids[:2] == ["12091962", "9997"]  # first records of efetch-xml/pubmed1.xml


def test_fetch_survives_429_500_drop_and_truncation(eutils_server, tmp_path, sleeps):
    eutils_server.faults = {
        ("esearch", 1): "500",
        ("efetch", 1): "429",
        ("efetch", 3): "500",
        ("efetch", 4): "drop",
        ("efetch", 6): "truncate",
        ("efetch", 8): "short",
        ("efetch", 9): "429",
    }
    client = client_for(eutils_server, sleeps)
    report = fetch(tmp_path, FetchQuery("epilepsy"), client, batch_size=60, progress=False)

    expected = [article_pmid(a) for a in eutils_server.articles]
    got = stored_pmids(tmp_path)
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got)) == 500
    assert report.added == 500 and report.missing == 0 and report.store_size == 500
    # 9 batches of 60 (the last one 20): every batch asked once more per injected efetch fault
    starts = eutils_server.efetch_starts()
    assert len(starts) == 9 + 6
    assert sorted(set(starts)) == list(range(0, 500, 60))
    # backoff 0.5 s, doubled for a second consecutive failure of the same request:
    # esearch; batch 0 (429); batch 1 (500, drop); batch 2 (truncated); batch 3 (short body, 429)
    assert sleeps == [0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0]


def test_requests_carry_ncbi_identification_and_history(eutils_server, tmp_path, sleeps, monkeypatch):
    monkeypatch.setenv("NCBI_API_KEY", "k3y")
    client = client_for(eutils_server, sleeps, tool="clap-tests")
    fetch(tmp_path, FetchQuery("epilepsy OR seizure", mindate="2019", maxdate="2021", limit=120), client,
          batch_size=100, progress=False)
    (first, search), *fetches = eutils_server.log
    assert first == "esearch"
    assert search["term"] == "epilepsy OR seizure" and search["usehistory"] == "y"
    assert (search["mindate"], search["maxdate"], search["datetype"]) == ("2019", "2021", "pdat")
    for _name, params in eutils_server.log:
        assert params["tool"] == "clap-tests" and params["email"] == "tests@example.org"
        assert params["api_key"] == "k3y" and params["db"] == "pubmed"
    assert [(p["retstart"], p["retmax"], p["WebEnv"], p["query_key"], p.get("rettype")) for _n, p in fetches] == [
        ("0", "100", "MCID_fake_1", "1", None), ("100", "20", "MCID_fake_1", "1", None),
        ("0", "120", "MCID_fake_1", "1", "uilist")]  # the final check against the PMID list
    assert len(stored_pmids(tmp_path)) == 120


def test_rate_limiter_spaces_requests():
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(3.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        limiter.wait()
    assert waits == pytest.approx([1 / 3] * 3)
    now[0] += 5.0  # an idle gap needs no wait
    limiter.wait()
    assert len(waits) == 3


def test_rate_depends_on_api_key(monkeypatch):
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    assert EutilsClient(email="a@b.c").rate.interval == pytest.approx(1 / 3)
    assert EutilsClient(email="a@b.c", api_key="x").rate.interval == pytest.approx(1 / 10)
    # asking for more than NCBI allows is capped
    assert EutilsClient(email="a@b.c", requests_per_second=50).rate.interval == pytest.approx(1 / 3)


def test_interrupted_fetch_resumes_without_duplicates_or_loss(eutils_server, tmp_path, sleeps):
    # batch 3 (efetch calls 3..5) fails every attempt: the run stops after two stored batches
    eutils_server.faults = {("efetch", 3): "500", ("efetch", 4): "drop", ("efetch", 5): "500"}
    client = client_for(eutils_server, sleeps, max_retries=2)
    with pytest.raises(EutilsError, match=r"efetch of records 200\.\.299 failed after 3 attempts; "
                                          r"last problem: HTTP 500; .* resume at record 200"):
        fetch(tmp_path, FetchQuery("epilepsy"), client, batch_size=100, progress=False)
    expected = [article_pmid(a) for a in eutils_server.articles]
    assert stored_pmids(tmp_path) == expected[:200]
    state = json.loads((tmp_path / "fetch_state.json").read_text())
    (entry,) = state["searches"].values()
    assert entry["next_retstart"] == 200 and not entry["done"]

    eutils_server.log.clear()
    report = fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps), batch_size=100,
                   progress=False)
    assert eutils_server.efetch_starts() == [200, 300, 400]  # continued, not restarted
    assert report.started_at == 200 and report.added == 300
    got = stored_pmids(tmp_path)
    assert got == expected and len(set(got)) == 500

    # a third run finds nothing left to do: the search and the PMID-list check, no records
    eutils_server.log.clear()
    report = fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps), batch_size=100,
                   progress=False)
    assert [(name, p.get("rettype")) for name, p in eutils_server.log] == [("esearch", None), ("efetch", "uilist")]
    assert report.added == 0 and report.missing == 0


def test_results_reordered_between_runs_are_still_complete(eutils_server, tmp_path, sleeps):
    """Offsets mean other records after a reorder; the PMID-list check fetches what paging skipped."""
    eutils_server.faults = {("efetch", 3): "500", ("efetch", 4): "500"}
    with pytest.raises(EutilsError):
        fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps, max_retries=1), batch_size=100,
              progress=False)
    first_run = set(stored_pmids(tmp_path))
    assert len(first_run) == 200
    eutils_server.articles = eutils_server.articles[::-1]  # same count, new order
    eutils_server.log.clear()
    report = fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps), batch_size=100,
                   progress=False)
    assert eutils_server.efetch_starts() == [200, 300, 400]
    # pages 200..499 of the reversed list are the old records 0..299 (200 of them already stored); the old
    # records 300..499 are now at offsets 0..199, which a resumed run never asks for: fetched by PMID at the end
    skipped = [article_pmid(a) for a in eutils_server.articles[:200]]
    assert not set(skipped) & first_run
    assert sorted(sum(eutils_server.id_fetches(), [])) == sorted(skipped)
    assert report.recovered == 200 and report.missing == 0
    got = stored_pmids(tmp_path)
    assert sorted(got) == sorted(article_pmid(a) for a in eutils_server.articles) and len(got) == len(set(got))


def test_truncated_pmid_list_is_asked_again(eutils_server, tmp_path, sleeps):
    eutils_server.faults = {("efetch", 3): "truncate"}  # pages are calls 1-2, the PMID list call 3
    report = fetch(tmp_path, FetchQuery("eeg", limit=200), client_for(eutils_server, sleeps), batch_size=100,
                   progress=False)
    assert [p.get("rettype") for n, p in eutils_server.log if n == "efetch"] == [None, None, "uilist", "uilist"]
    assert report.missing == 0 and report.recovered == 0 and sleeps == [0.5]


def test_ctrl_c_then_rerun(eutils_server, tmp_path, sleeps):
    """A KeyboardInterrupt during a backoff wait leaves finished batches stored; the rerun completes the rest."""
    eutils_server.faults = {("efetch", 2): "500"}

    def interrupting_sleep(seconds: float) -> None:
        raise KeyboardInterrupt

    client = EutilsClient(eutils_server.url, email="t@example.org", sleep=interrupting_sleep)
    client.rate.sleep = sleeps.append
    with pytest.raises(KeyboardInterrupt):
        fetch(tmp_path, FetchQuery("seizure"), client, batch_size=150, progress=False)
    expected = [article_pmid(a) for a in eutils_server.articles]
    assert stored_pmids(tmp_path) == expected[:150]
    fetch(tmp_path, FetchQuery("seizure"), client_for(eutils_server, sleeps), batch_size=150, progress=False)
    assert stored_pmids(tmp_path) == expected


def test_crash_mid_write_is_repaired(eutils_server, tmp_path, sleeps):
    """A torn last line (power cut while appending) is cut off on reopening and its batch fetched again."""
    fetch(tmp_path, FetchQuery("eeg", limit=100), client_for(eutils_server, sleeps), batch_size=50, progress=False)
    records = tmp_path / "records.jsonl"
    lines = records.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 100
    # simulate: batch 2 was being written (half its last line on disk) and its checkpoint never saved
    records.write_text("".join(lines[:99]) + lines[99][:40], encoding="utf-8")
    state = json.loads((tmp_path / "fetch_state.json").read_text())
    for entry in state["searches"].values():
        entry.update(next_retstart=50, done=False)
    (tmp_path / "fetch_state.json").write_text(json.dumps(state))

    store = RecordStore(tmp_path)
    assert len(store) == 99
    fetch(tmp_path, FetchQuery("eeg", limit=100), client_for(eutils_server, sleeps), batch_size=50, progress=False)
    got = stored_pmids(tmp_path)
    expected = [article_pmid(a) for a in eutils_server.articles[:100]]
    assert got == expected
    assert all(json.loads(line) for line in records.read_text(encoding="utf-8").splitlines())


def test_changed_result_set_restarts_from_zero_without_duplicates(eutils_server, tmp_path, sleeps):
    all_articles = list(eutils_server.articles)
    eutils_server.articles = all_articles[:300]
    eutils_server.faults = {("efetch", 2): "500", ("efetch", 3): "500"}
    with pytest.raises(EutilsError):
        fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps, max_retries=1), batch_size=100,
              progress=False)
    assert len(stored_pmids(tmp_path)) == 100
    eutils_server.articles = all_articles[50:]  # the search now matches a different, larger set
    eutils_server.log.clear()
    fetch(tmp_path, FetchQuery("epilepsy"), client_for(eutils_server, sleeps), batch_size=100, progress=False)
    assert eutils_server.efetch_starts()[0] == 0
    got = stored_pmids(tmp_path)
    expected = {article_pmid(a) for a in all_articles}
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))


def test_expired_history_is_searched_again(eutils_server, tmp_path, sleeps):
    eutils_server.expire_after_efetch = 2
    fetch(tmp_path, FetchQuery("epilepsy", limit=400), client_for(eutils_server, sleeps), batch_size=100,
          progress=False)
    names = [name for name, _ in eutils_server.log]
    assert names.count("esearch") == 2
    assert len(set(stored_pmids(tmp_path))) == 400


def test_read_timeout_is_retried(eutils_server, tmp_path, sleeps):
    eutils_server.faults = {("efetch", 2): "stall"}
    client = client_for(eutils_server, sleeps, timeout=(2.0, 0.25))
    fetch(tmp_path, FetchQuery("epilepsy", limit=90), client, batch_size=30, progress=False)
    assert eutils_server.efetch_starts() == [0, 30, 30, 60]
    assert stored_pmids(tmp_path) == [article_pmid(a) for a in eutils_server.articles[:90]]


def test_client_errors_are_not_retried(eutils_server, sleeps):
    eutils_server.faults = {("esearch", 1): "400"}
    with pytest.raises(EutilsError, match="HTTP 400"):
        client_for(eutils_server, sleeps).esearch("epilepsy")
    assert sleeps == [] and eutils_server.calls["esearch"] == 1


def test_api_key_stays_out_of_error_messages(sleeps):
    import socket

    with socket.socket() as sock:  # a loopback port with nobody listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = EutilsClient(f"http://127.0.0.1:{port}/", email="t@example.org", api_key="s3cret-key",
                          max_retries=1, sleep=sleeps.append)
    with pytest.raises(EutilsError) as caught:
        client.esearch("epilepsy")
    message = str(caught.value)
    assert "failed after 2 attempts" in message and "esearch.fcgi?" in message  # the URL is quoted ...
    assert "s3cret-key" not in message and "api_key=***" in message  # ... without the key


def test_base_url_must_be_http():
    with pytest.raises(CorpusError, match="base URL"):
        EutilsClient("ftp://example.org/", email="a@b.c")


def test_cli_fetch_then_build(eutils_server, tmp_path, capsys):
    eutils_server.faults = {("efetch", 1): "429", ("efetch", 2): "truncate"}
    store = tmp_path / "store"
    code = main(["--quiet", "corpus", "fetch", "--base-url", eutils_server.url, "--query", "epilepsy",
                 "--limit", "60", "--batch-size", "30", "--email", "t@example.org", "--backoff", "0",
                 "--no-progress", "-o", str(store)])
    assert code == 0
    expected = [article_pmid(a) for a in eutils_server.articles[:60]]
    assert stored_pmids(store) == expected
    assert "60 new records" in capsys.readouterr().out
    out = tmp_path / "corpus"
    assert main(["--quiet", "corpus", "build", str(store), "--no-filter", "--no-figure", "-o", str(out)]) == 0
    import datasets
    ds = datasets.load_from_disk(str(out / "dataset"))
    with_abstract = [a for a in eutils_server.articles[:60] if b"<AbstractText" in a]
    assert ds["train"].num_rows + ds["validation"].num_rows == len(with_abstract)


def test_timeout_flag_is_used_and_named_in_the_error(eutils_server, tmp_path, capsys):
    """--timeout sets the read timeout; when every attempt stalls past it, the error says how long it waited."""
    eutils_server.faults = {("esearch", 1): "stall", ("esearch", 2): "stall"}  # each answers after 0.6 s
    args = ["corpus", "fetch", "--base-url", eutils_server.url, "--email", "t@example.org", "--backoff", "0",
            "--max-retries", "1", "--no-progress", "-o", str(tmp_path / "store")]
    assert main([*args, "--timeout", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "esearch of 'epilepsy OR seizure OR EEG' failed after 2 attempts" in err
    assert "no answer within 0.2 s (read timeout" in err and "--timeout" in err
    assert eutils_server.calls["esearch"] == 2
    for bad in ("0", "-1", "nan", "inf"):
        assert main([*args, "--timeout", bad]) == 2
        assert "--timeout must be a positive number of seconds" in capsys.readouterr().err
    assert eutils_server.calls["esearch"] == 2  # refused before any request


def test_timeout_in_the_python_api():
    assert EutilsClient(email="a@b.c").timeout == (10.0, 120.0)
    assert EutilsClient(email="a@b.c", timeout=7.5).timeout == (10.0, 7.5)
    assert EutilsClient(email="a@b.c", timeout=(1, 2)).timeout == (1.0, 2.0)
    for bad in (0, -3.0, float("nan"), (1.0, 0.0), "soon"):
        with pytest.raises(CorpusError, match="timeout must be"):
            EutilsClient(email="a@b.c", timeout=bad)
