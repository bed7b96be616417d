"""The NCBI API key never reaches the terminal, the logs, an exception or a file, whatever the server sends back."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from clap.app.cli import main
from corpora.errors import EutilsError
from corpora.eutils import EutilsClient
from corpora.redaction import Redactor

KEY = "k3y+with/slash="

#: Every spelling of KEY that must not appear anywhere (computed here, not by the module under test).
LEAKS = sorted({
    KEY,
    "k3y%2Bwith%2Fslash%3D",          # form/URL encoding, as requests sends it
    "k3y%2bwith%2fslash%3d",          # the same with lower-case escapes
    "k3y with/slash=",                # '+' decoded as a space by a form parser
    "k3y%20with%2Fslash%3D",          # ... and re-encoded with %20
    "k3y+with%2Fslash%3D",            # ... or with '+'
})


def assert_no_key(*texts: str | bytes) -> None:
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        for leak in LEAKS:
            assert leak not in text, f"{leak!r} leaked in {text[:300]!r}"


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fetch_args(server, out: Path, *extra: str) -> list[str]:
    return ["corpus", "fetch", "--base-url", server.url, "--query", "epilepsy", "--limit", "40",
            "--batch-size", "20", "--email", "t@example.org", "--backoff", "0", "--max-retries", "1",
            "--no-progress", "--api-key", KEY, "-o", str(out), *extra]


def test_redactor_knows_every_spelling():
    redact = Redactor([KEY])
    for leak in LEAKS:
        assert redact(f"before {leak} after") == "before *** after"
        assert redact.redact_bytes(f"<{leak}>".encode()) == b"<***>"
    assert redact(quote(quote_plus(KEY), safe="")) == "***"  # encoded twice
    assert redact("k3y with slash") == "k3y with slash"  # only the key itself, not look-alikes
    assert Redactor([None])("k3y+with/slash=") == KEY  # no key: nothing to hide


@pytest.mark.parametrize("fault", ["400key", "errorkey"])
def test_cli_keeps_an_echoed_key_out_of_output_logs_and_files(eutils_server, tmp_path, capsys, caplog, fault):
    eutils_server.faults = {("esearch", 1): fault, ("esearch", 2): fault}
    caplog.set_level(logging.DEBUG)  # urllib3 logs every request line, URL and query included
    out = tmp_path / "store"
    assert main(fetch_args(eutils_server, out)) == 2
    captured = capsys.readouterr()
    assert eutils_server.log[0][1]["api_key"] == KEY  # the server did get (and echo) the key
    assert "clap: error:" in captured.err and "***" in captured.err  # the echo is in the message, masked
    assert "Invalid API key" in captured.err
    assert any("api_key=***" in r.getMessage() for r in caplog.records)  # urllib3's request line, masked
    assert_no_key(captured.out, captured.err, caplog.text, *files_under(out).values())


def test_cli_keeps_the_key_out_of_records_and_checkpoint(eutils_server, tmp_path, capsys, caplog):
    """A successful run whose answers carry the key (here inside a record) stores none of it."""
    eutils_server.key_in_records = True
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "store"
    assert main(fetch_args(eutils_server, out)) == 0
    captured = capsys.readouterr()
    stored = files_under(out)
    assert {"records.jsonl", "fetch_state.json"} <= set(stored)
    assert stored["records.jsonl"].count(b"\n") == 40 and b"Invalid API key: ***" in stored["records.jsonl"]
    assert_no_key(captured.out, captured.err, caplog.text, *stored.values())


def test_connection_error_quoting_the_encoded_url_is_redacted(tmp_path, capsys, caplog):
    """requests quotes the request URL, key URL-encoded, in a failed connection's message."""
    with socket.socket() as sock:  # a loopback port with nobody listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = EutilsClient(f"http://127.0.0.1:{port}/", email="t@example.org", api_key=KEY, max_retries=1,
                          sleep=lambda s: None)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EutilsError) as caught:
        client.esearch("epilepsy")
    message = str(caught.value)
    assert "failed after 2 attempts" in message and "api_key=***" in message
    assert_no_key(message, caplog.text)

    class Server:
        url = f"http://127.0.0.1:{port}/"

    assert main(fetch_args(Server, tmp_path / "store")) == 2
    captured = capsys.readouterr()
    assert "api_key=***" in captured.err
    assert_no_key(captured.out, captured.err, caplog.text, *files_under(tmp_path / "store").values())


