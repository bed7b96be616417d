"""`clap probes check --study`: a study's probes under its own rules, on the model(s) it runs.

What must hold: every probe problem `clap patch` raises is named against its probe (and nothing the run accepts is
called a problem); the model's numbers equal the study's own clean and corrupted baselines in results.parquet and a
plain unpadded forward; cross-model studies measure each prompt on the model that runs it; traces, `prob`-only
studies, `alignment: right` and `corrupted_prompt: clean` follow the study's settings; the valid probes written by
`--write-valid` run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from clap.app.cli import main
from clap.models import wrap
from interventions.probe_check import check_study
from interventions.resolved import ResolvedStudy
from interventions.spec import StudySpec
from interventions.study import Study
from tests.interventions.conftest import PROBES
from tests.interventions.test_probe_check import flat, reference_logit_diff, write_jsonl
from tests.interventions.test_probe_check_report import MISMATCH, MULTI, five_problems


def save(model, tokenizer, folder: Path) -> Path:
    model.hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_spec(folder: Path, model: Path, probes: str, extra: str = "") -> Path:
    spec = folder / "study.yaml"
    spec.write_text(f"model: {{source: {model}}}\nprobes: {{file: {probes}}}\nsites: ['layers[0].resid_pre']\n"
                    f"execution: {{progress: false}}\n{extra}")
    return spec


@pytest.fixture
def other_gpt2(tokenizer):
    """A second tiny GPT-2 of the same shape with other weights (the source model of a cross-model study)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(99)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=len(tokenizer))
    config._attn_implementation = "eager"
    return wrap(GPT2LMHeadModel(config).eval(), tokenizer, {"source": "other-gpt2"})


def test_the_run_s_problems_are_named_per_probe_and_the_valid_file_runs(tmp_path, tokenizer, tiny_gpt2, capsys):
    """The five problems `clap patch` refuses, one per probe, and the error points to this command; the probe the
    check passes is the one the study then runs."""
    model = save(tiny_gpt2, tokenizer, tmp_path / "model")
    probes = write_jsonl(tmp_path / "probes.jsonl", five_problems())
    spec = write_spec(tmp_path, model, probes.name, "metrics: [logit_diff]\n")
    assert main(["patch", str(spec), "-o", str(tmp_path / "out")]) == 2
    assert f"clap probes check --study {spec}" in capsys.readouterr().err

    out, valid = tmp_path / "check.csv", tmp_path / "valid.jsonl"
    assert main(["probes", "check", "--study", str(spec), "--structural-only", "-o", str(out),
                 "--write-valid", str(valid)]) == 0
    printed = capsys.readouterr().out
    rows = {int(r["origin"].rsplit(":", 1)[1]): r for r in csv.DictReader(out.open())}
    assert [rows[n]["structural_ok"] for n in range(1, 7)] == ["True"] + ["False"] * 5
    assert "clean is 7 tokens" in rows[2]["problems"] and "corrupted 8" in rows[2]["problems"]
    assert "answer ' central nervous' is 2 tokens" in rows[3]["problems"]
    assert rows[4]["problems"].startswith(f"duplicate id (first at {probes}:1)")
    assert rows[5]["problems"].startswith("no `wrong` answer: the logit difference (metric logit_diff)")
    assert "probe extra carries field(s) `bioasq_id`" in rows[6]["problems"]
    assert "point the study's" not in printed  # structurally sound is not valid: nothing is offered to run
    assert [json.loads(line)["id"] for line in valid.read_text().splitlines()] == ["fr"]

    runnable = write_spec(tmp_path, model, valid.name, "metrics: [logit_diff]\n")
    assert main(["patch", str(runnable), "-o", str(tmp_path / "valid-out")]) == 0


