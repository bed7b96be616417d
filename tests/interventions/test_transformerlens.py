"""clap's layer x position sweeps equal TransformerLens's ``patching.get_act_patch_*`` on the same GPT-2 weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from interventions.spec import StudySpec
from interventions.study import Study

tl_patching = pytest.importorskip("transformer_lens.patching")

CLEAN = "The capital of France is the city of"
CORRUPTED = "The capital of Spain is the city of"


@pytest.fixture(scope="module")
def bridge(tiny_gpt2, tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)  # the bridge needs a tokenizer that knows its path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the bridge rewires the HF model it wraps: give it its own copy of the same weights
        model = TransformerBridge.boot_transformers(
            str(folder), hf_model=copy.deepcopy(tiny_gpt2.hf), tokenizer=tokenizer
        )
    model.eval()
    return model


def test_bridge_matches_hf_logits(bridge, tiny_gpt2):
    ids = tiny_gpt2.tokenizer(CLEAN, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf_logits = tiny_gpt2.hf(ids).logits
        tl_logits = bridge(ids)
    assert (hf_logits - tl_logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    "tl_function, alias, kind",
    [
        ("get_act_patch_resid_pre", "layers[*].resid_pre", "resid_pre"),
        ("get_act_patch_attn_out", "layers[*].attn_out", "attn_out"),
        ("get_act_patch_mlp_out", "layers[*].mlp_out", "mlp_out"),
    ],
)
def test_layer_position_sweep_equals_transformerlens(bridge, tiny_gpt2, tl_function, alias, kind):
    tok = tiny_gpt2.tokenizer
    clean = tok(CLEAN, return_tensors="pt")["input_ids"]
    corrupted = tok(CORRUPTED, return_tensors="pt")["input_ids"]
    answer = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    wrong = tok(" Madrid", add_special_tokens=False)["input_ids"][0]

    def logit_diff(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        expected = getattr(tl_patching, tl_function)(bridge, corrupted, clean_cache, logit_diff)

    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"},
        "probes": {"inline": [{"id": "p", "clean": CLEAN, "corrupted": CORRUPTED, "answer": " Paris",
                               "wrong": " Madrid"}]},
        "sites": [alias], "positions": ["each"], "metrics": ["logit_diff"], "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    assert set(frame.site_kind) == {kind}
    grid = frame.pivot(index="layer", columns="position", values="patched").sort_index().sort_index(axis=1)
    assert grid.shape == tuple(expected.shape)
    assert torch.tensor(grid.to_numpy(dtype="float64")).float() == pytest.approx(expected.float(), abs=1e-4)
    # and the sweep is not trivially constant: patching matters somewhere
    assert float(expected.max() - expected.min()) > 1e-3


def test_clap_refuses_what_transformerlens_silently_accepts(tiny_gpt2):
    """TransformerLens patches prompts of different lengths position by position without complaint."""
    probe = {"id": "uneven", "clean": "Valproate sodium treats", "corrupted": "Insulin treats", "answer": " seizures",
             "wrong": " pain"}
    n_clean, n_corrupted = (len(tiny_gpt2.tokenizer(probe[k])["input_ids"]) for k in ("clean", "corrupted"))
    assert n_clean != n_corrupted
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": [probe]},
        "sites": ["layers[*].resid_pre"], "positions": ["each"], "metrics": ["logit_diff"],
    })
    with pytest.raises(Exception, match=rf"uneven .*clean {n_clean} tokens, corrupted {n_corrupted}"):
        Study(spec, model=tiny_gpt2).run()


def test_sweep_functions_give_the_transformerlens_grid(bridge, tiny_gpt2):
    from interventions import mlp_out_sweep, to_grid

    tok = tiny_gpt2.tokenizer
    answer = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    wrong = tok(" Madrid", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tok(CLEAN, return_tensors="pt")["input_ids"])
        expected = tl_patching.get_act_patch_mlp_out(
            bridge, tok(CORRUPTED, return_tensors="pt")["input_ids"], cache,
            lambda logits: logits[0, -1, answer] - logits[0, -1, wrong],
        )
    frame = mlp_out_sweep(tiny_gpt2, [{"id": "p", "clean": CLEAN, "corrupted": CORRUPTED, "answer": " Paris",
                                       "wrong": " Madrid"}])
    grid = to_grid(frame)
    assert torch.tensor(grid.to_numpy(dtype="float64")).float() == pytest.approx(expected.float(), abs=1e-4)
