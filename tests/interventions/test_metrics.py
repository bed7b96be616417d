"""Metric reductions (softmax, KL, log-probability of an answer set) are done in float64 inside the trace: checked
against a float64 reference computed outside clap from the very logits the model produced in clap's forward pass,
on a model with large logits, where a float32 sum over the vocabulary is off by ~1e-5 relative."""

from __future__ import annotations

import pytest
import torch

from clap.contract import METRICS
from clap.models import wrap
from interventions import full_traces
from interventions.spec import StudySpec
from interventions.study import Study

PROBES = [
    # the last tokens differ, so the clean and corrupted next-token distributions are far apart (KL of several nats)
    {"id": "fr", "clean": "The capital of France is", "corrupted": "The capital of France was",
     "answer": " Paris", "wrong": " Madrid"},
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Epilepsy is a chronic disorder of a",
     "answer": [" brain", " mind"], "wrong": " head"},
]


@pytest.fixture(scope="module")
def sharp_gpt2(tokenizer):
    """A tiny random GPT-2 whose unembedding is scaled up 25x: logits in the tens, peaked distributions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=len(tokenizer),
                        tie_word_embeddings=False)
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(25.0)
    return wrap(hf, tokenizer, {"source": "sharp-gpt2"})


class LogitRecorder:
    """Wraps ``full_traces.run_batch``: keeps each batch, the unembedding's float32 output in that very forward pass
    (a plain PyTorch hook, outside the trace) and the metrics clap returned."""

    def __init__(self, real, hf):
        self.real, self.hf, self.records = real, hf, []

    def __call__(self, model, batch, remote=False, unembed_module=None):
        seen = []
        handle = self.hf.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
        try:
            metrics = self.real(model, batch, remote, unembed_module)
        finally:
            handle.remove()
        assert len(seen) == 1
        self.records.append((batch, seen[0][:, -1, :], metrics))
        return metrics


def reference_metrics(logits: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    """KL(clean || row), log P(answer set) and P(answer set) per row, in float64, written out independently."""
    logits = logits.double()
    logz = torch.logsumexp(logits, dim=1, keepdim=True)
    logp = logits - logz
    p = logp.exp()
    clean_rows = batch.clean_row.tolist()
    kl = torch.stack([(p[c] * (logp[c] - logp[r])).sum() for r, c in enumerate(clean_rows)])
    answer_logprob = []
    for r in range(logits.shape[0]):
        ids = [int(i) for i, m in zip(batch.answer_index[r], batch.answer_mask[r], strict=True) if m]
        answer_logprob.append(torch.log(p[r, ids].sum()))
    logprob = torch.stack(answer_logprob)
    return {"kl": kl, "logprob": logprob, "prob": logprob.exp()}


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "ndif-simulation"])
def test_kl_and_answer_probabilities_match_a_float64_reference(sharp_gpt2, monkeypatch, remote):
    recorder = LogitRecorder(full_traces.run_batch, sharp_gpt2.hf)
    monkeypatch.setattr(full_traces, "run_batch", recorder)
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre"],
        "positions": ["last", "all"], "operations": ["zero", "replace"], "metrics": ["kl", "logprob", "prob"],
        # the full strategy: the recorder reads the one forward pass's logits (the suffix strategy's equality with it
        # is tested in test_strategies.py)
        "execution": {"max_rows": 200, "remote": remote, "progress": False, "strategy": "full"},
    })
    frame = Study(spec, model=sharp_gpt2).run()
    [(batch, logits, metrics)] = recorder.records
    reference = reference_metrics(logits, batch)
    columns = {name: METRICS.index(name) for name in reference}
    kl = metrics[:, columns["kl"]].double()
    assert kl.max() > 5  # a large KL, where float32 reductions lose ~1e-5 relative
    for name, column in columns.items():
        torch.testing.assert_close(metrics[:, column].double(), reference[name], rtol=1e-9, atol=1e-12)
    # ... and the frame carries those numbers unrounded: the corrupted baseline's KL to the clean run
    corrupted_rows = {batch.row_probe[r]: r for r, role in enumerate(batch.row_role) if role == "corrupted"}
    for index, probe in enumerate(PROBES):
        value = frame[(frame.probe_id == probe["id"]) & (frame.metric == "kl")].corrupted.iloc[0]
        expected = float(reference["kl"][corrupted_rows[index]])
        assert value == pytest.approx(expected, rel=1e-9)
        assert expected > 1


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_results_do_not_depend_on_max_rows_beyond_forward_pass_rounding(request, family):
    """What the README states: across max_rows 3 (one cell per pass), 8 and 500 (one pass) the numbers differ only
    by the model's own float32 rounding (batches of other shapes sum in other orders), which for these models'
    logits of order 1 is below 1e-6; the float64 reductions add nothing measurable (KL within 1e-8)."""
    from .conftest import PROBES as MIXED_LENGTH_PROBES

    tiny_model = request.getfixturevalue(f"tiny_{family}")
    frames = {}
    for max_rows in (3, 8, 500):
        spec = StudySpec.from_dict({
            "model": {"source": "in-memory"}, "probes": {"inline": MIXED_LENGTH_PROBES},
            "sites": ["layers[1].resid_pre", "layers[2].attn_out"], "positions": ["last", 1, "all"],
            "operations": ["zero"], "metrics": list(METRICS),
            "execution": {"max_rows": max_rows, "progress": False},
        })
        frame = Study(spec, model=tiny_model).run()
        key = ["probe_id", "site", "position", "positions", "operation", "metric"]
        frames[max_rows] = frame.sort_values(key).reset_index(drop=True)
    one_pass = frames[500]
    assert len(one_pass) == 3 * 2 * 3 * len(METRICS)
    for max_rows in (3, 8):
        frame = frames[max_rows]
        assert (frame[["probe_id", "site", "positions", "operation", "metric"]]
                == one_pass[["probe_id", "site", "positions", "operation", "metric"]]).all().all()
        for column in ("clean", "corrupted", "patched"):
            difference = (frame[column] - one_pass[column]).abs()
            by_metric = difference.groupby(frame.metric).max()
            assert by_metric[["logit_diff", "logit", "logprob"]].max() < 1e-6, (max_rows, column, by_metric)
            assert by_metric["kl"] < 1e-8, (max_rows, column, by_metric)
            prob = frame.metric == "prob"
            relative = difference[prob] / one_pass[column][prob].abs()
            assert relative.max() < 1e-6, (max_rows, column, relative.max())


def test_logprob_does_not_underflow(tiny_gpt2):
    """Regression (review): log P(answer) is a logsumexp of log-probabilities, finite where the probability of a very
    sharp distribution underflows."""
    import copy

    import numpy as np

    from . import reference as ref
    from .conftest import PROBES as MIXED_LENGTH_PROBES
    from .conftest import small_study
    from .reference import probe_ids

    sharp = copy.deepcopy(tiny_gpt2.hf)
    sharp.lm_head.weight = torch.nn.Parameter(sharp.lm_head.weight.detach().clone() * 400)
    from clap.models import wrap

    model = wrap(sharp, tiny_gpt2.tokenizer)
    frame = small_study(model, sites=["layers[0].mlp_out"], positions=["last"], metrics=["logprob"]).run()
    for probe in MIXED_LENGTH_PROBES[:2]:
        clean, corrupted, answer, _ = probe_ids(model, probe)
        logits = ref.run(sharp, corrupted).double()
        expected = float(torch.logsumexp(torch.log_softmax(logits, -1)[answer], 0))
        row = frame[frame.probe_id == probe["id"]].iloc[0]
        assert np.isfinite(row.corrupted)
        assert row.corrupted == pytest.approx(expected, rel=1e-4)
