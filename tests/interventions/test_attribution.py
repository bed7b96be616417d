"""Attribution patching: its ingredients against plain autograd through forward hooks, and exact patching where the
metric is linear in the activation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import torch

from clap.errors import ClapError
from interventions.attribution import attribution_from_spec, attribution_sweep
from interventions.spec import StudySpec
from interventions.sweeps import sweep
from tests.interventions.conftest import PROBES
from tests.interventions.reference import _hook

# module paths written out by hand (not clap's architecture table): (block, attention, mlp, o_proj, final norm)
PATHS = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.attn", "transformer.h.{}.mlp", "transformer.h.{}.attn.c_proj",
             "transformer.ln_f"),
    "llama": ("model.layers.{}", "model.layers.{}.self_attn", "model.layers.{}.mlp", "model.layers.{}.self_attn.o_proj",
              "model.norm"),
}
N_HEADS = 4
SITES = ["embed", "layers[*].resid_pre", "layers[*].attn_out", "layers[*].heads[*]", "layers[*].mlp_out",
         "layers[*].resid_post", "unembed"]


def family(model) -> str:
    return "gpt2" if model.hf.config.model_type == "gpt2" else "llama"


def tokens(model, probe: dict) -> tuple[list[int], list[int], list[int], list[int]]:
    tok = model.tokenizer
    answers = probe["answer"] if isinstance(probe["answer"], list) else [probe["answer"]]
    answer = list(dict.fromkeys(t for a in answers for t in tok(a, add_special_tokens=False)["input_ids"]))
    wrong = tok(probe["wrong"], add_special_tokens=False)["input_ids"]
    return tok(probe["clean"])["input_ids"], tok(probe["corrupted"])["input_ids"], answer, wrong


def logit_diff(logits: torch.Tensor, answer: Sequence[int], wrong: Sequence[int]) -> torch.Tensor:
    logits = logits.double()
    return logits[list(answer)].mean() - logits[list(wrong)].mean()


def run_recording(model, ids: Sequence[int] | None, accesses, answer, wrong, grads: bool,
                  embeds: torch.Tensor | None = None):
    """One unpadded forward pass (of token ids, or of given input embeddings, which then stand for the access named
    ``embed``) with plain hooks recording the tensor at every (path, access); with ``grads``, also
    ``torch.autograd.grad`` of the logit difference with respect to each recorded tensor (no nnsight involved)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, path, access, _heads in accesses:
        def keep(x, name=name):
            store[name] = x
            return x
        handles.append(_hook(model.hf.get_submodule(path), access, keep))
    names = [name for name, *_ in accesses]
    inputs = {"input_ids": torch.tensor([list(ids)])} if embeds is None else {"inputs_embeds": embeds[None]}
    if embeds is not None:
        store["embed"] = inputs["inputs_embeds"]
    try:
        with torch.enable_grad():
            logits = model.hf(**inputs).logits[0, -1]
            metric = logit_diff(logits, answer, wrong)
            tensors = [store[name] for name in names]
            gradients = torch.autograd.grad(metric, tensors) if grads else [None] * len(tensors)
    finally:
        for handle in handles:
            handle.remove()
    return [x[0].detach().double() for x in tensors], [g[0].double() if g is not None else None for g in gradients]


#: the token embedding modules, written out by hand
EMBED = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}


def trapezoid(steps: int) -> list[tuple[float, float]]:
    """(alpha, weight) of the trapezoid rule on [0, 1] with ``steps`` points; one point is the left end alone."""
    if steps == 1:
        return [(0.0, 1.0)]
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2
    return list(zip(alphas.tolist(), weights.tolist(), strict=True))


