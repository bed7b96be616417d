"""Causal tracing as a new user meets it (issue 21): trace probes without `corrupted`, ROME's token groups checked by
hand, errors that name the probe, field and line, ROME's `hidden`, and the torch thread setting."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from analyses.trace import token_group_table
from clap.contract import BEFORE_SUBJECT, TOKEN_GROUPS
from clap.errors import ClapError
from interventions.probes import token_group, token_groups
from interventions.spec import StudySpec
from interventions.study import Study

TRACE_PROBES = [  # no `corrupted`: a trace never reads it
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "answer": " brain",
     "labels": {"subject": "Epilepsy"}},
    {"id": "fr", "clean": "The capital of France is", "answer": " Paris", "labels": {"subject": " France"}},
]


def trace_study(model, probes, **trace):
    return Study(StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": probes}, "seed": 3,
        "trace": {"samples": 2, "kinds": {"resid_post": 1}, "layers": "0:2", **trace},
        "execution": {"progress": False}}), model=model)


def rome_slices(first_e: int, first_a: int, n: int) -> dict[str, list[int]]:
    """ROME's ``average_causal_effects``: ``scores[first_e]``, ``scores[first_e + 1 : last_e]``, ``scores[last_e]``,
    ``scores[first_a]``, ``scores[first_a + 1 : last_a]``, ``scores[last_a]`` with ``last_e = first_a - 1``,
    ``last_a = n - 1``."""
    last_e, last_a = first_a - 1, n - 1
    return {"first subject": [first_e], "middle subject": list(range(first_e + 1, last_e)), "last subject": [last_e],
            "first subsequent": [first_a], "further": list(range(first_a + 1, last_a)), "last": [last_a]}


@pytest.mark.parametrize(("first", "last", "n"), [(0, 0, 7), (3, 3, 5), (2, 9, 11), (1, 2, 4), (0, 2, 3 + 4)])
def test_token_groups_are_romes_slices(first, last, n):
    slices = rome_slices(first, last + 1, n)
    for index in range(n):
        expected = tuple(g for g in TOKEN_GROUPS if index in slices[g])
        assert token_groups(index, first, last, n) == expected, index
        assert token_group(index, first, last, n) == ("last" if index == n - 1 else
                                                      expected[0] if expected else BEFORE_SUBJECT)


def test_token_group_table_counts_tokens_as_rome_does():
    """Two probes' effects at one layer, grouped by hand: probe a's one-token subject at 1 is followed directly by
    its last token (2), after a token before the subject (0); probe b's subject is tokens 0-2 of 6."""
    rows = []
    effects = {("a", 0): 0.5, ("a", 1): 0.2, ("a", 2): 0.7,
               ("b", 0): 0.1, ("b", 1): 0.3, ("b", 2): 0.4, ("b", 3): 0.05, ("b", 4): 0.15, ("b", 5): 0.9}
    subjects = {"a": (1, 1, 3), "b": (0, 2, 6)}
    for (probe, position), effect in effects.items():
        first, last, n = subjects[probe]
        rows.append({"probe_id": probe, "position": position, "effect": effect, "metric": "prob",
                     "site_kind": "resid_post", "window": 1, "layer": 0,
                     "token_group": token_group(position, first, last, n)})
    table = token_group_table(pd.DataFrame(rows)).set_index("token_group")
    by_hand = {  # per probe the mean of its tokens in the group, then the mean over the probes that have any
        "first subject": (0.2 + 0.1) / 2,
        "middle subject": 0.3,
        "last subject": (0.2 + 0.4) / 2,  # a's one-token subject is also its last subject token
        "first subsequent": (0.7 + 0.05) / 2,  # a's last token follows its subject directly
        "further": 0.15,  # b's token 4 only: a's token 0 is before its subject, in no group
        "last": (0.7 + 0.9) / 2,
    }
    assert set(table.index) == set(by_hand)
    for group, value in by_hand.items():
        assert table.effect[group] == pytest.approx(value, abs=1e-12), group
    assert table.n_probes.to_dict() == {"first subject": 2, "middle subject": 1, "last subject": 2,
                                        "first subsequent": 2, "further": 1, "last": 2}


