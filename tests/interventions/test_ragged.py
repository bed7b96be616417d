"""The suffix strategy's local fast path (interventions/ragged.py: one pass per start column, rows joining at their
first edited block, the model's blocks called one by one) and its no-op rows (interventions/suffix.py::no_op_rows).

Every batch is required to run on the ragged path (not a fallback), and its numbers must equal the full strategy's,
which tests/interventions/test_reference.py holds to independent plain-hook patching. The no-op rows are counted
independently from the token ids, and the rows they stand for must equal the corrupted baseline exactly."""

from __future__ import annotations

import pandas as pd
import torch

from .conftest import PROBES
from .test_compose import TRACE_PROBES
from .test_strategies import METRIC_LIST, assert_same, run


def compare_ragged(model, spec, rows=(5, 200)) -> list:
    full, _ = run(model, spec, "full", 200)
    studies = []
    for max_rows in rows:
        frame, study = run(model, spec, "suffix", max_rows)
        executor = study.executor
        assert executor.used["full"] == 0
        assert executor.suffix_stats["ragged_batches"] == executor.used["suffix"] > 0  # no fallback
        assert executor.ragged.self_check_gap < 1e-5
        assert_same(full, frame)
        studies.append(study)
    return studies


def test_every_site_kind_operation_and_shape(tiny_model, tmp_path):
    vector = torch.randn(tiny_model.hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    torch.save(vector, tmp_path / "v.pt")
    spec = {
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST, "alignment": "right",
        "patches": [
            {"sites": ["layers[*].resid_pre", "layers[2].resid_post", "layers[1].attn_out", "layers[0].mlp_out",
                       "layers[1].heads[0:2]", "final_norm"],
             "positions": ["each", "all"], "operations": ["replace", "zero"]},
            {"sites": ["layers[2].heads[3]", "layers[0].resid_post"], "positions": ["each"],
             "operations": ["mean", "resample", {"name": "interpolate", "alpha": 0.6}]},
            {"sites": ["layers[*].mlp_out"], "positions": ["each"], "window": 2},
            {"sites": ["layers[0].attn_out", "layers[1].resid_pre", "layers[2].mlp_out"], "combine": True,
             "positions": ["last", {"indices": [0, 1]}]},
        ],
    }
    compare_ragged(tiny_model, spec)
    # steering vectors are as wide as every site of the plan: whole-width sites only
    spec["patches"] = [{"sites": ["layers[1].mlp_out", "layers[2].resid_pre"], "positions": ["last", "all"],
                        "operations": [{"name": "steer", "alpha": 2.0, "vector": str(tmp_path / "v.pt")}]}]
    compare_ragged(tiny_model, spec)


def test_noising_direction(tiny_model):
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST, "direction": "noising",
            "sites": ["layers[*].resid_pre", "layers[*].attn_out"], "positions": ["each"]}
    compare_ragged(tiny_model, spec)


def test_causal_trace_with_noise_samples(tiny_model):
    """Noise at the subject's embeddings (a baseline edit before the first block, carried by the state every row
    joins with), restores of single layers and windows."""
    spec = {"model": {"source": "m"}, "probes": {"inline": TRACE_PROBES}, "seed": 7, "recovery_epsilon": 0,
            "trace": {"samples": 2, "kinds": {"resid_post": 1, "mlp_out": 2, "attn_out": 2}}}
    compare_ragged(tiny_model, spec, rows=(6, 300))


def _shared_prefix(probe: dict, tokenizer) -> int:
    clean, corrupted = tokenizer(probe["clean"])["input_ids"], tokenizer(probe["corrupted"])["input_ids"]
    assert len(clean) == len(corrupted)
    return next(i for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)) if a != b)


