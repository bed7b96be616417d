"""A joining row's query/key/value projections read from its baseline row (interventions/projection_reuse.py).

The numbers must equal the full strategy's (held to independent plain-hook patching elsewhere); these tests also
check that the reuse happens where it should (rows counted, projections fed fewer tokens), that it stays off where
an edit sits between a block's input and its projections, and that a model failing its check reuses nothing."""

from __future__ import annotations

import torch

from .conftest import PROBES
from .test_ragged import _tiny
from .test_strategies import METRIC_LIST, assert_same, run


def _compare(model, sites, positions=("each",), rows=200, **extra):
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST, "sites": list(sites),
            "positions": list(positions), **extra}
    full, _ = run(model, spec, "full", 200)
    frame, study = run(model, spec, "suffix", rows)
    assert study.executor.used["full"] == 0
    assert_same(full, frame)
    return study


def test_joining_rows_read_their_projections_from_the_baseline(tokenizer):
    """Residual, attention-output and MLP-output sweeps on GPT-2 (fused projection), Llama (three projections,
    grouped keys and values), GPT-NeoX and Mistral (sliding window): equal to `full`, with the rows reusing. A
    residual-stream row joins at its own block with one changed column; a late row (attention or MLP output) joins
    at the next block, except in the last block (it joins at the final norm: nothing to reuse)."""
    for kind in ("gpt2", "llama", "gpt_neox", "mistral"):
        model = _tiny(kind, tokenizer)
        study = _compare(model, ["layers[*].resid_pre"], rows=7)
        stats = study.executor.suffix_stats
        assert stats["reused_rows"] == stats["rows_run"] > 0, (kind, stats)
        assert study.executor.ragged.reuse_gap < 1e-5
        for site in ("layers[*].attn_out", "layers[*].mlp_out"):
            stats = _compare(model, [site]).executor.suffix_stats
            assert 0 < stats["reused_rows"] < stats["rows_run"] == stats["late_rows"], (kind, site, stats)


def test_the_projections_compute_only_the_changed_columns(tiny_gpt2):
    """In a block where rows join, their projection sees only the columns their edits changed: a residual sweep
    over one block with single-column cells feeds the projection one token per row (and a two-column window two),
    not the row's whole suffix."""
    projection = tiny_gpt2.hf.transformer.h[1].attn.c_attn
    _compare(tiny_gpt2, ["layers[1].resid_pre"])  # the reuse's own check, once per model (one column per row too)
    for positions, per_row in ((["each"], 1), ([{"indices": [0, 1]}], 2)):
        seen = []
        # registered first, so it runs before the reuse's hook lays the output out again: what was computed
        handle = projection.register_forward_hook(lambda _m, _args, out, seen=seen: seen.append(tuple(out.shape)))
        try:
            study = _compare(tiny_gpt2, ["layers[1].resid_pre"], positions=positions)
        finally:
            handle.remove()
        stats = study.executor.suffix_stats
        flat = [shape for shape in seen if len(shape) == 2]  # the passes' calls (the baseline pass's are 3-d)
        assert stats["reused_rows"] == stats["rows_run"] > 0
        assert flat and all(shape[1] == 3 * tiny_gpt2.hf.config.n_embd for shape in flat)
        # every row joins at block 1 and contributes its changed columns only
        assert sum(shape[0] for shape in flat) == per_row * stats["rows_run"], (positions, flat, stats)


def test_an_edit_before_the_projections_keeps_that_block_whole(tiny_gpt2):
    """An edit on the attention's input (the normed residual stream the projections read) sits between the block's
    input and the projections: that block is not reusable, the others are, and the numbers stay equal."""
    from interventions.plan import build_batch, chunk_cells
    from interventions.projection_reuse import reusable_blocks

    sites = ["transformer.h.1.attn:input", "layers[*].resid_pre"]
    study = _compare(tiny_gpt2, sites, rows=9)
    plan = study.plan()
    batch = build_batch(plan, chunk_cells(plan, 200)[0], 0, tiny_gpt2.tokenizer.pad_token_id, study.constants)
    layout = study.executor.layout
    assert reusable_blocks(batch, layout) == set(layout.projections) - {1} and 1 in layout.projections
    stats = study.executor.suffix_stats
    assert 0 < stats["reused_rows"] < stats["rows_run"]