def test_trace_probes_need_no_corrupted_prompt_and_a_differing_one_is_warned(tiny_gpt2, caplog):
    frame = trace_study(tiny_gpt2, TRACE_PROBES).run()
    assert set(frame.probe_id) == {"ep", "fr"} and (frame.metric == "prob").all()
    with_corrupted = [dict(TRACE_PROBES[0], corrupted="Migraine is a chronic disorder of the"), TRACE_PROBES[1]]
    with caplog.at_level(logging.WARNING):
        again = trace_study(tiny_gpt2, with_corrupted).run()
    warned = [r.getMessage() for r in caplog.records if "a causal trace ignores it" in r.getMessage()]
    assert len(warned) == 1 and "(ep)" in warned[0]
    assert again.patched.to_numpy() == pytest.approx(frame.patched.to_numpy(), abs=1e-7)  # ignored indeed


def test_a_study_other_than_a_trace_still_needs_corrupted(tiny_gpt2):
    study = Study(StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES},
                                       "sites": ["layers[0].resid_pre"], "metrics": ["prob"],
                                       "execution": {"progress": False}}), model=tiny_gpt2)
    with pytest.raises(ClapError) as caught:
        study.run()
    message = str(caught.value)
    assert "probes.inline[0]: probe ep has no `corrupted` prompt; only a causal trace" in message
    assert "probes.inline[1]: probe fr has no `corrupted` prompt" in message


def test_a_trace_probe_without_its_subject_names_probe_and_field(tiny_gpt2, tmp_path):
    import json

    path = tmp_path / "facts.jsonl"
    records = [{"id": "ep", "clean": TRACE_PROBES[0]["clean"], "answer": " brain", "subject": "Epilepsy"},
               {"id": "fr", "clean": TRACE_PROBES[1]["clean"], "answer": " Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    study = Study(StudySpec.from_dict({"model": {"source": "m"}, "probes": {"file": str(path)},
                                       "trace": {"samples": 2}, "execution": {"progress": False}}), model=tiny_gpt2)
    with pytest.raises(ClapError) as caught:
        study.run()
    message = str(caught.value)
    assert f"{path}:2: probe fr has no `subject` field: a causal trace noises the tokens" in message
    assert "different label keys" not in message


def test_label_fields_that_differ_name_the_probe_and_the_field(tiny_gpt2):
    probes = [{"id": "a", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
               "answer": " Paris", "wrong": " Madrid", "labels": {"knowledge_type": "x"}},
              {"id": "b", "clean": "Valproate treats", "corrupted": "Aspirin treats", "answer": " seizures",
               "wrong": " pain", "labels": {"knowledge_type": "y", "bioasq_id": "q1"}},
              {"id": "c", "clean": "Epilepsy is a chronic disorder of the",
               "corrupted": "Migraine is a chronic disorder of the", "answer": " brain", "wrong": " head",
               "labels": {"knowledge_type": "x"}}]
    study = Study(StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": probes},
                                       "sites": ["layers[0].resid_pre"], "execution": {"progress": False}}),
                  model=tiny_gpt2)
    with pytest.raises(ClapError, match=r"probes.inline\[1\]: probe b carries field\(s\) `bioasq_id`, unlike the 2 "
                                        r"probe\(s\) with fields `knowledge_type`"):
        study.run()


def test_a_wrong_trace_kind_is_reported_at_its_line_with_the_full_path(tmp_path):
    spec = tmp_path / "trace.yaml"
    spec.write_text("model: {source: m}\nprobes: {file: p.jsonl}\ntrace:\n  samples: 2\n  kinds:\n"
                    "    resid_post: 1\n    hiden: 1\n")
    with pytest.raises(ClapError) as caught:
        StudySpec.from_yaml(spec)
    assert f"{spec}:7: trace.kinds.hiden: Input should be" in str(caught.value)


