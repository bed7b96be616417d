"""Real pretrained weights offline: SmolLM2-135M-Instruct (Llama architecture) from its GGUF file."""

from __future__ import annotations

import pytest

from clap.models import builtin_gguf_path, convert_gguf, load_model
from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    try:
        builtin_gguf_path("smollm2-135m")
    except Exception as exc:  # the package is installed by `make` with --no-deps
        pytest.skip(str(exc))
    return load_model("smollm2-135m")


def test_gguf_is_converted_once_and_reused(smollm2):
    folder = convert_gguf(builtin_gguf_path("smollm2-135m"))
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert convert_gguf(builtin_gguf_path("smollm2-135m")) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert smollm2.identity["architecture"] == "LlamaForCausalLM" and smollm2.identity["n_layers"] == 30
    assert smollm2.tokenizer.padding_side == "left" and smollm2.tokenizer.pad_token is not None


def test_real_weights_know_the_demo_facts_and_patching_matches_hooks(smollm2):
    probe = {"id": "ep", "clean": "Epilepsy is a disorder of the", "corrupted": "Tachycardia is a disorder of the",
             "answer": " brain", "wrong": " heart"}
    spec = StudySpec.from_dict({
        "model": {"source": "smollm2-135m"}, "probes": {"inline": [probe]},
        "sites": ["layers[0].resid_pre", "layers[12].attn_out", "layers[20].mlp_out", "layers[15].heads[3]"],
        "positions": ["last", "all"], "metrics": ["logit_diff"], "execution": {"progress": False, "remote": "local"},
    })
    frame = Study(spec, model=smollm2).run()
    assert frame.clean.iloc[0] > 3 > frame.corrupted.iloc[0]  # the model knows epilepsy is a brain disorder
    tok = smollm2.tokenizer
    clean, corrupted = tok(probe["clean"])["input_ids"], tok(probe["corrupted"])["input_ids"]
    answer = tok(" brain", add_special_tokens=False)["input_ids"]
    wrong = tok(" heart", add_special_tokens=False)["input_ids"]
    n_heads = smollm2.hf.config.num_attention_heads
    sites = {
        "layers.0.resid_pre": ("model.layers.0", "input", None),
        "layers.12.attn_out": ("model.layers.12.self_attn", "output", None),
        "layers.20.mlp_out": ("model.layers.20.mlp", "output", None),
        "layers.15.heads.3": ("model.layers.15.self_attn.o_proj", "input", 3),
    }
    for name, (path, access, head) in sites.items():
        act = ref.capture(smollm2.hf, clean, path, access)
        for label, positions in (("last", [len(corrupted) - 1]), ("all", list(range(len(corrupted))))):
            values = ref.source_values(act, positions, head, n_heads if head is not None else None)
            edit = ref.replace_edit(values, positions, head, n_heads if head is not None else None)
            logits = ref.run(smollm2.hf, corrupted, [(path, access, edit)])
            expected = float(logits[answer].mean() - logits[wrong].mean())
            row = frame[(frame.site == name) & (frame.positions == label)].iloc[0]
            assert row.patched == pytest.approx(expected, abs=1e-4), (name, label)