def test_changed_columns_are_every_edit_at_the_joining_blocks_input(tiny_gpt2):
    """A row's changed columns: those its edits at its joining block's input write (a window: both), and a late
    row's start column; rows joining a block that is not reusable are left out."""
    from interventions.plan import build_batch, chunk_cells
    from interventions.projection_reuse import changed_columns, reusable_blocks
    from interventions.suffix import late_rows, row_starts

    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES[:1]}, "metrics": ["logit_diff"],
            "patches": [{"sites": ["layers[1].resid_pre"], "positions": [{"indices": [1, 3]}]},
                        {"sites": ["layers[0].mlp_out"], "positions": [{"indices": [2]}]}]}
    _, study = run(tiny_gpt2, spec, "suffix", 200)
    plan = study.plan()
    batch = build_batch(plan, chunk_cells(plan, 200)[0], 0, tiny_gpt2.tokenizer.pad_token_id, study.constants)
    layout = study.executor.layout
    starts = row_starts(batch, layout)
    late = late_rows(batch, layout, starts)
    joins = {row: (layer + 1, col) if row in late else (layer, col) for row, (layer, col) in starts.items()}
    found = changed_columns(batch, layout, joins, late, reusable_blocks(batch, layout))
    pad = int((batch.attention_mask[0] == 0).sum())  # the probe's left padding in this batch (none: one probe)
    window, mlp = sorted(starts, key=lambda row: starts[row][0], reverse=True)
    assert joins[window] == (1, pad + 1) and found[window] == (pad + 1, pad + 3)
    assert mlp in late and joins[mlp] == (1, pad + 2) and found[mlp] == (pad + 2,)


def test_a_model_whose_captured_projections_disagree_reuses_nothing(tokenizer, monkeypatch):
    """The reuse checks itself once per model: a block with one changed column per row, its other projections read
    from the baseline, against the block on its whole input. Captured projections that are not what the block
    computes (here: scaled on capture) fail it; the model then reuses nothing and its numbers stay exact."""
    from contextlib import contextmanager

    from interventions import projection_reuse

    real = projection_reuse.capture

    @contextmanager
    def scaled(hf, layout, layers, into):
        with real(hf, layout, layers, into) as found:
            yield found
        for per_block in into.values():
            for i, value in per_block.items():
                per_block[i] = value * 1.5

    monkeypatch.setattr(projection_reuse, "capture", scaled)
    model = _tiny("llama", tokenizer)
    study = _compare(model, ["layers[*].resid_pre"], rows=7)
    assert study.executor.ragged.reuse_gap > 1e-3
    assert study.executor.suffix_stats["reused_rows"] == 0 and study.executor.suffix_stats["rows_run"] > 0


def test_block_reuse_equals_the_block_on_its_whole_input(tiny_gpt2):
    """One block, directly: rows whose input changed at one column each, run with the projections computed at that
    column only and read from the unchanged input elsewhere, equal the block run on the changed input."""
    from interventions.projection_reuse import BlockReuse

    torch.manual_seed(0)
    block = tiny_gpt2.hf.transformer.h[1]
    base = torch.randn(3, 6, tiny_gpt2.hf.config.n_embd)
    with torch.no_grad():
        baseline = {0: block.attn.c_attn(block.ln_1(base))}
        changed = base.clone()
        columns = {10: (2,), 11: (5,), 12: (0, 4)}
        for i, cols in enumerate(columns.values()):
            changed[i, list(cols)] += torch.randn(len(cols), base.shape[-1])
        want = block(changed)
        split = BlockReuse.of([10, 11, 12], range(3), columns, 0, torch.arange(3))
        handles = split.hooks([block.attn.c_attn], baseline)
        try:
            got = block(changed)
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert split.fresh_rows.tolist() == [0, 1, 2, 2] and split.fresh_cols.tolist() == [2, 5, 0, 4]