def test_no_op_rows_are_the_shared_prefix_and_equal_the_baseline(tiny_gpt2):
    """Restoring clean activations on the tokens clean and corrupted prompts share changes nothing: those rows are
    not run, and what is reported for them is the corrupted run. A ``zero`` there does change the row: it runs."""
    probes = [PROBES[0], {**PROBES[0], "id": "es", "clean": PROBES[0]["corrupted"], "corrupted": PROBES[0]["clean"],
                          "answer": PROBES[0]["wrong"], "wrong": PROBES[0]["answer"]}]
    spec = {"model": {"source": "m"}, "probes": {"inline": probes}, "metrics": ["logit_diff"],
            "sites": ["layers[*].resid_pre", "layers[*].attn_out", "layers[1].heads[2]"],
            "positions": ["each"], "operations": ["replace", "zero"]}
    frame, study = run(tiny_gpt2, spec, "suffix", 500)
    full, _ = run(tiny_gpt2, spec, "full", 500)
    assert_same(full, frame)
    shared = {p["id"]: _shared_prefix(p, tiny_gpt2.tokenizer) for p in probes}
    assert all(shared.values())  # every probe has a shared prefix (else the test proves nothing)
    # the first block's input is each token's embedding alone: there every equal token (" is" after the country)
    # is a no-op too, not only the shared prefix
    equal = {p["id"]: [a == b for a, b in zip(tiny_gpt2.tokenizer(p["clean"])["input_ids"],
                                                tiny_gpt2.tokenizer(p["corrupted"])["input_ids"], strict=True)]
             for p in probes}
    replaced = frame[frame.operation == "replace"]
    first_block = replaced.site == "layers.0.resid_pre"
    same_token = pd.Series([equal[p][i] for p, i in zip(replaced.probe_id, replaced.position, strict=True)],
                           index=replaced.index)
    quiet = replaced[(first_block & same_token)
                     | (~first_block & (replaced.position < replaced.probe_id.map(shared)))]
    sites = frame.site.nunique()
    assert len(quiet) == (sites - 1) * sum(shared.values()) + sum(sum(e) for e in equal.values())
    assert study.executor.suffix_stats["no_op_rows"] == len(quiet)
    assert (quiet.patched == quiet.corrupted).all()
    loud = replaced[replaced.position >= replaced.probe_id.map(shared)]
    assert (loud.patched != loud.corrupted).any()


def test_running_the_no_op_rows_changes_no_number(tiny_gpt2):
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST,
            "sites": ["layers[*].resid_pre", "layers[2].mlp_out"], "positions": ["each"]}
    reference, skipping = run(tiny_gpt2, spec, "suffix", 64)
    frame, study = run(tiny_gpt2, spec, "suffix", 64, skip_no_ops=False)
    assert_same(reference, frame)
    assert skipping.executor.suffix_stats["no_op_rows"] > 0 and study.executor.suffix_stats["no_op_rows"] == 0
    assert study.executor.suffix_stats["rows_run"] == (skipping.executor.suffix_stats["rows_run"]
                                                       + skipping.executor.suffix_stats["no_op_rows"])
    assert study.executor.suffix_stats["ragged_batches"] == study.executor.used["suffix"] > 0


def test_kl_is_computed_only_when_read(tiny_gpt2):
    """Without `kl` among the metrics the ragged path leaves it out; the metrics it reports are the same."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff", "prob"],
            "sites": ["layers[*].resid_pre"], "positions": ["each"]}
    full, _ = run(tiny_gpt2, spec, "full", 64)
    frame, study = run(tiny_gpt2, spec, "suffix", 64)
    assert not study.executor.needs.kl and study.executor.suffix_stats["rows_run"] > 0
    assert_same(full, frame)
    assert run(tiny_gpt2, {**spec, "metrics": METRIC_LIST}, "suffix", 64)[1].executor.needs.kl


def test_logit_metrics_unembed_the_answer_tokens_alone(tiny_model):
    """Without a metric over the whole vocabulary (probability, log-probability, KL) the ragged path multiplies the
    last hidden state by the answer and wrong tokens' rows of the unembedding only: the same logit difference and
    answer logit as the full strategy (a multi-token answer set included), and the whole-vocabulary unembedding
    runs only in whole forward passes (the baseline pass), never on the ragged passes' last states."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff", "logit"],
            "sites": ["layers[*].resid_pre", "layers[1].attn_out"], "positions": ["each"]}
    assert any(isinstance(p["answer"], list) for p in PROBES)
    full, _ = run(tiny_model, spec, "full", 200)
    run(tiny_model, {**spec, "metrics": METRIC_LIST}, "suffix", 200)  # the model's self-check, done once
    unembed = tiny_model.hf.get_output_embeddings()
    calls = []
    handle = unembed.register_forward_hook(lambda _m, _a, out: calls.append(tuple(out.shape)))
    try:
        frame, study = run(tiny_model, spec, "suffix", 200)
    finally:
        handle.remove()
    assert not study.executor.needs.vocabulary and study.executor.suffix_stats["rows_run"] > 0
    assert_same(full, frame)
    assert [shape for shape in calls if len(shape) == 2] == []  # [rows, vocab]: a ragged pass's last states
    assert sum(len(shape) == 3 for shape in calls) >= study.executor.used["suffix"]  # [rows, 1, vocab]: baselines


