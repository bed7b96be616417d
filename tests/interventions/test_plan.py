"""Packing cells into forward passes: a head site and a whole-width site of the same module access share a batch;
a memory budget splits a study into many passes with the same numbers (a YAML probe file on the way)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from interventions.output import read_results
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


def test_runaway_plan_is_refused_from_counts_before_any_cell_is_built(tiny_gpt2, monkeypatch):
    """10^9 cells (100k probes x 10 sites x each position x 167 operations) filled the memory for minutes and
    ended in a MemoryError: the plan is counted first and refused past ``execution.max_cells`` with the estimate
    and the way to run it anyway; the count is exact when nothing merges or drops."""
    from clap.errors import ClapError
    from interventions import plan as plan_module

    def spec(**execution):
        return StudySpec.from_dict({
            "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre"],
            "patches": [{"sites": ["layers[*].mlp_out"], "positions": ["last", "each"],
                         "operations": ["replace", "zero", {"name": "noise", "scale": 0.1}]}],
            "positions": ["each"], "samples": 2, "metrics": ["logit_diff"],
            "execution": {"progress": False, **execution}})

    estimates = []
    count = plan_module.estimate_plan
    monkeypatch.setattr(plan_module, "estimate_plan", lambda *a, **k: estimates.append(count(*a, **k)) or estimates[-1])
    plan = Study(spec(max_cells=None), model=tiny_gpt2).plan()
    (estimate,) = estimates  # counted once, by compile_plan, before it built anything
    probes = plan.probes
    lengths = [len(p.corrupted_ids) for p in probes]
    # group 1: 3 layers x each token x replace; group 2: 3 layers x (1 + each) x (replace + zero + 2 noise draws)
    by_hand = sum(3 * n + 3 * (1 + n) * 4 for n in lengths)
    assert estimate.cells == by_hand == len(plan.cells)
    assert estimate.rows == by_hand + 2 * len(probes)
    assert estimate.bytes == by_hand * plan_module.BYTES_PER_CELL

    built = []
    monkeypatch.setattr(plan_module, "_cell", lambda *a, **k: built.append(1))  # nothing may be built
    with pytest.raises(ClapError) as info:
        Study(spec(max_cells=by_hand - 1), model=tiny_gpt2).plan()
    text = str(info.value)
    assert text.startswith(f"the study would run {by_hand:,} cells ({by_hand + 2 * len(probes):,} forward-pass rows)")
    assert f"more than execution.max_cells ({by_hand - 1:,})" in text
    assert f"`execution: {{max_cells: {by_hand}}}` (null: no limit)" in text and not built

    huge = [type(probes[0])(**{**vars(probes[0]), "id": f"p{i}"}) for i in range(100_000)]
    many = StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre"],
        "positions": ["each"], "operations": ["zero"], "metrics": ["logit_diff"]})
    big = plan_module.estimate_plan(many, huge, [plan_module.GroupPlan(sites=list(range(10)), positions=["each"],
                                                                       operations=many.operations * 167)])
    assert big.cells == 100_000 * 10 * len(probes[0].corrupted_ids) * 167 > 10**9 // 2
    with pytest.raises(ClapError, match=r"GB of memory"):
        plan_module.check_plan_size(big, many.execution.max_cells)
    # a group restricted to some probes (the additivity run's per-probe sets) counts for those probes only
    per_probe = [plan_module.GroupPlan(sites=[0, 1], positions=["last"], operations=many.operations,
                                       probes=frozenset({f"p{i}"})) for i in range(100)]
    assert plan_module.estimate_plan(many, huge[:100], per_probe).cells == 100 * 2


def test_a_baseline_row_cap_bounds_each_batch_and_keeps_every_cell_once(tiny_gpt2):
    """``chunk_cells``'s second bound: at most ``max_baseline_rows`` baseline rows (two per probe here) per batch,
    whatever the rows; every cell in exactly one batch, in probe order; a subset of cells chunks by itself."""
    from interventions.plan import chunk_cells

    probes = [{**p, "id": f"{p['id']}{i}"} for i in range(4) for p in PROBES]  # 12 probes
    study = Study(StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": probes},
                                       "sites": ["layers[1].resid_pre"], "positions": ["last"],
                                       "metrics": ["logit_diff"]}), model=tiny_gpt2)
    plan = study.plan()
    assert len(plan.cells) == 12
    for cap, expected in ((0, [12]), (6, [3, 3, 3, 3]), (8, [4, 4, 4]), (2, [1] * 12)):
        chunks = chunk_cells(plan, 1000, cap)
        assert [len(c) for c in chunks] == expected, cap
        assert sorted(c.index for chunk in chunks for c in chunk) == sorted(c.index for c in plan.cells)
        assert all(2 * len({c.probe for c in chunk}) <= (cap or 1000) for chunk in chunks)
    assert [len(c) for c in chunk_cells(plan, 7, 0, cells=plan.cells[:5])] == [2, 2, 1]  # 3 rows per cell


def test_a_large_suffix_batch_that_runs_full_runs_as_full_sized_parts(tiny_model, monkeypatch):
    """A patch on the embedding keeps a batch off the suffix path; under the suffix strategy's default batch size
    (many rows) that batch then runs as parts of the full strategy's rows (each tried on the suffix path again:
    those without the embedding patch take it), not as one forward pass over every row: each full forward holds
    at most that many rows, and the numbers equal the full strategy's."""
    from interventions import full_traces
    from interventions import plan as plan_module

    from .test_strategies import KEYS, assert_same, run

    monkeypatch.setitem(plan_module.DEFAULT_ROWS, "full", 16)
    sizes = []
    real = full_traces.run_batch
    monkeypatch.setattr(full_traces, "run_batch",
                        lambda model, batch, **kw: sizes.append(len(batch.row_role)) or real(model, batch, **kw))
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff"],
            "sites": ["embed", "layers[*].resid_pre"], "positions": ["each"]}
    reference, _ = run(tiny_model, spec, "full", 200)
    sizes.clear()
    data = {**spec, "execution": {"progress": False, "strategy": "suffix"}}
    study = Study(StudySpec.from_dict(data), model=tiny_model)
    frame = study.run().sort_values(KEYS).reset_index(drop=True)
    # one chunk of every cell (the suffix default), run as parts: those with the embedding patch in full
    assert len(frame) > 16 and study.executor.used["full"] > 1 and max(sizes) <= 16, sizes
    assert_same(reference, frame)