def reference_effects(model, probe: dict, direction: str, steps: int = 1) -> dict[tuple[str, int], float]:
    """(site name, target position) -> (a_source - a_target) . g by plain autograd, where g is the gradient at the
    target run (``steps`` 1) or the trapezoid sum of the gradients at ``steps`` points of the straight line from the
    target's token embeddings to the source's (right-aligned; a target token without a source counterpart keeps its
    embedding). Only positions with a source counterpart."""
    block, attn, mlp, o_proj, _ = PATHS[family(model)]
    clean, corrupted, answer, wrong = tokens(model, probe)
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    offset = len(target) - len(source)  # target position i <-> source position i - offset
    aligned = [i for i in range(len(target)) if 0 <= i - offset < len(source)]
    accesses = [("embed", EMBED[family(model)], "output", None)]
    for layer in range(model.hf.config.num_hidden_layers):
        accesses += [(f"layers.{layer}.resid_pre", block.format(layer), "input", None),
                     (f"layers.{layer}.attn_out", attn.format(layer), "output", None),
                     (f"layers.{layer}.heads", o_proj.format(layer), "input", N_HEADS),
                     (f"layers.{layer}.mlp_out", mlp.format(layer), "output", None),
                     (f"layers.{layer}.resid_post", block.format(layer), "output", None)]
    accesses.append(("unembed", "lm_head", "output", None))
    a_target, _ = run_recording(model, target, accesses, answer, wrong, grads=False)
    a_source, _ = run_recording(model, source, accesses, answer, wrong, grads=False)
    embed = model.hf.get_submodule(EMBED[family(model)])
    with torch.no_grad():
        e_target, e_source = embed(torch.tensor(target)), embed(torch.tensor(source))
    move = torch.zeros_like(e_target)
    move[aligned] = e_source[[i - offset for i in aligned]] - e_target[aligned]
    grads = None
    for alpha, weight in trapezoid(steps):
        _, g = run_recording(model, None, accesses, answer, wrong, grads=True,
                            embeds=(e_target + alpha * move).requires_grad_(True))
        grads = [weight * x for x in g] if grads is None else [acc + weight * x for acc, x in zip(grads, g,
                                                                                                   strict=True)]
    out = {}
    for (name, _path, _access, heads), t, s, g in zip(accesses, a_target, a_source, grads, strict=True):
        for position in aligned:
            product = (s[position - offset] - t[position]) * g[position]
            if heads:
                for head, value in enumerate(product.view(heads, -1).sum(-1)):
                    out[(f"{name}.{head}", position)] = float(value)
            else:
                out[(name, position)] = float(product.sum())
    return out


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_equals_autograd_reference(tiny_model, direction):
    """Every site and position of every probe (batched, left-padded) equals plain autograd on the unpadded prompt."""
    frame = attribution_sweep(tiny_model, PROBES, SITES, positions=["each"], direction=direction, multi_token="set")
    n_positions = sum(len(tokens(tiny_model, p)[0]) for p in PROBES)
    assert len(frame) == n_positions * (3 * (4 + N_HEADS) + 2)
    assert frame["approximate"].all() and (frame["direction"] == direction).all()
    checked = 0
    for probe in PROBES:
        reference = reference_effects(tiny_model, probe, direction)
        rows = frame[frame["probe_id"] == probe["id"]]
        clean_ids, corrupted_ids, answer, wrong = tokens(tiny_model, probe)
        clean = float(logit_diff(capture_logits(tiny_model, clean_ids), answer, wrong))
        corrupted = float(logit_diff(capture_logits(tiny_model, corrupted_ids), answer, wrong))
        np.testing.assert_allclose(rows["clean"], clean, atol=1e-5)
        np.testing.assert_allclose(rows["corrupted"], corrupted, atol=1e-5)
        ours = first_order(rows, direction)
        assert set(ours) == set(reference)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, abs=1e-5), key
            checked += 1
        np.testing.assert_allclose(rows["effect"], rows["patched"] - rows["corrupted"], atol=1e-12)
        np.testing.assert_allclose(rows["recovery"], (rows["patched"] - rows["corrupted"])
                                   / (rows["clean"] - rows["corrupted"]), atol=1e-9)
    assert checked == len(frame)
    # not all zero: the gradients really reach every kind of site
    assert (frame.groupby("site_kind")["effect"].apply(lambda e: e.abs().max()) > 1e-4).all()


@pytest.mark.parametrize("direction, steps", [("denoising", 2), ("noising", 3), ("denoising", 4)])
def test_integrated_gradients_equal_autograd_reference(tiny_model, direction, steps):
    """``steps`` points on the input path (batched, left-padded, path rows made inside the trace) equal plain
    autograd at the same points of the unpadded prompts' embeddings, trapezoid-weighted, for every site kind."""
    frame = attribution_sweep(tiny_model, PROBES, SITES, positions=["each"], direction=direction, multi_token="set",
                              steps=steps)
    assert (frame["operation"] == f"attribution(ig{steps})").all()
    plain = attribution_sweep(tiny_model, PROBES, SITES, positions=["each"], direction=direction, multi_token="set")
    for probe in PROBES:
        reference = reference_effects(tiny_model, probe, direction, steps)
        rows = frame[frame["probe_id"] == probe["id"]]
        ours = first_order(rows, direction)
        assert set(ours) == set(reference)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, abs=1e-5), key
    # the integral is not the single gradient: the two estimates differ where the model is not linear
    assert (frame["effect"] - plain["effect"]).abs().max() > 1e-3
    np.testing.assert_allclose(frame[["clean", "corrupted"]], plain[["clean", "corrupted"]], atol=1e-5)