def test_hidden_is_romes_name_for_the_residual_stream():
    spec = StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES},
                                "trace": {"kinds": {"hidden": 1, "mlp_out": 10}}})
    assert spec.trace.kinds == {"resid_post": 1, "mlp_out": 10}
    assert [g.sites for g in spec.patches] == [["layers[*].resid_post"], ["layers[*].mlp_out"]]
    with pytest.raises(ClapError, match="`hidden` is ROME's name for `resid_post`"):
        StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES},
                             "trace": {"kinds": {"hidden": 1, "resid_post": 1}}})


def test_execution_threads_sets_torchs_threads_for_the_run(tiny_gpt2, monkeypatch):
    seen = []
    original = Study._run

    def recording(self, out):
        seen.append(torch.get_num_threads())
        return original(self, out)

    monkeypatch.setattr(Study, "_run", recording)
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    trace_study(tiny_gpt2, TRACE_PROBES).run()
    study = trace_study(tiny_gpt2, TRACE_PROBES)
    study.spec.execution.threads = target
    study.run()
    assert seen == [before, target] and torch.get_num_threads() == before  # restored after the run
    with pytest.raises(ClapError, match="threads"):
        StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES}, "trace": {},
                             "execution": {"threads": 0}})


def test_threads_on_the_command_line_override_the_spec():
    import argparse

    from interventions.cli import overridden_spec

    spec = StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES}, "trace": {},
                                "execution": {"threads": 4}})
    args = argparse.Namespace(remote=None, max_rows=None, device=None, no_progress=False, threads=1)
    assert overridden_spec(spec, args).execution.threads == 1
    with pytest.raises(ClapError, match="--threads must be at least 1"):
        overridden_spec(spec, argparse.Namespace(remote=None, max_rows=None, device=None, no_progress=False, threads=0))


def test_clap_trace_refuses_facts_the_model_does_not_know(tiny_gpt2, tokenizer, tmp_path, capsys):
    """Random weights know no fact: each is named with p(answer) (equal to a plain forward's softmax), its rank and
    the model's top token; `--min-prob 0` counts every fact as known and the trace runs."""
    import json

    from clap.app.cli import main

    model_dir = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    records = [{"id": p["id"], "clean": p["clean"], "answer": p["answer"], **p["labels"]} for p in TRACE_PROBES]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = tmp_path / "trace.yaml"
    spec.write_text(f"model: {{source: {model_dir}}}\nprobes: {{file: facts.jsonl}}\n"
                    "trace: {samples: 2, kinds: {hidden: 1}, layers: '0:1'}\nexecution: {progress: false}\n")
    assert main(["trace", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the model does not know 2 of the facts to trace" in err and "--allow-unknown" in err
    for record in records:
        ids = tokenizer(record["clean"])["input_ids"]
        with torch.no_grad():
            logits = tiny_gpt2.hf(input_ids=torch.tensor([ids])).logits[0, -1]
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"][0]
        p = torch.softmax(logits.double(), -1)[answer].item()
        rank = int((logits > logits[answer]).sum()) + 1
        assert (f"probe {record['id']} ({tmp_path / 'facts.jsonl'}:{records.index(record) + 1}): does not know: "
                f"p(answer [{record['answer']!r}]) = {p:.3g} on the clean prompt (rank {rank},") in err
        assert f"the model's top token is {tokenizer.decode([int(logits.argmax())])!r}" in err
    assert not (tmp_path / "out" / "results.parquet").exists()
    assert main(["trace", str(spec), "-o", str(tmp_path / "out"), "--min-prob", "0", "--probe-figures", "0"]) == 0
    assert (tmp_path / "out" / "results.parquet").is_file()
