"""``alignment: right``: prompts of unequal lengths are patched position by position from the end."""

from __future__ import annotations

import pytest
import torch

from . import reference as ref
from .conftest import small_study
from .reference import hook_logit_diff


# regression (review): right alignment dropped unmatched positions for every operation; it filters only copying
# operations, which need a source token
def test_right_alignment_keeps_zero_ablation_on_unmatched_tokens(tiny_gpt2):
    probe = {"id": "u", "clean": "Valproate treats", "corrupted": "Insulin is what treats", "answer": " seizures",
             "wrong": " pain"}
    tok = tiny_gpt2.tokenizer
    n_clean, n_corrupted = len(tok(probe["clean"])["input_ids"]), len(tok(probe["corrupted"])["input_ids"])
    assert n_corrupted > n_clean
    frame = small_study(tiny_gpt2, probes={"inline": [probe]}, sites=["layers[1].resid_pre"], alignment="right",
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
