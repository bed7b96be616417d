"""`clap probes check`: structural verdicts and logit differences against plain unpadded HF forwards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clap.app.cli import main
from interventions.probe_check import check_probes, structural_checks
from interventions.probes import ProbeError, read_probe_specs
from interventions.spec import ProbeSetSpec
from tests.interventions.conftest import PROBES

#: structurally broken on purpose: unequal lengths, a multi-token answer string, a duplicate id and clean prompt
BROKEN = [
    {"id": "len", "clean": "Epilepsy is a disorder of the", "corrupted": "Tachycardia is a heart disorder of the",
     "answer": " brain", "wrong": " heart", "knowledge_type": "definitional"},
    {"id": "multi", "clean": "Epilepsy is a chronic disorder of the",
     "corrupted": "Eczema is a chronic disorder of the",
     "answer": " central nervous", "wrong": " skin", "knowledge_type": "definitional"},
    {"id": "len", "clean": "Valproate treats", "corrupted": "Aspirin treats",
     "answer": " seizures", "wrong": " pain", "knowledge_type": "associative"},
    {"id": "dup-clean", "clean": "Valproate treats", "corrupted": "Aspirin treats",
     "answer": [" seizures", 1000], "wrong": " pain", "knowledge_type": "associative"},  # an id in any test vocabulary
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def flat(probe: dict) -> dict:
    """A conftest probe with its labels as top-level keys and provenance PMIDs, as the shipped files have them."""
    record = {k: v for k, v in probe.items() if k != "labels"}
    return {**record, **probe["labels"], "pmids": [101, 202]}


def reference_logit_diff(hf, tokenizer, prompt: str, answer, wrong) -> float:
    """Unpadded single-prompt forward; answers as token-id lists; mean over each set."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0, -1]

    def ids_of(value):
        values = value if isinstance(value, list) else [value]
        out = []
        for v in values:
            out += [v] if isinstance(v, int) else tokenizer(v, add_special_tokens=False)["input_ids"]
        return list(dict.fromkeys(out))

    return float(logits[ids_of(answer)].mean() - logits[ids_of(wrong)].mean())


def test_structural_verdicts(tmp_path, tokenizer):
    specs = read_probe_specs(ProbeSetSpec(file=str(write_jsonl(tmp_path / "b.jsonl", BROKEN))), tmp_path)
    checks = {c.origin.rsplit(":", 1)[1]: c for c in structural_checks(specs, tokenizer)}
    first, multi, dup_id, dup_clean = checks["1"], checks["2"], checks["3"], checks["4"]
    assert (first.n_clean, first.n_corrupted) == (len(tokenizer(BROKEN[0]["clean"])["input_ids"]),
                                                  len(tokenizer(BROKEN[0]["corrupted"])["input_ids"]))
    assert not first.equal_length and "clean is" in first.problems[0]
    assert multi.equal_length and multi.answer.kind == "multi" and len(multi.answer.ids) == 2
    assert multi.answer.pieces == [" central", " nervous"] and multi.wrong.kind == "single"
    assert dup_id.problems == [f"duplicate id (first at {first.origin})"]
    assert dup_clean.answer.kind == "set" and dup_clean.answer.ids == [tokenizer(" seizures")["input_ids"][0], 1000]
    assert dup_clean.problems == [f"duplicate clean prompt (first at {dup_id.origin})"]
    assert [c.structural_ok for c in checks.values()] == [False, False, False, False]


def test_logit_diffs_match_unpadded_hf_forward(tmp_path, tokenizer, tiny_gpt2):
    path = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    frame = check_probes(path, tokenizer, tiny_gpt2, min_logit_diff=0.0)
    assert list(frame["id"]) == [p["id"] for p in PROBES]
    for row, probe in zip(frame.itertuples(), PROBES, strict=True):
        for which, column in (("clean", "clean_logit_diff"), ("corrupted", "corrupted_logit_diff")):
            expected = reference_logit_diff(tiny_gpt2.hf, tokenizer, probe[which], probe["answer"], probe["wrong"])
            assert getattr(row, column) == pytest.approx(expected, abs=1e-5)
        assert row.knows == (row.clean_logit_diff > 0)
        assert row.flips == (row.clean_logit_diff > 0 and row.corrupted_logit_diff < 0)
        assert row.valid == (row.structural_ok and row.knows and row.flips)
    # the batch really was padded: prompts of different lengths
    assert frame["n_clean"].nunique() > 1
    assert frame.loc[frame["id"] == "vpa", "answer_kind"].item() == "set"