UNEQUAL = [{"id": "short", "clean": "The capital of France is", "corrupted": "capital of Spain is",
            "answer": " Paris", "wrong": " Madrid"},
           {"id": "same", "clean": "Valproate treats", "corrupted": "Aspirin treats", "answer": " seizures",
            "wrong": " pain"}]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_integrated_gradients_with_right_alignment(tiny_gpt2, direction):
    """Prompts of different lengths (``alignment: right``): the path's end gets rows of its own (the target's
    context with the source's tokens where both have one); denoising has a target shorter than its source, noising
    a target token without a counterpart, which the path must leave alone for the other positions' estimates to
    match the reference (its own row patches nothing)."""
    frame = attribution_sweep(tiny_gpt2, UNEQUAL, SITES, positions=["each"], direction=direction, alignment="right",
                              steps=3)
    for probe in UNEQUAL:
        reference = reference_effects(tiny_gpt2, probe, direction, steps=3)
        rows = frame[(frame["probe_id"] == probe["id"]) & frame["position"].notna()]
        ours = first_order(rows, direction)
        assert set(ours) == set(reference)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, abs=1e-5), key
    unmatched = frame[frame["position"].isna()]
    assert direction == "denoising" or len(unmatched) and (unmatched["patched"] == unmatched["clean"]).all()


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_integrated_gradients_are_complete_at_the_first_layer(family_name, tiny_gpt2, tiny_llama):
    """Completeness: the first layer's input differs from the corrupted run's only by the interpolated embeddings,
    so its attributions summed over positions approach the whole difference ``clean - corrupted`` as the path is
    refined (trapezoid error ~1/steps^2); the single gradient at the target run does not."""
    model = tiny_gpt2 if family_name == "gpt2" else tiny_llama
    errors = {}
    for steps in (1, 3, 9, 33):
        frame = attribution_sweep(model, PROBES, ["layers[0].resid_pre"], positions=["each"], multi_token="set",
                                  steps=steps)
        per_probe = frame.groupby("probe_id").agg(total=("effect", "sum"), clean=("clean", "first"),
                                                  corrupted=("corrupted", "first"))
        errors[steps] = float((per_probe["total"] - (per_probe["clean"] - per_probe["corrupted"])).abs().max())
    size = float((per_probe["clean"] - per_probe["corrupted"]).abs().max())
    assert errors[33] < 2e-3 * size and errors[33] < errors[9] < errors[3]
    assert errors[1] > 10 * errors[33]


def first_order(rows, direction: str) -> dict[tuple[str, int], float]:
    """Each row's estimated change of the metric from the target run (the reference's quantity): ``patched`` minus
    the target baseline (corrupted when denoising, clean when noising); ``effect`` is always patched - corrupted."""
    target = "corrupted" if direction == "denoising" else "clean"
    return {(r.site, int(r.position)): r.patched - getattr(r, target) for r in rows.itertuples()}


def capture_logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=torch.tensor([list(ids)])).logits[0, -1].double()


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_linear_sites_equal_exact_patching(tiny_model, direction):
    """Where the logit difference is exactly linear in the patched activation (the final norm's output and the
    unembedding's input: only a matrix product lies between them and the logits), the first-order approximation
    is exact: attribution equals clap's exact engine at every position (0 away from the last)."""
    sites = ["final_norm", "lm_head:input"]
    approx = attribution_sweep(tiny_model, PROBES, sites, positions=["each", "all"], direction=direction,
                               multi_token="set")
    exact = _exact(tiny_model, sites, direction)
    keys = ["probe_id", "site", "positions", "position"]
    merged = approx.merge(exact, on=keys, suffixes=("_approx", "_exact"))
    assert len(merged) == len(approx) == len(exact)
    np.testing.assert_allclose(merged["patched_approx"], merged["patched_exact"], atol=1e-5)
    # recovery divides by clean - corrupted: the metrics' 1e-5 agreement becomes 1e-5 / |clean - corrupted|
    tolerance = _recovery_tolerance(merged)
    assert ((merged["recovery_approx"] - merged["recovery_exact"]).abs() <= tolerance).all()
    last = merged[merged["trivial_exact"]]
    assert len(last) and (last["trivial_approx"]).all()
    expected = 1.0 if direction == "denoising" else 0.0
    assert ((last["recovery_approx"] - expected).abs() <= tolerance[last.index]).all()