def test_token_logits_equal_the_unembeddings_columns():
    from interventions.ragged import token_logits

    torch.manual_seed(0)
    for bias in (False, True):
        unembed = torch.nn.Linear(16, 50, bias=bias)
        hidden, tokens = torch.randn(7, 16), torch.tensor([3, 11, 49])
        torch.testing.assert_close(token_logits(unembed, hidden, tokens), unembed(hidden)[:, tokens])


def _late(spec_sites, model, positions=("each",), **extra):
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff"],
            "sites": list(spec_sites), "positions": list(positions), **extra}
    full, _ = run(model, spec, "full", 200)
    frame, study = run(model, spec, "suffix", 200)
    assert_same(full, frame)
    return study.executor.suffix_stats


def test_rows_whose_first_edit_follows_the_attention_mixing_start_late(tiny_model):
    """A patch at a block's attention output, head outputs or MLP output changes that block's output at the patched
    column only: such rows run that block on one column and join the pass at the next block (``late_rows``). A
    patch of the residual stream entering a block changes its keys and values: never late. Numbers equal `full`."""
    for sites in (["layers[*].attn_out"], ["layers[*].mlp_out"], ["layers[1].heads[0:2]"], ["layers[0].resid_post"]):
        stats = _late(sites, tiny_model)
        assert stats["late_rows"] == stats["rows_run"] > 0, sites
    stats = _late(["layers[*].resid_pre"], tiny_model)
    assert stats["late_rows"] == 0 and stats["rows_run"] > 0
    # a window of two columns in the first block: not one column, so not late; the combined cell starts with its
    # attention input edit: not late either
    stats = _late(["layers[1].attn_out"], tiny_model, positions=[{"indices": [0, 1]}, "each"])
    assert 0 < stats["late_rows"] < stats["rows_run"]


def test_late_rows_under_sdpa_with_padding(tokenizer):
    """Under SDPA a padded batch gives the blocks a boolean mask (True: attend): the one-column calls of late rows
    block another row's longer prefix with False there, not with a large negative number."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff"],
            "sites": ["layers[*].attn_out", "layers[1].heads[1]"], "positions": ["each"]}
    for kind in ("gpt2", "llama"):
        model = _tiny(kind, tokenizer, "sdpa")
        stats = _late(spec["sites"], model)
        assert stats["late_rows"] == stats["rows_run"] > 0


def test_a_model_whose_blocks_cannot_run_one_column_per_row_starts_every_row_at_its_block(tokenizer, monkeypatch):
    """The late start checks itself once per model (the first block one column per row against every column): a
    model that fails (here: the one-column arguments cannot be built) runs its late rows from their block, exactly,
    on the ragged path still."""
    from interventions import ragged

    def refuse(*_args, **_kwargs):
        raise TypeError("no one-column arguments for this model")

    monkeypatch.setattr(ragged.BlockInputs, "for_columns", refuse)
    model = _tiny("gpt2", tokenizer)
    stats = _late(["layers[*].attn_out"], model)
    assert stats["late_rows"] == 0 and stats["rows_run"] > 0 and stats["ragged_batches"] > 0


def test_late_rows_are_cut_into_calls_of_bounded_size(tiny_gpt2, monkeypatch):
    """Each late row of a call holds the baseline keys and values of as many columns as the call's rightmost row:
    calls are cut so rows x (longest prefix + 1) stays within the pass budget. A tiny budget cuts them finely; the
    numbers do not change."""
    from interventions import ragged

    monkeypatch.setattr(ragged, "PASS_TOKENS", 6)
    late = {row: (1, col) for row, col in enumerate([0, 0, 1, 1, 2, 5, 5])}
    assert ragged._by_prefix(list(late), late) == [[0, 1, 2], [3, 4], [5], [6]]  # 3 x 2, 2 x 3, 1 x 6, 1 x 6
    sizes = []
    real = ragged.BlockInputs.for_columns
    monkeypatch.setattr(ragged.BlockInputs, "for_columns",
                        lambda self, layer, rows, columns, base: sizes.append(
                            (len(rows), int(columns.max()) + 1)) or real(self, layer, rows, columns, base))
    stats = _late(["layers[*].attn_out"], tiny_gpt2)
    assert stats["late_rows"] > 0 and len(sizes) > 3
    assert all(rows * width <= 6 or rows == 1 for rows, width in sizes) and max(r for r, _ in sizes) > 1


def test_the_last_block_runs_its_mlp_and_output_projection_on_the_last_column(tiny_gpt2):
    """Only the last column of the last block reaches the unembedding, so the passes give that block's MLP and its
    attention output projection the last column alone, unless the study edits them (then they run on every column
    the pass holds). An edit of the head outputs (the projection's input) comes before the cut and keeps it."""
    last = tiny_gpt2.hf.transformer.h[-1]
    width = tiny_gpt2.tokenizer(PROBES[1]["clean"], return_tensors="pt")["input_ids"].shape[1]  # the longest
    _late(["layers[*].resid_pre"], tiny_gpt2)  # the self-check, once per model
    two = [{"indices": [0, 1]}]  # two columns at once: not a late row, so the last block runs in the passes, edited
    for sites, positions, cut in ((["layers[*].resid_pre"], ["each"], {"mlp": True, "attn.c_proj": True}),
                                  (["layers[2].mlp_out"], two, {"mlp": False, "attn.c_proj": True}),
                                  (["layers[2].attn_out"], two, {"mlp": True, "attn.c_proj": False}),
                                  (["layers[2].heads[1]", "layers[1].resid_pre"], two,
                                   {"mlp": True, "attn.c_proj": True})):
        spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff"], "sites": sites,
                "positions": positions}
        widths = {name: [] for name in cut}
        handles = [last.get_submodule(name).register_forward_hook(
            lambda _m, _args, out, seen=seen: seen.append(out.shape[1])) for name, seen in widths.items()]
        try:
            run(tiny_gpt2, spec, "suffix", 200)
        finally:
            for handle in handles:
                handle.remove()
        for name, seen in widths.items():
            passes = seen[seen.index(width) + 1:]  # after the baseline pass (every column): the ragged passes
            assert passes and (set(passes) == {1}) is cut[name], (sites, name, seen)