def test_cli_with_model_writes_csv_and_valid_subset(tmp_path, tokenizer, tiny_gpt2):
    model_dir = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    out, valid = tmp_path / "out" / "check.csv", tmp_path / "valid.jsonl"
    # a threshold between two probes' clean logit differences decides which are "known"
    diffs = sorted(reference_logit_diff(tiny_gpt2.hf, tokenizer, p["clean"], p["answer"], p["wrong"]) for p in PROBES)
    threshold = (diffs[0] + diffs[1]) / 2 if diffs[0] >= 0 else 0.0
    code = main(["probes", "check", str(path), "--model", str(model_dir), "-o", str(out), "--write-valid", str(valid),
                 "--min-logit-diff", str(threshold)])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [p["id"] for p in PROBES]
    for row, probe in zip(rows, PROBES, strict=True):
        clean = reference_logit_diff(tiny_gpt2.hf, tokenizer, probe["clean"], probe["answer"], probe["wrong"])
        corrupted = reference_logit_diff(tiny_gpt2.hf, tokenizer, probe["corrupted"], probe["answer"], probe["wrong"])
        assert float(row["clean_logit_diff"]) == pytest.approx(clean, abs=1e-5)
        assert row["valid"] == str(clean > threshold and corrupted < 0 and clean > 0)
    kept = [json.loads(line) for line in valid.read_text().splitlines()]
    assert [k["id"] for k in kept] == [r["id"] for r in rows if r["valid"] == "True"]
    assert all(k["pmids"] == [101, 202] for k in kept)  # source records are written whole


def test_cli_structural_only_needs_only_tokenizer_files(tmp_path, tokenizer, capsys, monkeypatch):
    folder = tmp_path / "bpe"  # only the GPT-2 BPE files, vocab.json + merges.txt: no config, no weights
    folder.mkdir()
    assert sorted(Path(f).name for f in tokenizer.backend_tokenizer.model.save(str(folder))) == ["merges.txt",
                                                                                                 "vocab.json"]
    write_jsonl(tmp_path / "b.jsonl", BROKEN[:2] + [flat(PROBES[0])])
    out, valid = tmp_path / "s.csv", tmp_path / "v.jsonl"
    monkeypatch.chdir(tmp_path)  # a relative probe path, as typed on the command line
    code = main(["probes", "check", "b.jsonl", "--model", str(folder), "--structural-only",
                 "-o", str(out), "--write-valid", str(valid)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validity unknown: structural checks only (structural ok 1 of 3)" in printed and " valid / " not in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["structural_ok"] for r in rows] == ["False", "False", "True"] and rows[2]["clean_logit_diff"] == ""
    assert [r["valid"] for r in rows] == ["", "", ""]  # validity needs the model: unknown, never True
    # --write-valid keeps the structurally sound probes and says that the model did not check them
    assert [json.loads(line)["id"] for line in valid.read_text().splitlines()] == ["fr"]
    assert "1 probes that pass the structural checks" in printed and "not checked on the model" in printed


def test_cli_bad_probe_file_is_exit_2_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "clean": "x", "corupted": "y", "answer": " b"}\n')
    assert main(["probes", "check", str(bad), "--model", "no/such-model-anywhere"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "corupted" in err and "Traceback" not in err
    assert main(["probes", "check", str(tmp_path / "missing.jsonl"), "--model", "x"]) == 2


def test_list_provenance_is_set_aside_but_misspelt_list_fields_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [flat(PROBES[0])])
    [(origin, spec)] = read_probe_specs(ProbeSetSpec(file=str(path)), tmp_path)
    assert spec.labels == {"knowledge_type": "definitional"} and origin.endswith(":1")
    typo = write_jsonl(tmp_path / "t.jsonl", [{**flat(PROBES[0]), "anwser": [" a", " b"]}])
    with pytest.raises(ProbeError, match="anwser"):
        read_probe_specs(ProbeSetSpec(file=str(typo)), tmp_path)