def _recovery_tolerance(merged: pd.DataFrame) -> pd.Series:
    """1e-5 on the metric, carried through the division by |clean - corrupted| (small for random weights)."""
    return 1e-5 / (merged["clean_exact"] - merged["corrupted_exact"]).abs() + 1e-6


def _exact(model, sites, direction) -> pd.DataFrame:
    spec = StudySpec.from_dict({
        "model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"}, "sites": sites,
        "positions": ["each", "all"], "direction": direction, "metrics": ["logit_diff"],
        "execution": {"progress": False},
    })
    from interventions.study import Study

    return Study(spec, model=model).run()


def test_nonlinear_sites_differ_from_exact_patching(tiny_gpt2):
    """The approximation is not exact elsewhere: the embedding's patch passes every nonlinearity of the model."""
    approx = attribution_sweep(tiny_gpt2, PROBES, ["layers[0].resid_pre"], positions=["all"], multi_token="set")
    exact = sweep(tiny_gpt2, PROBES[:2], ["layers[0].resid_pre"], positions=["all"])
    merged = approx.merge(exact, on=["probe_id", "site", "positions"], suffixes=("_approx", "_exact"))
    # patching the whole residual stream entering layer 0 reproduces the clean run exactly (recovery 1) ...
    assert ((merged["recovery_exact"] - 1.0).abs() <= _recovery_tolerance(merged)).all()
    # ... which a first-order expansion around the corrupted run does not
    assert (merged["recovery_approx"] - 1.0).abs().max() > 1e-3


def test_batching_frozen_weights_and_remote_simulation(tiny_llama):
    """One probe per pass or all in one, frozen weights (no parameter gradients), and nnsight's local NDIF
    simulation all give the same numbers; the caller's parameters get no ``.grad``."""
    sites = ["layers[*].resid_pre", "layers[1].heads[*]", "final_norm"]
    base = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set")
    one = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", probes_per_pass=1)
    np.testing.assert_allclose(one["effect"], base["effect"], atol=1e-6)
    remote = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", remote="local")
    np.testing.assert_allclose(remote["effect"], base["effect"], atol=1e-6)
    path = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", steps=3)
    path_one = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", steps=3,
                                 probes_per_pass=1)
    path_remote = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", steps=3,
                                    remote="local")
    np.testing.assert_allclose(path_one["effect"], path["effect"], atol=1e-6)
    np.testing.assert_allclose(path_remote["effect"], path["effect"], atol=1e-6)
    parameters = list(tiny_llama.hf.parameters())
    assert all(p.grad is None for p in parameters)
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        frozen = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set")
        frozen_path = attribution_sweep(tiny_llama, PROBES, sites, positions=["each"], multi_token="set", steps=3)
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
    np.testing.assert_allclose(frozen["effect"], base["effect"], atol=1e-6)
    np.testing.assert_allclose(frozen_path["effect"], path["effect"], atol=1e-6)
    assert base["effect"].abs().max() > 1e-4 and (path["effect"] - base["effect"]).abs().max() > 1e-4


def test_position_selections_sum_token_effects(tiny_gpt2):
    """A selection of several tokens gets the sum of its tokens' first-order effects."""
    each = attribution_sweep(tiny_gpt2, PROBES, ["layers[1].mlp_out"], positions=["each"], multi_token="set")
    grouped = attribution_sweep(tiny_gpt2, PROBES, ["layers[1].mlp_out"],
                                positions=["all", "last", {"indices": [0, 1]}], multi_token="set")
    for probe_id, rows in each.groupby("probe_id"):
        mine = grouped[grouped["probe_id"] == probe_id].set_index("positions")["effect"]
        assert mine["all"] == pytest.approx(rows["effect"].sum(), abs=1e-9)
        assert mine["last"] == pytest.approx(rows["effect"].iloc[-1], abs=1e-12)
        assert mine["indices:0,1"] == pytest.approx(rows["effect"].iloc[:2].sum(), abs=1e-9)


