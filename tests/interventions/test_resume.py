"""Interrupted runs resume from their finished batches, never from batches computed with other weights, and
whatever the progress-bar setting."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES, small_study


def test_interrupted_run_resumes_without_redoing_finished_batches(tmp_path, tiny_gpt2, batches):
    spec = StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre", "layers[*].mlp_out"],
        "positions": ["each"], "metrics": ["logit_diff"], "execution": {"max_rows": 10, "progress": False},
    })
    out = tmp_path / "out"
    batches.reset(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        Study(spec, model=tiny_gpt2).run(out)
    finished = sorted((out / ".partial").glob("*/batch-*.parquet"))
    assert len(finished) == 2
    batches.reset()
    resumed = Study(spec, model=tiny_gpt2).run(out)
    assert 0 not in batches.calls and 1 not in batches.calls and batches.calls[0] == 2
    fresh = Study(spec, model=tiny_gpt2).run()
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), fresh.reset_index(drop=True))


# regression (review): resume is keyed on the weights, not on progress/remote settings
def test_resume_never_mixes_weights_and_ignores_progress_setting(tmp_path, tiny_gpt2, batches):
    from clap.models import wrap

    spec = {"sites": ["layers[*].resid_pre"], "positions": ["each"],
            "execution": {"max_rows": 10, "progress": False}}
    batches.reset(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        small_study(tiny_gpt2, **spec).run(tmp_path)
    batches.reset()
    other = copy.deepcopy(tiny_gpt2.hf)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)  # tied to the embeddings: different weights throughout
    other_model = wrap(other, tiny_gpt2.tokenizer)
    mixed = small_study(other_model, **spec).run(tmp_path)
    fresh = small_study(other_model, **spec).run()
    np.testing.assert_allclose(mixed.patched.to_numpy(), fresh.patched.to_numpy(), atol=1e-6)
    # same weights, only the progress bar switched on: the finished batch is reused
    batches.reset(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        small_study(tiny_gpt2, **spec).run(tmp_path / "again")
    batches.reset()
    small_study(tiny_gpt2, **{**spec, "execution": {"max_rows": 10, "progress": True}}).run(tmp_path / "again")
    assert 0 not in batches.calls