def test_a_model_whose_last_block_cannot_be_cut_runs_it_whole(tokenizer, monkeypatch):
    """The cuts of the last block to the last column are checked with the rest of the path (the self-check runs
    with them): a model where they give other numbers (here: a cut that keeps the first column instead) is
    checked again without them, and runs its passes with the last block whole, on the ragged path, exactly."""
    from interventions import ragged

    def first_column(module):
        return module.register_forward_pre_hook(lambda _m, args: (args[0][:, :1], *args[1:]))

    monkeypatch.setattr(ragged, "_last_column_only", first_column)
    model = _tiny("llama", tokenizer)
    stats = _late(["layers[*].resid_pre", "layers[1].attn_out"], model)
    assert stats["ragged_batches"] > 0 and stats["rows_run"] > 0
    assert ragged._TRIMS[model.hf] is False and ragged._SELF_CHECKS[model.hf] < 1e-5


def test_a_model_the_self_check_rejects_runs_full(tokenizer):
    """Gemma-2 soft-caps its logits in the model's forward, after the last block and the unembedding: calling the
    blocks one by one misses it. The self-check sees the difference on the first batch and every batch then runs
    in full, with the full strategy's numbers. Without the soft-cap the ragged path runs Gemma-2 (sliding-window
    layers, extra norms) itself."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from clap.models import wrap

    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST,
            "sites": ["layers[*].resid_pre", "layers[1].mlp_out"], "positions": ["each"]}
    for softcap in (2.0, None):
        torch.manual_seed(11)
        config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer),
                              max_position_embeddings=64, sliding_window=4, final_logit_softcapping=softcap,
                              pad_token_id=0, bos_token_id=0, eos_token_id=0)
        config._attn_implementation = "eager"
        model = wrap(Gemma2ForCausalLM(config).eval(), tokenizer, {"source": "tiny-gemma2"})
        full, _ = run(model, spec, "full", 200)
        frame, study = run(model, spec, "suffix", 12)
        assert_same(full, frame)
        executor = study.executor
        if softcap:
            assert executor.ragged.self_check_gap > 1e-3
            assert executor.suffix_stats["ragged_batches"] == executor.used["suffix"] == 0 and executor.used["full"]
        else:
            assert executor.ragged.self_check_gap < 1e-5
            assert executor.suffix_stats["ragged_batches"] == executor.used["suffix"] > 0


def _tiny(kind: str, tokenizer, attention: str = "eager"):
    import transformers as T

    from clap.models import wrap

    torch.manual_seed(5)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "vocab_size": len(tokenizer), "max_position_embeddings": 64}
    tokens = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    config, model_class = {
        "gpt_neox": lambda: (T.GPTNeoXConfig(**sizes, rotary_pct=0.5), T.GPTNeoXForCausalLM),
        "mistral": lambda: (T.MistralConfig(**sizes, **tokens, num_key_value_heads=2, sliding_window=3),
                            T.MistralForCausalLM),
        "phi3": lambda: (T.Phi3Config(**sizes, **tokens, num_key_value_heads=2), T.Phi3ForCausalLM),
        "gpt2": lambda: (T.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=len(tokenizer)),
                         T.GPT2LMHeadModel),
        "llama": lambda: (T.LlamaConfig(**sizes, **tokens, num_key_value_heads=2), T.LlamaForCausalLM),
    }[kind]()
    config._attn_implementation = attention
    return wrap(model_class(config).eval(), tokenizer, {"source": f"tiny-{kind}"})


def test_more_architectures(tokenizer):
    """GPT-NeoX (its blocks call the cache `layer_past`; partial rotary), Mistral with a sliding window shorter than
    the prompts, Phi-3 (fused projections): every batch on the ragged path, equal to `full`."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST,
            "sites": ["layers[*].resid_pre", "layers[1].attn_out", "layers[2].mlp_out", "layers[1].heads[1]",
                      "final_norm"], "positions": ["each"]}
    for kind in ("gpt_neox", "mistral", "phi3"):
        compare_ragged(_tiny(kind, tokenizer), spec, rows=(7, 200))


