"""Input files that are not UTF-8 are refused with one line naming the file, the line and the byte offset of the
first bad byte: `clap patch` exits 2 without a traceback, for the study spec and for probe files alike."""

from __future__ import annotations

import json

import pytest

from clap.app.cli import main
from clap.errors import ClapError
from clap.yamlio import SourceError, load_jsonl, load_yaml

SPEC = """\
name: latin1
model:
  source: {model}
probes:
  file: {probes}
sites: ["layers[0].resid_pre"]
positions: [last]
"""
PROBE = {"id": "a", "clean": "The capital of France is", "corrupted": "The capital of Spain is", "answer": " Paris"}


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-model")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_spec_file_in_latin1_is_a_clear_error(tmp_path, capsys):
    spec = tmp_path / "study.yaml"
    text = SPEC.format(model="gpt2", probes="probes.jsonl").replace("name: latin1", "name: caf\u00e9 study")
    spec.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    code, output = run_cli(capsys, "patch", str(spec), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "Traceback" not in output
    assert f"{spec}:1: not UTF-8 text: byte 0xe9 at byte offset {offset} (line 1, column 10)" in output


@pytest.mark.parametrize("suffix", ["jsonl", "yaml"])
def test_probe_file_in_latin1_is_a_clear_error(tmp_path, capsys, suffix, model_dir):
    probes = tmp_path / f"probes.{suffix}"
    second = {**PROBE, "id": "b", "clean": "Caf\u00e9 is in", "corrupted": "Bar\u00e9 is in"}
    if suffix == "jsonl":
        text = json.dumps(PROBE) + "\n" + json.dumps(second, ensure_ascii=False) + "\n"
        line = 2
    else:
        text = "probes:\n" + "".join(f"  - {json.dumps(p, ensure_ascii=False)}\n" for p in (PROBE, second))
        line = 3
    data = text.encode("latin-1")
    probes.write_bytes(data)
    offset = data.index(b"\xe9")
    column = offset - data.rindex(b"\n", 0, offset)
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC.format(model=model_dir, probes=probes.name), encoding="utf-8")
    code, output = run_cli(capsys, "patch", str(spec), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "Traceback" not in output
    assert (f"{probes}:{line}: not UTF-8 text: byte 0xe9 at byte offset {offset} (line {line}, column {column})"
            in output)


def test_utf8_with_a_byte_order_mark_still_reads(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(PROBE).encode() + b"\n\n" + json.dumps(PROBE).encode())
    assert [number for number, _ in load_jsonl(jsonl)] == [1, 3]
    yml = tmp_path / "p.yaml"
    yml.write_bytes(b"\xef\xbb\xbfa: caf\xc3\xa9\nb: \xff\n")
    with pytest.raises(SourceError,
                       match=r"p.yaml:2: not UTF-8 text: byte 0xff at byte offset 15 \(line 2, column 4\)"):
        load_yaml(yml)


@pytest.fixture(scope="module")
def short_context_gpt2(tokenizer):
    """A tiny GPT-2 with 16 positions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clap.models import wrap

    torch.manual_seed(3)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=len(tokenizer))
    return wrap(GPT2LMHeadModel(config).eval(), tokenizer, {"source": "short-gpt2"})


@pytest.mark.parametrize("which", ["clean", "corrupted"])
def test_prompt_longer_than_the_context_is_refused_naming_probe_and_lengths(short_context_gpt2, tokenizer, which):
    from interventions.spec import StudySpec
    from interventions.study import Study

    long_text = "The history of the city of Paris, the capital of France, goes back more than two thousand years to"
    # only one prompt is too long (right alignment allows unequal lengths)
    long_probe = {"id": "long", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
                  "answer": " the", which: long_text}
    n_tokens = len(tokenizer(long_probe[which])["input_ids"])
    assert n_tokens > 16
    fits = {"id": "fits", "clean": "The capital of France is", "corrupted": "The capital of Spain is", "answer": " the"}
    spec = StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": [fits, long_probe]}, "sites": ["layers[0].resid_pre"],
        "positions": ["last"], "metrics": ["prob"], "alignment": "right", "execution": {"progress": False},
    })
    with pytest.raises(ClapError) as caught:
        Study(spec, model=short_context_gpt2).run()
    assert str(caught.value).splitlines()[:2] == [
        "1 probe problem(s):",
        f"  probe long (probes.inline[1]): its {which} prompt is {n_tokens} tokens, longer than the model's context "
        f"of 16 tokens (max_position_embeddings); shorten it"]
    assert "clap probes check" in str(caught.value)
    # a prompt of exactly the context length runs
    ids = tokenizer(long_text)["input_ids"][:16]
    exact = tokenizer.decode(ids)
    other = exact.replace(" Paris", " Rome")  # a corrupted prompt that differs, or no recovery could be defined
    assert len(tokenizer(exact)["input_ids"]) == len(tokenizer(other)["input_ids"]) == 16 and other != exact
    at_limit = {"id": "at-limit", "clean": exact, "corrupted": other, "answer": " the"}
    # random weights: P(answer) ~ 1/V barely moves between the prompts, its logit does
    frame = Study(StudySpec.from_dict({**spec.model_dump(exclude={"base_dir"}), "probes": {"inline": [at_limit]},
                                       "metrics": ["logit"]}), model=short_context_gpt2).run()
    assert len(frame) == 1


def test_prompt_longer_than_the_context_exits_2_in_the_cli(tmp_path, capsys, short_context_gpt2):
    folder = tmp_path / "model"
    short_context_gpt2.hf.save_pretrained(folder)
    short_context_gpt2.tokenizer.save_pretrained(folder)
    probes = tmp_path / "probes.jsonl"
    long_text = " ".join(["word"] * 20)
    probes.write_text(json.dumps({**PROBE, "id": "wordy", "clean": long_text, "corrupted": long_text}) + "\n")
    spec = tmp_path / "study.yaml"
    spec.write_text(SPEC.format(model=folder, probes=probes.name), encoding="utf-8")
    code, output = run_cli(capsys, "patch", str(spec), "-o", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in output
    assert f"probe wordy ({probes}:1): its clean prompt is 20 tokens, longer than the model's context of 16" in output
