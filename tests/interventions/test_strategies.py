"""The suffix strategy (interventions/suffix.py) gives the full strategy's numbers, to 1e-5, on every kind of plan:
all site kinds, positions `each`, windows, combined patches, causal traces (baseline noise + restores), resample,
mean, steer, interpolate, probes of different lengths in one batch, and batch sizes that split batches differently;
on tiny GPT-2 and tiny Llama (grouped-query attention). It also really computes less, runs locally only, and
run.json says what ran."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from clap.errors import ClapError
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES
from .test_compose import TRACE_PROBES

TOL = 1e-5
METRIC_LIST = ["logit_diff", "logit", "prob", "logprob", "kl"]
KEYS = ["probe_id", "site", "positions", "position", "operation", "metric", "sample"]


def run(model, spec_dict: dict, strategy: str, max_rows: int, remote=False, **executor_options
        ) -> tuple[pd.DataFrame, Study]:
    data = json.loads(json.dumps(spec_dict))
    data["execution"] = {"progress": False, "max_rows": max_rows, "strategy": strategy, "remote": remote}
    study = Study(StudySpec.from_dict(data), model=model, executor_options=executor_options)
    frame = study.run()
    return frame.sort_values(KEYS).reset_index(drop=True), study


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a[KEYS], b[KEYS])
    for column in ("clean", "corrupted", "patched", "effect"):
        gap = (a[column] - b[column]).abs().max()
        assert gap <= TOL, (column, gap)


def compare(model, spec_dict, full_rows=200, suffix_rows=(5, 200), some_full=False) -> Study:
    """The suffix strategy at each batch size equals the full strategy. Every batch runs under the suffix strategy,
    unless ``some_full``: a batch holding a patch on the embedding or the unembedding runs in full (the ragged path
    starts at the first block and unembeds by itself); then some batch, at some batch size, still runs suffix."""
    full, _ = run(model, spec_dict, "full", full_rows)
    study, ran_suffix = None, 0
    for rows in suffix_rows:
        frame, study = run(model, spec_dict, "suffix", rows)
        used = study.executor.used
        ran_suffix += used["suffix"]
        if not some_full:
            assert used["full"] == 0 and used["suffix"] > 0, used
        assert_same(full, frame)
    assert ran_suffix > 0
    return study


def test_every_site_kind_and_operation(tiny_model, tmp_path):
    vector = torch.randn(tiny_model.hf.config.hidden_size, generator=torch.Generator().manual_seed(5))
    torch.save(vector, tmp_path / "v.pt")
    spec = {
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST, "alignment": "right",
        "patches": [
            {"sites": ["embed", "layers[*].resid_pre", "layers[2].resid_post", "layers[1].attn_out",
                       "layers[0].mlp_out", "layers[1].heads[0:2]", "final_norm", "unembed"],
             "positions": ["each"], "operations": ["replace", "zero"]},
            {"sites": ["layers[2].heads[3]"], "positions": ["each"],
             "operations": ["mean", "resample", {"name": "interpolate", "alpha": 0.6}]},
        ],
    }
    compare(tiny_model, spec, some_full=True)
    # steering vectors are as wide as every site of the plan: whole-width sites only
    spec["patches"] = [{"sites": ["layers[1].mlp_out", "layers[2].resid_pre"], "positions": ["last", "all"],
                        "operations": ["mean", "resample", {"name": "interpolate", "alpha": 0.3},
                                       {"name": "steer", "alpha": 2.0, "vector": str(tmp_path / "v.pt")}]}]
    compare(tiny_model, spec)


def test_windows_and_combined_patches(tiny_model):
    spec = {
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST,
        "patches": [
            {"sites": ["layers[*].mlp_out"], "positions": ["each"], "window": 2},
            {"sites": ["layers[0].attn_out", "layers[1].resid_pre", "layers[2].mlp_out"], "combine": True,
             "positions": ["last", {"indices": [0, 1]}]},
            {"sites": ["layers[*].resid_pre"], "positions": ["none", 1]},
        ],
    }
    compare(tiny_model, spec)


def test_causal_trace_with_noise_samples(tiny_model):
    spec = {"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES}, "seed": 7, "recovery_epsilon": 0,
            "trace": {"samples": 2, "kinds": {"resid_post": 1, "mlp_out": 2, "attn_out": 2}}}
    compare(tiny_model, spec, suffix_rows=(6, 300))


def test_refused_on_ndif_and_under_its_simulation(tiny_gpt2):
    """The suffix strategy's patched rows run outside nnsight: on NDIF and under its local simulation it is refused
    with a clear error, and `auto` is `full` there."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST,
            "sites": ["layers[*].resid_pre"], "positions": ["each"]}
    with pytest.raises(ClapError, match="strategy `suffix` runs locally only"):
        run(tiny_gpt2, spec, "suffix", 64, remote="local")
    full, _ = run(tiny_gpt2, spec, "full", 64)
    simulated, study = run(tiny_gpt2, spec, "auto", 64, remote="local")
    assert study.executor.strategy == "full" and study.executor.ragged is None
    assert_same(full, simulated)