def test_raw_input_sites_and_baseline_edits_inside_blocks(tokenizer):
    """A raw module input the model passes as a keyword (Llama's attention gets `hidden_states=`), and baseline noise
    inside blocks (the self-check runs the baseline rows with their baseline edits, so it must apply them too)."""
    for kind, attention_input in (("llama", "model.layers.1.self_attn:input"), ("gpt2", "transformer.h.1.attn:input")):
        model = _tiny(kind, tokenizer)
        spec = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "metrics": METRIC_LIST, "seed": 3,
                "sites": [attention_input, "layers[*].resid_pre"], "positions": ["each"]}
        compare_ragged(model, spec, rows=(7, 200))
        spec.update(corrupted_prompt="clean", sites=["layers[*].resid_pre", "layers[1].attn_out",
                                                      "layers[1].heads[1]"],
                    baseline=[{"sites": ["layers[1].mlp_out", "layers[0].resid_post"],
                               "positions": [{"indices": [0, 1]}], "operation": {"name": "noise", "scale": 2.0}}])
        compare_ragged(model, spec, rows=(7, 200))


def test_sdpa_batches_without_padding(tokenizer):
    """Under SDPA a batch without padding reaches the blocks with no mask (the kernel applies causality): the ragged
    path makes the causal mask explicit (a pass's queries are not square with its keys). One probe: no padding."""
    spec = {"model": {"source": "m"}, "probes": {"inline": PROBES[:1]}, "metrics": METRIC_LIST,
            "sites": ["layers[*].resid_pre", "layers[1].attn_out", "layers[1].heads[1]"], "positions": ["each"]}
    for kind in ("gpt2", "llama"):
        studies = compare_ragged(_tiny(kind, tokenizer, "sdpa"), spec, rows=(4, 200))
        assert studies[0].executor.used["suffix"] > 1  # several batches, one self-check, no fallback


def test_column_groups_find_the_cheapest_merge_of_start_columns():
    """Against every way of cutting the sorted start columns into consecutive passes (brute force): the passes
    ``column_groups`` picks cost the least, hold every row once, and each starts at its first row's column."""
    import itertools
    import random

    from interventions.ragged import column_groups

    def cost(groups, starts, width, n_layers, flops, overhead):
        return sum(overhead + sum(n_layers - starts[r][0] + 0.05 for r in rows) * (width - col) * flops
                   for col, rows in groups)

    rng = random.Random(5)
    for _ in range(40):
        width, n_layers = 12, 6
        starts = {row: (rng.randrange(n_layers + 1), rng.randrange(width)) for row in range(rng.randrange(1, 14))}
        flops, overhead = 1.0, rng.choice([0.5, 5.0, 40.0])
        groups = column_groups(starts, width, n_layers, flops, overhead)
        assert sorted(r for _, rows in groups for r in rows) == sorted(starts)
        assert all(col == min(starts[r][1] for r in rows) for col, rows in groups)
        columns = sorted({col for _, col in starts.values()})
        cheapest = float("inf")
        for cuts in itertools.product([False, True], repeat=len(columns) - 1):
            parts, current = [], [columns[0]]
            for col, cut in zip(columns[1:], cuts, strict=True):
                if cut:
                    parts.append(current)
                    current = []
                current.append(col)
            parts.append(current)
            candidate = [(part[0], [r for r in starts if starts[r][1] in part]) for part in parts]
            cheapest = min(cheapest, cost(candidate, starts, width, n_layers, flops, overhead))
        assert cost(groups, starts, width, n_layers, flops, overhead) <= cheapest + 1e-9
