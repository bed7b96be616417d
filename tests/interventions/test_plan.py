"""Packing cells into forward passes: a head site and a whole-width site of the same module access share a batch;
a memory budget splits a study into many passes with the same numbers (a YAML probe file on the way)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from interventions.results import read_results
from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES, small_study
from .reference import hook_logit_diff


# regression (review): head and whole-width patches at one module access were not kept apart in a batch
@pytest.mark.parametrize("operation", ["replace", "zero"])
def test_head_site_and_raw_input_of_the_same_projection_share_a_batch(tiny_gpt2, operation):
    frame = small_study(tiny_gpt2, sites=["layers[1].heads[2]", "transformer.h.1.attn.c_proj:input"],
                        positions=["last"], operations=[operation]).run()
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


def test_yaml_probe_file_and_memory_budget_chunking(tmp_path, tiny_gpt2):
    import yaml

    probes = tmp_path / "probes.yaml"
    probes.write_text(yaml.safe_dump({"probes": PROBES}, sort_keys=False))
    base = {"model": {"source": "m"}, "probes": {"file": str(probes)}, "sites": ["layers[*].resid_pre"],
            "positions": ["each"], "metrics": ["logit_diff"]}
    one_pass = Study(StudySpec.from_dict({**base, "execution": {"max_rows": 500, "progress": False}}), model=tiny_gpt2)
    reference = one_pass.run(tmp_path / "one")
    # a budget of 0.5 MB allows only a few rows per pass (logits of 7 tokens x the vocabulary, activations of 3
    # layers): many passes, same numbers
    budget = Study(StudySpec.from_dict({**base, "execution": {"memory_budget_mb": 0.5, "progress": False}}),
                   model=tiny_gpt2)
    chunked = budget.run(tmp_path / "budget")
    _, sidecar = read_results(tmp_path / "budget")
    _, single = read_results(tmp_path / "one")
    assert single["n_batches"] == 1 and sidecar["n_batches"] > 5 and sidecar["max_rows"] < 10
    pd.testing.assert_frame_equal(chunked.drop(columns="recovery"), reference.drop(columns="recovery"), atol=1e-5)
    # recovery = (patched - corrupted) / (clean - corrupted), where the denominator is small for random weights: the
    # 1e-5 allowed on those values, divided by it
    np.testing.assert_array_equal(chunked.recovery.isna(), reference.recovery.isna())
    tolerance = 2e-5 / (reference.clean - reference.corrupted).abs() + 1e-4 * reference.recovery.abs()
    assert ((chunked.recovery - reference.recovery).abs().dropna() <= tolerance.dropna()).all()
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes:\n  - id: a\n    clean: x y\n    corupted: x z\n    answer: ' z'\n")
    with pytest.raises(Exception, match=rf"{bad}:4: corupted: unknown field 'corupted'; did you mean 'corrupted'"):
        Study(StudySpec.from_dict({**base, "probes": {"file": str(bad)}}), model=tiny_gpt2).run()