def test_suffix_passes_compute_less(tiny_gpt2, monkeypatch):
    """Tokens through each MLP: the suffix strategy runs a resid_pre layer x position sweep on well under half of
    what the full strategy runs (skipped blocks and cached columns are not computed). The pass cost is set to zero:
    on a model this small the grouping would otherwise (rightly) merge start columns into fewer passes."""
    from interventions import ragged

    monkeypatch.setattr(ragged, "PASS_OVERHEAD_FLOPS", 0.0)
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES[:2]}, "metrics": ["logit_diff"],
            "sites": ["layers[*].resid_pre"], "positions": ["each"]}
    counts = {}
    for strategy in ("full", "suffix"):
        seen = []
        handles = [block.mlp.register_forward_hook(
            lambda _m, args, _o, seen=seen: seen.append(args[0].shape[0] * args[0].shape[1]))
            for block in tiny_gpt2.hf.transformer.h]
        try:
            run(tiny_gpt2, spec, strategy, 64)
        finally:
            for handle in handles:
                handle.remove()
        counts[strategy] = sum(seen)
    assert counts["suffix"] < 0.5 * counts["full"], counts


def test_strategy_is_recorded_and_checked(tiny_gpt2, tmp_path):
    from clap.contract import read_results

    data = {"model": {"source": "m"}, "probes": {"inline": PROBES[:2]}, "metrics": ["logit_diff"],
            "sites": ["layers[0].resid_pre"], "positions": ["last"], "execution": {"progress": False}}
    Study(StudySpec.from_dict(data), model=tiny_gpt2).run(tmp_path / "auto")
    sidecar = read_results(tmp_path / "auto")[1]
    assert sidecar["strategy"] == "suffix"  # auto is suffix locally
    counts = sidecar["suffix_counts"]
    # both cells restore the first block's input at " is", the same token in both prompts: no-ops, not run
    assert counts["ragged_batches"] >= 1 and counts["no_op_rows"] == 2 and counts["rows_run"] == 0
    data["execution"]["strategy"] = "suffix"
    Study(StudySpec.from_dict(data), model=tiny_gpt2).run(tmp_path / "suffix")
    assert read_results(tmp_path / "suffix")[1]["strategy"] == "suffix"
    data["execution"].update(strategy="suffix", remote=True)
    with pytest.raises(ClapError, match="strategy `suffix` cannot run on NDIF"):
        StudySpec.from_dict(data)
    data["execution"].update(strategy="auto")
    assert Study(StudySpec.from_dict(data), model=tiny_gpt2).executor.strategy == "full"
    data["execution"].update(remote="local")  # the NDIF simulation: the suffix strategy cannot run there
    assert Study(StudySpec.from_dict(data), model=tiny_gpt2).executor.strategy == "full"