def test_numbers_equal_the_study_s_own_baselines(tmp_path, tokenizer, tiny_gpt2):
    """The check's clean and corrupted logit differences are the run's `clean` and `corrupted` (results.parquet)
    and a plain unpadded forward's; the verdicts follow them."""
    model = save(tiny_gpt2, tokenizer, tmp_path / "model")
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    spec = StudySpec.from_yaml(write_spec(tmp_path, model, probes.name, "metrics: [logit_diff, prob]\n"))
    run = Study(spec, model=tiny_gpt2).run(tmp_path / "out")
    baselines = run[run.metric == "logit_diff"].groupby("probe_id")[["clean", "corrupted"]].first()
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)).set_index("id")
    for probe in PROBES:
        row = frame.loc[probe["id"]]
        assert row.clean_logit_diff == pytest.approx(baselines.clean[probe["id"]], abs=1e-5)
        assert row.corrupted_logit_diff == pytest.approx(baselines.corrupted[probe["id"]], abs=1e-5)
        assert row.clean_logit_diff == pytest.approx(
            reference_logit_diff(tiny_gpt2.hf, tokenizer, probe["clean"], probe["answer"], probe["wrong"]), abs=1e-5)
        assert row.knows == (row.clean_logit_diff > 0)
        assert row.flips == (row.clean_logit_diff > 0 and row.corrupted_logit_diff < 0)
        assert row.valid == (row.knows and row.flips)
    assert frame.attrs["study_problems"] == []


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_cross_model_measures_each_prompt_on_the_model_that_runs_it(tmp_path, tokenizer, tiny_gpt2, other_gpt2,
                                                                     direction):
    """Denoising: the source model runs the clean prompt (the recovery's 1), the target model the corrupted one;
    noising the other way round."""
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name,
                                          f"direction: {direction}\nsource_model: {{source: other}}\n"))
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2, other_gpt2)).set_index("id")
    clean_model, corrupted_model = (other_gpt2, tiny_gpt2) if direction == "denoising" else (tiny_gpt2, other_gpt2)
    for probe in PROBES:
        clean = reference_logit_diff(clean_model.hf, tokenizer, probe["clean"], probe["answer"], probe["wrong"])
        corrupted = reference_logit_diff(corrupted_model.hf, tokenizer, probe["corrupted"], probe["answer"],
                                         probe["wrong"])
        assert frame.clean_logit_diff[probe["id"]] == pytest.approx(clean, abs=1e-5)
        assert frame.corrupted_logit_diff[probe["id"]] == pytest.approx(corrupted, abs=1e-5)
    other = reference_logit_diff(tiny_gpt2.hf, tokenizer, PROBES[0]["clean"], PROBES[0]["answer"], PROBES[0]["wrong"])
    assert abs(other - reference_logit_diff(other_gpt2.hf, tokenizer, PROBES[0]["clean"], PROBES[0]["answer"],
                                            PROBES[0]["wrong"])) > 1e-3  # the two models really differ


def test_a_trace_study_checks_knowledge_by_probability(tmp_path, tokenizer, tiny_gpt2):
    """A trace spec: no corrupted prompt or wrong answer needed, the subject field must be in the clean prompt,
    p(answer) against a plain forward, nothing to flip."""
    records = [{"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "answer": " brain",
                "subject": "Epilepsy"},
               {"id": "sp", "clean": "The capital of Spain is", "answer": " Madrid", "subject": "Portugal"}]
    probes = write_jsonl(tmp_path / "t.jsonl", records)
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "trace: {samples: 2}\n"))
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2), min_prob=0.0).set_index("id")
    assert frame.structural_ok.tolist() == [True, False]
    assert "has subject 'Portugal', which is not in its clean prompt" in frame.problems["sp"]
    with torch.no_grad():
        logits = tiny_gpt2.hf(input_ids=torch.tensor([tokenizer(records[0]["clean"])["input_ids"]])).logits[0, -1]
    answer = tokenizer(" brain", add_special_tokens=False)["input_ids"][0]
    assert frame.p_answer["ep"] == pytest.approx(torch.softmax(logits.double(), -1)[answer].item(), rel=1e-5)
    assert frame.answer_rank["ep"] == int((logits > logits[answer]).sum()) + 1
    assert pd.isna(frame.flips["ep"]) and frame.valid["ep"]


def test_the_study_s_settings_decide_what_is_a_problem(tmp_path, tokenizer, tiny_gpt2):
    """`alignment: right` accepts a length mismatch, `multi_token: set` a multi-token answer, a `prob`-only study a
    probe without `wrong` (checked by p(answer)); a prompt past the model's context is a problem on that model."""
    no_wrong = {k: v for k, v in flat(PROBES[0]).items() if k != "wrong"} | {"id": "nowrong"}
    long = flat(PROBES[1]) | {"id": "long", "clean": "the " * 70 + "end", "corrupted": "a " * 70 + "end"}
    records = [{k: v for k, v in r.items() if k not in ("subject", "pmids")} for r in [MISMATCH, MULTI, no_wrong, long]]
    probes = write_jsonl(tmp_path / "p.jsonl", records)
    strict = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "metrics: [prob]\n"))
    frame = check_study(ResolvedStudy.for_probe_check(strict, tiny_gpt2), min_prob=0.0).set_index("id")
    assert "clean is 7 tokens" in frame.problems["mig"]
    assert "is 2 tokens" in frame.problems["multi"]
    assert frame.structural_ok["nowrong"] and frame.knows["nowrong"] and frame.p_answer["nowrong"] > 0
    assert "longer than the model's context of 64 tokens" in frame.problems["long"]
    with pytest.raises(Exception, match="longer than the model's context"):  # the run refuses it too
        Study(strict, model=tiny_gpt2).run()

    lenient = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "metrics: [prob]\nalignment: right\n"))
    lenient.probes.multi_token = "set"
    frame = check_study(ResolvedStudy.for_probe_check(lenient, tiny_gpt2), min_prob=0.0).set_index("id")
    assert frame.structural_ok["mig"] and frame.structural_ok["multi"]
    assert not frame.problems["mig"].startswith("clean is")
    assert frame.answer_kind["multi"] == "set"