#: A key with a quote, a slash and non-ASCII letters: the characters JSON and XML writers escape.
ODD_KEY = 'k3y"кл+/='


def test_redactor_knows_json_escapes_character_references_and_utf16():
    import json
    import xml.etree.ElementTree as ET

    redact = Redactor([ODD_KEY])
    spellings = [
        json.dumps(ODD_KEY)[1:-1],                                   # k3y\"\u043a\u043b+\/= (ASCII JSON)
        json.dumps(ODD_KEY, ensure_ascii=False)[1:-1],               # k3y\"кл+/=
        json.dumps(ODD_KEY)[1:-1].replace("043a", "043A"),          # upper-case hex: \u043A
        "".join(f"&#{ord(c)};" for c in ODD_KEY),                    # decimal references
        "".join(f"&#x{ord(c):x};" for c in ODD_KEY),                 # hex references
        "k&#51;y&quot;&#x43a;л%2B/=",                                # a mixture
    ]
    for spelling in spellings:
        assert redact(f"before {spelling} after") == "before *** after", spelling
        assert redact.redact_bytes(f"<{spelling}>".encode()) == b"<***>", spelling
    for encoding in ("utf-16", "utf-16-le", "utf-16-be"):  # a whole body in UTF-16: still UTF-16 after redaction
        body = f'<?xml version="1.0" encoding="UTF-16"?><e><t>bad key {ODD_KEY}!</t></e>'.encode(encoding)
        cleaned = redact.redact_bytes(body)
        text = cleaned.decode(encoding)
        assert ODD_KEY not in text and "bad key ***!" in text
        if encoding == "utf-16":  # with its byte-order mark, as a server sends it: the parser reads it
            assert ET.fromstring(cleaned).find("t").text == "bad key ***!"
    assert redact("k3y кл") == "k3y кл" and redact("&#107;3y") == "&#107;3y"  # look-alikes stay


def test_parsed_values_are_redacted_after_decoding():
    """A key the bytes did not show (a spelling no pattern foresaw) but the parser decoded: redacted in the parsed
    record, every field, frozen dataclasses too."""
    from corpora.eutils import SearchResult
    from corpora.records import PubmedRecord

    redact = Redactor([ODD_KEY])
    record = PubmedRecord(pmid="1", title=f"t {ODD_KEY}", abstract="a", mesh_terms=[f"m{ODD_KEY}"],
                          keywords=["k"])
    out = redact.value([record])
    assert out[0].title == "t ***" and out[0].mesh_terms == ["m***"] and out[0].abstract == "a"
    search = redact.value(SearchResult(count=3, webenv=f"W{ODD_KEY}", query_key="1"))
    assert search.webenv == "W***" and search.count == 3
    assert redact.value({"x": (ODD_KEY, 1)}) == {"x": ("***", 1)}


def test_a_key_the_xml_parser_decodes_is_not_stored(eutils_server, tmp_path, capsys, caplog):
    """The key inside a record as numeric character references: the raw bytes hold no plain key, the XML parser
    decodes it; records.jsonl must not store it."""
    eutils_server.key_in_records = "ncr"
    out = tmp_path / "store"
    assert main(fetch_args(eutils_server, out)) == 0
    stored = files_under(out)
    assert b"Invalid API key: ***" in stored["records.jsonl"]
    captured = capsys.readouterr()
    assert_no_key(captured.out, captured.err, caplog.text, *stored.values())
