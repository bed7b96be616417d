"""Applying patches inside one forward pass: a patched module input is a copy, so other readers of the same tensor
(q/k/v projections, a norm reading the residual stream) see the unpatched value."""

from __future__ import annotations

import pytest

from . import reference as ref
from .conftest import PROBES, small_study
from .reference import hook_logit_diff


# regression (review): patches were written into the live tensor, so every other reader of a shared input saw them;
# now a copy is patched and assigned back
@pytest.mark.parametrize("module", ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                                    "model.layers.0.input_layernorm"])
def test_patching_a_shared_input_changes_only_that_module(tiny_llama, module):
    frame = small_study(tiny_llama, sites=[f"{module}:input"], positions=["all"]).run()
    for probe in PROBES[:2]:
        def patches(clean, corrupted):
            positions = list(range(len(corrupted)))
            values = ref.source_values(ref.capture(tiny_llama.hf, clean, module, "input"), positions, None, None)
            return [(module, "input", ref.replace_edit(values, positions, None, None))]
        row = frame[frame.probe_id == probe["id"]].iloc[0]
        assert row.patched == pytest.approx(hook_logit_diff(tiny_llama, probe, patches), abs=1e-4)