def test_remote_simulation_gives_the_local_numbers(tmp_path, tokenizer, tiny_gpt2):
    """`execution.remote: local` runs the check's forwards through nnsight's simulation of NDIF."""
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    local = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name))
    remote = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name))
    remote.execution.remote = "local"
    a = check_study(ResolvedStudy.for_probe_check(local, tiny_gpt2))
    b = check_study(ResolvedStudy.for_probe_check(remote, tiny_gpt2))
    pd.testing.assert_frame_equal(a, b)


def test_study_settings_are_not_given_twice(tmp_path, capsys):
    spec = write_spec(tmp_path, tmp_path, "p.jsonl")
    assert main(["probes", "check", "--study", str(spec), "--model", "gpt2", "--alignment", "right"]) == 2
    err = capsys.readouterr().err
    assert "--study takes --model, --alignment from the study (model / models, alignment); drop them" in err
    assert main(["probes", "check", "p.jsonl"]) == 2
    assert "give a probe file and --model" in capsys.readouterr().err


def test_a_duplicate_is_named_on_the_copy_not_on_the_first(tmp_path, tokenizer, tiny_gpt2, capsys):
    """The run's "duplicate probe id 'fr' (first at ...:1)" is about line 3; line 1 stays runnable (through the CLI,
    on the model)."""
    model = save(tiny_gpt2, tokenizer, tmp_path / "model")
    records = [flat(PROBES[0]), flat(PROBES[1]), flat(PROBES[0]) | {"clean": "The capital of Spain is",
                                                                   "corrupted": "The capital of France is"}]
    records = [{k: v for k, v in r.items() if k != "pmids"} for r in records]
    probes = write_jsonl(tmp_path / "p.jsonl", records)
    spec = write_spec(tmp_path, model, probes.name)
    out = tmp_path / "c.csv"
    assert main(["probes", "check", "--study", str(spec), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert "duplicate" not in rows[0]["problems"] and rows[0]["structural_ok"] == "True"
    assert rows[2]["problems"].startswith(f"duplicate id (first at {probes}:1)")


def test_what_only_the_study_file_s_design_allows(tmp_path, tokenizer, tiny_gpt2):
    """Two traced subjects in one sentence share a clean prompt (a study runs both); an answer id outside the
    vocabulary is one probe's problem, not a crash; a position the probe cannot resolve is its problem; an empty
    probe set is refused by name."""
    sentence = "Valproate and Aspirin are"
    records = [{"id": "a", "clean": sentence, "answer": " brain", "subject": "Valproate"},
               {"id": "b", "clean": sentence, "answer": " brain", "subject": "Aspirin"},
               {"id": "c", "clean": "Epilepsy is a chronic disorder of the", "answer": 10 ** 6, "subject": "Epilepsy"}]
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, write_jsonl(tmp_path / "t.jsonl", records).name,
                                          "trace: {samples: 1}\n"))
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)).set_index("id")
    assert frame.structural_ok.tolist() == [True, True, False]
    assert "answer token id 1000000 is outside the vocabulary" in frame.problems["c"]

    probes = write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in flat(p).items() if k != "pmids"} for p in PROBES])
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "positions: [{match: capital}]\n"))
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)).set_index("id")
    assert "substring" not in frame.problems["fr"]
    assert frame.problems["ep"].startswith("the study refuses it: probe ep") and \
        "substring 'capital' not found" in frame.problems["ep"]
    assert not frame.valid["ep"] and not frame.valid["vpa"]
    with pytest.raises(Exception, match="substring 'capital' not found"):  # what the run says
        Study(spec, model=tiny_gpt2).run()

    (tmp_path / "empty.yaml").write_text(f"model: {{source: {tmp_path}}}\nprobes: {{inline: []}}\nsites: [embed]\n")
    assert main(["probes", "check", "--study", str(tmp_path / "empty.yaml"), "--structural-only"]) == 2


