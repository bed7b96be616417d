"""interventions.alignment: the right-alignment arithmetic every layer of the engine uses, checked against a
direct construction (pad each prompt on the left by hand and look the tokens up)."""

from __future__ import annotations

import torch

from interventions.alignment import aligned_pairs, column, counterpart, left_pad, shift_to, unpad


def test_columns_and_counterparts_match_a_hand_padded_batch():
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31]]
    ids, mask = left_pad(prompts, pad_id=0)
    width = 5
    by_hand = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 21, 22, 23], [0, 0, 0, 0, 31]])
    assert torch.equal(ids, by_hand) and torch.equal(mask, (by_hand != 0).long())
    for row, prompt in enumerate(prompts):
        for i, token in enumerate(prompt):
            assert ids[row, column(i, len(prompt), width)] == token
        assert torch.equal(unpad(ids, row, len(prompt)), torch.tensor(prompt))
    # the last token of every prompt is aligned with the last of every other
    assert counterpart(4, 5, 3) == 2 and counterpart(0, 5, 3) == -2
    assert aligned_pairs(range(5), 5, 3) == [(2, 0), (3, 1), (4, 2)]
    assert aligned_pairs([0, 4], 5, 3, keep_unmatched=True) == [(0, -2), (4, 2)]
    assert shift_to([0, 1, 2], 3, 5) == (2, 3, 4) and shift_to([0, 1, 4], 5, 3) == (2,)
