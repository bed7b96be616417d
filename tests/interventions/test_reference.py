"""clap's batched nnsight patching equals plain-PyTorch-hook patching, prompt by prompt, to 1e-4."""

from __future__ import annotations

import math

import pytest
import torch

from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES

#: site address -> (module path, access, head) per architecture, written out by hand (not from clap's tables)
SITES = {
    "gpt2": {
        "layers[1].resid_pre": ("transformer.h.1", "input", None),
        "layers[2].attn_out": ("transformer.h.2.attn", "output", None),
        "layers[0].mlp_out": ("transformer.h.0.mlp", "output", None),
        "layers[1].heads[2]": ("transformer.h.1.attn.c_proj", "input", 2),
        "transformer.h.0.mlp.c_fc": ("transformer.h.0.mlp.c_fc", "output", None),
        "layers[2].resid_post": ("transformer.h.2", "output", None),
        "unembed": ("lm_head", "output", None),
    },
    "llama": {
        "layers[1].resid_pre": ("model.layers.1", "input", None),
        "layers[2].attn_out": ("model.layers.2.self_attn", "output", None),
        "layers[0].mlp_out": ("model.layers.0.mlp", "output", None),
        "layers[1].heads[2]": ("model.layers.1.self_attn.o_proj", "input", 2),
        "model.layers.0.mlp.up_proj": ("model.layers.0.mlp.up_proj", "output", None),
        "layers[2].resid_post": ("model.layers.2", "output", None),
        "unembed": ("lm_head", "output", None),
    },
}
SITE_NAMES = {  # canonical names clap reports for the addresses above
    "layers[1].resid_pre": "layers.1.resid_pre",
    "layers[2].attn_out": "layers.2.attn_out",
    "layers[0].mlp_out": "layers.0.mlp_out",
    "layers[1].heads[2]": "layers.1.heads.2",
    "layers[2].resid_post": "layers.2.resid_post",
    "unembed": "unembed",
}
METRICS = ["logit_diff", "logit", "prob", "logprob", "kl"]


def family(model) -> str:
    return "gpt2" if model.hf.config.model_type == "gpt2" else "llama"


def tokenized(model):
    tok = model.tokenizer
    out = []
    for p in PROBES:
        answers = p["answer"] if isinstance(p["answer"], list) else [p["answer"]]
        out.append(
            {
                "id": p["id"],
                "clean": tok(p["clean"])["input_ids"],
                "corrupted": tok(p["corrupted"])["input_ids"],
                "answer": [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers],
                "wrong": [tok(p["wrong"], add_special_tokens=False)["input_ids"][0]],
            }
        )
    return out