def test_a_prob_study_checks_the_flip_by_probability(tmp_path, tokenizer, tiny_gpt2):
    """Without `wrong` in a `prob`-only study: knows = the answer is the top token or p >= min_prob on the clean
    prompt, flips = no longer so on the corrupted prompt; both p(answer) against a plain forward."""
    record = {k: v for k, v in flat(PROBES[0]).items() if k not in ("wrong", "pmids")}
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, write_jsonl(tmp_path / "p.jsonl", [record]).name,
                                          "metrics: [prob]\n"))
    answer = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    numbers = {}
    for which in ("clean", "corrupted"):
        with torch.no_grad():
            logits = tiny_gpt2.hf(input_ids=torch.tensor([tokenizer(record[which])["input_ids"]])).logits[0, -1]
        numbers[which] = (torch.softmax(logits.double(), -1)[answer].item(), int((logits > logits[answer]).sum()) + 1)
    for min_prob in (numbers["clean"][0] / 2, 1.0):  # the clean p is above the first, nothing reaches the second
        row = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2), min_prob=min_prob).iloc[0]
        assert row.p_answer == pytest.approx(numbers["clean"][0], rel=1e-5)
        assert row.corrupted_p_answer == pytest.approx(numbers["corrupted"][0], rel=1e-5)
        known = {w: numbers[w][1] == 1 or numbers[w][0] >= min_prob for w in numbers}
        assert (row.knows, row.flips) == (known["clean"], not known["corrupted"])
        assert row.valid == (known["clean"] and not known["corrupted"])


def test_remedies_name_the_study_s_settings(tmp_path, tokenizer, tiny_gpt2):
    records = [{k: v for k, v in r.items() if k not in ("subject", "pmids")} for r in (MISMATCH, MULTI)]
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, write_jsonl(tmp_path / "p.jsonl", records).name))
    frame = check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)).set_index("id")
    assert "or set the study's `alignment: right`" in frame.problems["mig"] and "--alignment" not in \
        frame.problems["mig"]
    assert "set the study's `probes.multi_token: first` or `set`" in frame.problems["multi"]


def test_remote_reaches_nnsight(tmp_path, tokenizer, tiny_gpt2, monkeypatch):
    """The check's traces are given the study's `remote` (here nnsight's local simulation of NDIF)."""
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name))
    spec.execution.remote = "local"
    seen = []
    original = type(tiny_gpt2.nn).trace

    def trace(self, *args, **kwargs):
        seen.append(kwargs.get("remote"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_gpt2.nn), "trace", trace)
    check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2))
    assert seen and set(seen) == {"local"}


def test_a_source_model_of_another_shape_is_refused_as_the_run_refuses_it(tmp_path, tokenizer, tiny_gpt2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=len(tokenizer))
    shallow = wrap(GPT2LMHeadModel(config).eval(), tokenizer, {"source": "shallow"})
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "source_model: {source: other}\n"))
    with pytest.raises(Exception, match="source model's num_hidden_layers is 2, the target model's 3"):
        check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2, shallow))


def test_ndif_is_checked_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """`remote: true`: the key and the hosted model are checked first (as `clap patch` does), never a late failure
    inside nnsight."""
    from clap.errors import ClapError
    from interventions import full_traces

    def refuse(remote, source):
        if remote is True:
            raise ClapError(f"NDIF check refused {source}")

    monkeypatch.setattr(full_traces, "check_remote", refuse)
    probes = write_jsonl(tmp_path / "p.jsonl", [flat(p) for p in PROBES])
    spec = write_spec(tmp_path, "org/hosted-model", probes.name, "")
    spec.write_text(spec.read_text().replace("execution: {progress: false}", "execution: {remote: true}"))
    assert main(["probes", "check", "--study", str(spec)]) == 2
    assert "NDIF check refused org/hosted-model" in capsys.readouterr().err


def test_the_table_keeps_the_corrupted_prompt_where_one_is_measured(tmp_path, tokenizer, tiny_gpt2, capsys):
    """A `prob`-only study's probe without `wrong` still has a corrupted prompt of its own: its length is shown (a
    trace's, the clean prompt again, is not); a column of empty wrong answers is left out."""
    from interventions.probe_table import print_report

    record = {k: v for k, v in flat(PROBES[0]).items() if k not in ("wrong", "pmids")}
    probes = write_jsonl(tmp_path / "p.jsonl", [record])
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, probes.name, "metrics: [prob]\n"))
    print_report(check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)), True, width=200)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "n_corrupted" in header and "wrong_pieces" not in header
    trace = {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "answer": " brain", "subject": "Epilepsy"}
    spec = StudySpec.from_yaml(write_spec(tmp_path, tmp_path, write_jsonl(tmp_path / "t.jsonl", [trace]).name,
                                          "trace: {samples: 1}\n"))
    print_report(check_study(ResolvedStudy.for_probe_check(spec, tiny_gpt2)), True, width=200)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "n_corrupted" not in header and "wrong_pieces" not in header and "p_answer" in header
