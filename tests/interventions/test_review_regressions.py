"""Regression tests for engine bugs found in review, each against the plain-hook reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clap.errors import ClapError
from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES


def study(model, **overrides):
    data = {"model": {"source": "m"}, "probes": {"inline": PROBES[:2]}, "metrics": ["logit_diff"],
            "execution": {"progress": False, "remote": "local"}}
    data.update(overrides)
    return Study(StudySpec.from_dict(data), model=model)


def ids(model, probe):
    tok = model.tokenizer
    return (tok(probe["clean"])["input_ids"], tok(probe["corrupted"])["input_ids"],
            tok(probe["answer"], add_special_tokens=False)["input_ids"],
            tok(probe["wrong"], add_special_tokens=False)["input_ids"])


def hook_logit_diff(model, probe, patches_for):
    """Reference: patches_for(clean_ids) -> [(path, access, edit)] applied to the corrupted prompt."""
    clean, corrupted, answer, wrong = ids(model, probe)
    logits = ref.run(model.hf, corrupted, patches_for(clean, corrupted))
    return float(logits[answer].mean() - logits[wrong].mean())


@pytest.mark.parametrize("operation", ["replace", "zero"])
def test_head_site_and_raw_input_of_the_same_projection_share_a_batch(tiny_gpt2, operation):
    frame = study(tiny_gpt2, sites=["layers[1].heads[2]", "transformer.h.1.attn.c_proj:input"], positions=["last"],
                  operations=[operation]).run()
    path = "transformer.h.1.attn.c_proj"
    for probe in PROBES[:2]:
        for site, head in (("layers.1.heads.2", 2), (f"{path}:input", None)):
            def patches(clean, corrupted, head=head):
                last = [len(corrupted) - 1]
                if operation == "replace":
                    values = ref.source_values(ref.capture(tiny_gpt2.hf, clean, path, "input"), last, head, 4)
                else:
                    values = torch.zeros(1, 16 if head is not None else 64)
                return [(path, "input", ref.replace_edit(values, last, head, 4))]
            row = frame[(frame.probe_id == probe["id"]) & (frame.site == site)].iloc[0]
            assert row.patched == pytest.approx(hook_logit_diff(tiny_gpt2, probe, patches), abs=1e-4), site


@pytest.mark.parametrize("module", ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                                    "model.layers.0.input_layernorm"])
def test_patching_a_shared_input_changes_only_that_module(tiny_llama, module):
    frame = study(tiny_llama, sites=[f"{module}:input"], positions=["all"]).run()
    for probe in PROBES[:2]:
        def patches(clean, corrupted):
            positions = list(range(len(corrupted)))
            values = ref.source_values(ref.capture(tiny_llama.hf, clean, module, "input"), positions, None, None)
            return [(module, "input", ref.replace_edit(values, positions, None, None))]
        row = frame[frame.probe_id == probe["id"]].iloc[0]
        assert row.patched == pytest.approx(hook_logit_diff(tiny_llama, probe, patches), abs=1e-4)


def test_resume_never_mixes_weights_and_ignores_progress_setting(tmp_path, tiny_gpt2, batches):
    from clap.models import wrap

    spec = {"sites": ["layers[*].resid_pre"], "positions": ["each"],
            "execution": {"max_rows": 10, "progress": False}}
    batches.reset(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        study(tiny_gpt2, **spec).run(tmp_path)
    batches.reset()
    other = copy.deepcopy(tiny_gpt2.hf)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)  # tied to the embeddings: different weights throughout
    other_model = wrap(other, tiny_gpt2.tokenizer)
    mixed = study(other_model, **spec).run(tmp_path)
    fresh = study(other_model, **spec).run()
    np.testing.assert_allclose(mixed.patched.to_numpy(), fresh.patched.to_numpy(), atol=1e-6)
    # same weights, only the progress bar switched on: the finished batch is reused
    batches.reset(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        study(tiny_gpt2, **spec).run(tmp_path / "again")
    batches.reset()
    study(tiny_gpt2, **{**spec, "execution": {"max_rows": 10, "progress": True}}).run(tmp_path / "again")
    assert 0 not in batches.calls


def test_right_alignment_keeps_zero_ablation_on_unmatched_tokens(tiny_gpt2):
    probe = {"id": "u", "clean": "Valproate treats", "corrupted": "Insulin is what treats", "answer": " seizures",
             "wrong": " pain"}
    tok = tiny_gpt2.tokenizer
    n_clean, n_corrupted = len(tok(probe["clean"])["input_ids"]), len(tok(probe["corrupted"])["input_ids"])
    assert n_corrupted > n_clean
    frame = study(tiny_gpt2, probes={"inline": [probe]}, sites=["layers[1].resid_pre"], alignment="right",
                  positions=[0, "all"], operations=["zero", "replace"]).run()
    zero_first = frame[(frame.operation == "zero") & (frame.positions == "0")].iloc[0]
    assert zero_first.n_patched_tokens == 1 and zero_first.position == 0
    zero_all = frame[(frame.operation == "zero") & (frame.positions == "all")].iloc[0]
    assert zero_all.n_patched_tokens == n_corrupted
    # replace has no source token for position 0: that cell is not run rather than reported as "no effect"
    assert frame[(frame.operation == "replace") & (frame.positions == "0")].empty
    assert frame[(frame.operation == "replace") & (frame.positions == "all")].iloc[0].n_patched_tokens == n_clean

    def patches(clean, corrupted):
        return [("transformer.h.1", "input", ref.replace_edit(torch.zeros(1, 64), [0], None, None))]
    assert zero_first.patched == pytest.approx(hook_logit_diff(tiny_gpt2, probe, patches), abs=1e-4)


def test_aliases_refuse_input_suffix(tiny_gpt2):
    for address in ("embed:input", "unembed:input", "layers[1].mlp:input"):
        with pytest.raises(ClapError, match="`:input` applies to real module names"):
            study(tiny_gpt2, sites=[address]).run()


def test_raw_final_modules_are_flagged_trivial(tiny_llama):
    frame = study(tiny_llama, sites=["lm_head:input", "model.norm:input", "model.layers.2"], positions=["last"]).run()
    assert frame.trivial.all()
    np.testing.assert_allclose(frame.recovery.to_numpy(), 1.0, atol=1e-4)


def test_logprob_does_not_underflow(tiny_gpt2):
    sharp = copy.deepcopy(tiny_gpt2.hf)
    sharp.lm_head.weight = torch.nn.Parameter(sharp.lm_head.weight.detach().clone() * 400)
    from clap.models import wrap

    model = wrap(sharp, tiny_gpt2.tokenizer)
    frame = study(model, sites=["layers[0].mlp_out"], positions=["last"], metrics=["logprob"]).run()
    for probe in PROBES[:2]:
        clean, corrupted, answer, _ = ids(model, probe)
        logits = ref.run(sharp, corrupted).double()
        expected = float(torch.logsumexp(torch.log_softmax(logits, -1)[answer], 0))
        row = frame[frame.probe_id == probe["id"]].iloc[0]
        assert np.isfinite(row.corrupted)
        assert row.corrupted == pytest.approx(expected, rel=1e-4)