def reference_value(hf, probe, site, positions, operation, direction, metric, mean_table=None):
    """Metric of one patched run, computed with hooks on unpadded prompts."""
    path, access, head = site
    n_heads = hf.config.num_attention_heads if head is not None else None
    target, source = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    clean_logits = ref.run(hf, probe["clean"])
    if operation == "replace":
        act = ref.capture(hf, probe[source], path, access)
        values = ref.source_values(act, positions, head, n_heads)
    elif operation == "zero":
        width = ref.capture(hf, probe[target], path, access).shape[-1]
        values = torch.zeros(len(positions), width // n_heads if head is not None else width)
    elif operation == "mean":
        n = len(probe[target])
        values = torch.stack([mean_table[n - pos] for pos in positions])
        if head is not None:
            d = values.shape[-1] // n_heads
            values = values[:, head * d : (head + 1) * d]
    logits = ref.run(hf, probe[target], [(path, access, ref.replace_edit(values, positions, head, n_heads))])
    return ref.metrics(logits, probe["answer"], probe["wrong"], clean_logits)[metric]


def mean_tables(hf, probes, path, access, source):
    """offset-from-end -> mean source activation over the probes that are that long."""
    acts = [ref.capture(hf, p[source], path, access) for p in probes]
    longest = max(a.shape[0] for a in acts)
    return {
        k: torch.stack([a[a.shape[0] - k] for a in acts if a.shape[0] >= k]).mean(0) for k in range(1, longest + 1)
    }


def run_study(model, sites, positions, operations, direction="denoising", max_rows=200, remote="local"):
    spec = StudySpec.from_dict(
        {
            "model": {"source": "in-memory"},
            "probes": {"inline": PROBES},
            "sites": sites,
            "positions": positions,
            "operations": operations,
            "direction": direction,
            "metrics": METRICS,
            "execution": {"max_rows": max_rows, "remote": remote, "progress": False},
        }
    )
    return Study(spec, model=model).run()


def lookup(frame, probe_id, site, positions, operation, metric):
    rows = frame[
        (frame.probe_id == probe_id)
        & (frame.site == site)
        & (frame.positions == positions)
        & (frame.operation == operation)
        & (frame.metric == metric)
    ]
    assert len(rows) == 1, (probe_id, site, positions, operation, metric, len(rows))
    return rows.iloc[0]


def _positions(label: str, n: int) -> list[int]:
    return {"last": [n - 1], "all": list(range(n)), "1": [1]}[label]


@pytest.mark.parametrize("max_rows", [3, 200], ids=["one-cell-per-pass", "batched"])
def test_replace_matches_hooks_every_site_kind(tiny_model, max_rows):
    fam = family(tiny_model)
    sites = SITES[fam]
    frame = run_study(tiny_model, list(sites), ["last", "all", 1], ["replace"], max_rows=max_rows)
    probes = tokenized(tiny_model)
    checked = 0
    for probe in probes:
        n = len(probe["corrupted"])
        for address, site in sites.items():
            for label in ("last", "all", "1"):
                for metric in ("logit_diff", "prob", "kl"):
                    row = lookup(frame, probe["id"], SITE_NAMES.get(address, address), label, "replace", metric)
                    expected = reference_value(tiny_model.hf, probe, site, _positions(label, n), "replace",
                                               "denoising", metric)
                    assert row.patched == pytest.approx(expected, abs=1e-4), (address, label, metric)
                    checked += 1
    assert checked == len(probes) * len(sites) * 3 * 3


def test_baselines_match_unpatched_runs(tiny_model):
    frame = run_study(tiny_model, ["layers[0].mlp_out"], ["last"], ["replace"])
    for probe in tokenized(tiny_model):
        clean_logits = ref.run(tiny_model.hf, probe["clean"])
        corrupted_logits = ref.run(tiny_model.hf, probe["corrupted"])
        for metric in METRICS:
            row = lookup(frame, probe["id"], "layers.0.mlp_out", "last", "replace", metric)
            clean_metric = ref.metrics(clean_logits, probe["answer"], probe["wrong"], clean_logits)[metric]
            assert row.clean == pytest.approx(clean_metric, abs=1e-4)
            assert row.corrupted == pytest.approx(
                ref.metrics(corrupted_logits, probe["answer"], probe["wrong"], clean_logits)[metric], abs=1e-4
            )
            if abs(row.clean - row.corrupted) <= 1e-6:  # the spec's default recovery_epsilon
                assert math.isnan(row.recovery) and not row.recovery_defined
            else:
                expected_recovery = (row.patched - row.corrupted) / (row.clean - row.corrupted)
                assert row.recovery == pytest.approx(expected_recovery, rel=1e-9) and row.recovery_defined


@pytest.mark.parametrize("operation", ["zero", "mean"])
def test_zero_and_mean_ablation_match_hooks(tiny_model, operation):
    fam = family(tiny_model)
    chosen = ["layers[1].resid_pre", "layers[1].heads[2]", "layers[0].mlp_out"]
    frame = run_study(tiny_model, chosen, ["last", "all"], [operation])
    probes = tokenized(tiny_model)
    for address in chosen:
        path, access, head = SITES[fam][address]
        table = mean_tables(tiny_model.hf, probes, path, access, "clean") if operation == "mean" else None
        for probe in probes:
            n = len(probe["corrupted"])
            for label in ("last", "all"):
                row = lookup(frame, probe["id"], SITE_NAMES[address], label, operation, "logit_diff")
                expected = reference_value(tiny_model.hf, probe, (path, access, head), _positions(label, n),
                                           operation, "denoising", "logit_diff", table)
                assert row.patched == pytest.approx(expected, abs=1e-4), (address, label)


def test_noising_direction_matches_hooks(tiny_gpt2):
    frame = run_study(tiny_gpt2, ["layers[1].resid_pre", "layers[2].attn_out"], ["last"], ["replace"],
                      direction="noising")
    assert set(frame.direction) == {"noising"}
    for probe in tokenized(tiny_gpt2):
        n = len(probe["clean"])
        for address in ("layers[1].resid_pre", "layers[2].attn_out"):
            row = lookup(frame, probe["id"], SITE_NAMES[address], "last", "replace", "logit_diff")
            expected = reference_value(tiny_gpt2.hf, probe, SITES["gpt2"][address], [n - 1], "replace", "noising",
                                       "logit_diff")
            assert row.patched == pytest.approx(expected, abs=1e-4)


def test_remote_local_simulation_gives_identical_numbers(tiny_model):
    sites = ["layers[*].resid_pre", "layers[1].heads[0:4]", "layers[2].mlp_out"]
    local = run_study(tiny_model, sites, ["last", "all"], ["replace", "zero"], remote=False)
    simulated = run_study(tiny_model, sites, ["last", "all"], ["replace", "zero"], remote="local", max_rows=20)
    key = ["probe_id", "site", "positions", "operation", "metric"]
    merged = local.merge(simulated, on=key, suffixes=("", "_remote"))
    assert len(merged) == len(local) == len(simulated)
    assert (merged.patched - merged.patched_remote).abs().max() < 1e-5


def test_resample_takes_another_probes_activation(tiny_gpt2):
    probes = [dict(p) for p in PROBES[:2]]
    # two probes of equal length so resampling is position-aligned
    probes[1] = {"id": "de", "clean": "The capital of Germany is", "corrupted": "The capital of Italy is",
                 "answer": " Berlin", "wrong": " Rome", "labels": {"knowledge_type": "definitional"}}
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": probes}, "sites": ["layers[1].resid_pre"],
        "positions": ["last"], "operations": ["resample"], "metrics": ["logit_diff"],
        "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    tok = tiny_gpt2.tokenizer
    ids = {p["id"]: p for p in probes}
    for this, other in (("fr", "de"), ("de", "fr")):  # with two probes the derangement is the swap
        act = ref.capture(tiny_gpt2.hf, tok(ids[other]["clean"])["input_ids"], "transformer.h.1", "input")
        target = tok(ids[this]["corrupted"])["input_ids"]
        n = len(target)
        edit = ref.replace_edit(act[[n - 1]], [n - 1], None, None)
        logits = ref.run(tiny_gpt2.hf, target, [("transformer.h.1", "input", edit)])
        answer = tok(ids[this]["answer"], add_special_tokens=False)["input_ids"]
        wrong = tok(ids[this]["wrong"], add_special_tokens=False)["input_ids"]
        expected = float(logits[answer].mean() - logits[wrong].mean())
        row = lookup(frame, this, "layers.1.resid_pre", "last", "resample", "logit_diff")
        assert row.patched == pytest.approx(expected, abs=1e-4)


def test_noise_is_seeded_and_scaled_by_embedding_std(tiny_gpt2):
    def noisy(seed, scale):
        spec = StudySpec.from_dict({
            "model": {"source": "in-memory"}, "probes": {"inline": PROBES}, "sites": ["embed"],
            "positions": ["all"], "seed": seed, "metrics": ["logit_diff"], "execution": {"progress": False},
            "operations": [{"name": "noise", "scale": scale, "relative_to": "embedding_std"}],
        })
        return Study(spec, model=tiny_gpt2).run().sort_values("probe_id").patched.to_numpy()

    first, again, other = noisy(0, 3.0), noisy(0, 3.0), noisy(1, 3.0)
    assert (first == again).all()
    assert not (first == other).all()
    tiny = noisy(0, 1e-7)  # vanishing noise leaves the corrupted run unchanged
    frame = run_study(tiny_gpt2, ["embed"], ["all"], ["zero"])
    corrupted = frame[frame.metric == "logit_diff"].sort_values("probe_id").corrupted.to_numpy()
    assert tiny == pytest.approx(corrupted, abs=1e-4)
    assert not math.isclose(first[0], corrupted[0], abs_tol=1e-3)