def test_spec_hook(tiny_gpt2):
    """A study spec runs as attribution: its groups, positions and direction; the same numbers as the sweep."""
    spec = StudySpec.from_dict({
        "model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"},
        "sites": ["layers[*].resid_pre"], "positions": ["each"], "direction": "noising",
        "patches": [{"sites": ["layers[*].heads[*]", "layers[*].mlp_out"], "positions": ["last"]}],
        "execution": {"max_rows": 4},
    })
    frame = attribution_from_spec(spec, model=tiny_gpt2)
    resid = attribution_sweep(tiny_gpt2, PROBES, ["layers[*].resid_pre"], direction="noising", multi_token="set")
    rest = attribution_sweep(tiny_gpt2, PROBES, ["layers[*].heads[*]", "layers[*].mlp_out"], positions=["last"],
                             direction="noising", multi_token="set")
    expected = pd.concat([resid, rest])
    merged = frame.merge(expected, on=["probe_id", "site", "positions", "position"])
    assert len(merged) == len(frame) == len(expected)
    np.testing.assert_allclose(merged["effect_x"], merged["effect_y"], atol=1e-6)


def test_spec_hook_steps_and_duplicates(tiny_gpt2):
    """``attribution_from_spec(steps=k)`` applies to every group that does not set its own ``steps`` (a plain
    ``attribution`` included); a cell named twice with the same estimate is reported once."""
    spec = StudySpec.from_dict({
        "model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"},
        "patches": [{"sites": ["layers[*].mlp_out"], "positions": ["last"], "operations": ["attribution"]},
                    {"sites": ["layers[1].mlp_out"], "positions": ["last"],
                     "operations": ["replace", {"name": "attribution", "steps": 2}]},
                    {"sites": ["layers[0].attn_out"], "positions": ["last"]}],
    })
    frame = attribution_from_spec(spec, model=tiny_gpt2, steps=3)
    expected = {label: attribution_sweep(tiny_gpt2, PROBES, sites, positions=["last"], multi_token="set", steps=k)
                for label, sites, k in (("attribution(ig3)", ["layers[*].mlp_out", "layers[0].attn_out"], 3),
                                        ("attribution(ig2)", ["layers[1].mlp_out"], 2))}
    assert sorted(frame["operation"].unique()) == sorted(expected)
    for label, rows in expected.items():
        mine = frame[frame["operation"] == label]
        merged = mine.merge(rows, on=["probe_id", "site", "positions", "position"])
        assert len(merged) == len(mine) == len(rows)
        np.testing.assert_allclose(merged["effect_x"], merged["effect_y"], atol=1e-9)


@pytest.mark.parametrize("change, message", [
    ({"operations": ["zero"]}, "approximates `replace` only"),
    ({"metrics": ["logit_diff", "prob"]}, "remove prob"),
    ({"sites": ["layers[9].mlp_out"]}, "out of range"),
    # once silently estimated as single sites / around the unintervened run
    ({"patches": [{"sites": ["layers[*].mlp_out"], "window": 3}]}, r"patches\[0\]\.window: .*one site at a time"),
    ({"baseline": [{"sites": ["embed"], "operation": {"name": "noise", "scale": 1.0}}]}, "baseline intervention"),
])
def test_spec_hook_refuses_what_it_cannot_approximate(tiny_gpt2, change, message):
    spec = StudySpec.from_dict({"model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"},
                                "sites": ["layers[*].mlp_out"], **change})
    with pytest.raises(ClapError, match=message):
        attribution_from_spec(spec, model=tiny_gpt2)


def test_sweep_refuses_bad_input(tiny_gpt2):
    with pytest.raises(ClapError, match="approximates logit_diff only"):
        attribution_sweep(tiny_gpt2, PROBES, metric="prob", multi_token="set")
    with pytest.raises(ClapError, match="token ids"):
        attribution_sweep(tiny_gpt2, PROBES, ["transformer.wte:input"], multi_token="set")
    with pytest.raises(ClapError, match="needs a `wrong` answer"):
        attribution_sweep(tiny_gpt2, [{k: v for k, v in PROBES[0].items() if k != "wrong"}])
