"""Composed interventions equal plain-PyTorch-hook implementations (reference.py), with identical noise draws, to 1e-5:
causal tracing (noise on the subject's embeddings, one clean state restored), windows of layers, several sites
in one row, steering by a vector (file or mean difference) and interpolation, on tiny GPT-2 and tiny Llama (GQA)."""

from __future__ import annotations

import pytest
import torch

from clap.errors import ClapError
from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref

TRACE_PROBES = [
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Epilepsy is a chronic disorder of the",
     "answer": " brain", "wrong": " skin", "labels": {"subject": "Epilepsy"}},
    {"id": "vpa", "clean": "The drug valproic acid treats", "corrupted": "The drug valproic acid treats",
     "answer": " seizures", "wrong": " pain", "labels": {"subject": " valproic acid"}},
]
PATHS = {  # written out by hand, not from clap's tables
    "gpt2": {"embed": "transformer.wte", "block": "transformer.h.{}", "mlp": "transformer.h.{}.mlp",
             "attn": "transformer.h.{}.attn"},
    "llama": {"embed": "model.embed_tokens", "block": "model.layers.{}", "mlp": "model.layers.{}.mlp",
              "attn": "model.layers.{}.self_attn"},
}
TOL = 1e-5


def family(model) -> str:
    return "gpt2" if model.hf.config.model_type == "gpt2" else "llama"


#: the two tokens the hook reference checks: ROME's last subject token and the prompt's last token
CHECKED_POSITIONS = [{"field": "subject", "token": "last"}, "last"]


def trace_spec(remote: bool | str = False, **trace) -> StudySpec:
    return StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": TRACE_PROBES}, "seed": 7, "recovery_epsilon": 0,
        "trace": {"samples": 2, "kinds": {"resid_post": 1, "mlp_out": 2}, **trace},
        "execution": {"progress": False, "remote": remote, "max_rows": 64},
    })


def subject_of(probe: dict) -> str:
    return probe["labels"]["subject"] if "labels" in probe else probe["subject"]


def check_trace_against_hooks(study: Study, frame, model, probes: list[dict], layers: list[int]) -> int:
    """Every (probe, draw, traced component, layer, token in {last subject, last}) of a finished trace ``study``
    recomputed with plain hooks on the unpadded clean prompt, the noise drawn by the documented seed; the averages
    over draws in ``frame`` checked too. Returns the number of per-draw cells checked."""
    spec = study.spec
    per_sample = study.samples_frame if spec.samples > 1 else frame
    hf, tok, paths = model.hf, model.tokenizer, PATHS[family(model)]
    n_layers = hf.config.num_hidden_layers
    modules = {"resid_post": "block", "mlp_out": "mlp", "attn_out": "attn"}
    kinds = [(kind, modules[kind], window) for kind, window in spec.trace.kinds.items()]
    # the noise unit: std of the subjects' token embeddings over the probe set, times the trace's noise
    subjects = {p["id"]: ref.subject_indices(tok, p["clean"], subject_of(p)) for p in probes}
    embeds = [ref.capture(hf, tok(p["clean"])["input_ids"], paths["embed"], "output")[subjects[p["id"]]]
              for p in probes]
    std = spec.trace.noise * float(torch.cat(embeds).std())
    assert study.constants.noise_std(spec.baseline[0].operation) == pytest.approx(std, rel=1e-6)
    checked = 0
    for probe in probes:
        ids = tok(probe["clean"])["input_ids"]
        answer = tok(probe["answer"], add_special_tokens=False)["input_ids"]
        subject = subjects[probe["id"]]
        width = hf.config.hidden_size
        corrupted_by_sample, patched_sums = [], {}
        clean_acts = {}

        def clean_act_of(path, clean_acts=clean_acts, ids=ids):
            if path not in clean_acts:
                clean_acts[path] = ref.capture(hf, ids, path, "output")
            return clean_acts[path]

        for sample in range(spec.samples):
            noise = ref.gaussian(f"{spec.seed}|{probe['id']}|{sample}|embed|baseline0", len(subject), width, std)
            noised = (paths["embed"], "output", ref.add_edit(noise, subject))
            corrupted = ref.answer_prob(ref.run(hf, ids, [noised]), answer)
            corrupted_by_sample.append(corrupted)
            for kind, module, window in kinds:
                for layer in layers:
                    low, high = max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)
                    for token in (subject[-1], len(ids) - 1):
                        patches = [noised]
                        for patched_layer in range(low, high):
                            path = paths[module].format(patched_layer)
                            clean_act = clean_act_of(path)
                            patches.append((path, "output", ref.replace_edit(clean_act[[token]], [token], None, None)))
                        expected = ref.answer_prob(ref.run(hf, ids, patches), answer)
                        site = f"layers.{layer}.{kind}" + (f"@w{window}" if window > 1 else "")
                        rows = per_sample[(per_sample.probe_id == probe["id"]) & (per_sample.site == site)
                                          & (per_sample.position == token) & (per_sample["sample"] == sample)]
                        assert len(rows) == 1
                        row = rows.iloc[0]
                        assert row.patched == pytest.approx(expected, abs=TOL), (probe["id"], site, token, sample)
                        assert row.corrupted == pytest.approx(corrupted, abs=TOL)
                        assert row.effect == pytest.approx(expected - corrupted, abs=TOL)
                        assert row["window"] == high - low
                        patched_sums.setdefault((site, token), []).append(expected)
                        checked += 1
        clean = ref.answer_prob(ref.run(hf, ids), answer)
        n = spec.samples
        for (site, token), values in patched_sums.items():
            row = frame[(frame.probe_id == probe["id"]) & (frame.site == site) & (frame.position == token)].iloc[0]
            mean_corrupted = sum(corrupted_by_sample) / n
            assert row.patched == pytest.approx(sum(values) / n, abs=TOL)
            assert row.corrupted == pytest.approx(mean_corrupted, abs=TOL)
            assert row.clean == pytest.approx(clean, abs=TOL)
            recovery = (sum(values) / n - mean_corrupted) / (clean - mean_corrupted)
            # the probabilities agree to TOL; recovery divides by clean - corrupted (tiny for random weights)
            assert row.recovery == pytest.approx(recovery, abs=3 * TOL / abs(clean - mean_corrupted) + 1e-6)
            if n > 1:
                assert pd_isna(row["sample"])
    return checked


def test_causal_trace_equals_hooks(tiny_model):
    """The default run's variant: only the two tokens the reference checks are traced."""
    study = Study(trace_spec(positions=CHECKED_POSITIONS), model=tiny_model)
    frame = study.run()
    n_layers = tiny_model.hf.config.num_hidden_layers
    checked = check_trace_against_hooks(study, frame, tiny_model, TRACE_PROBES, list(range(n_layers)))
    assert checked == 2 * 2 * n_layers * 2 * 2
    assert set(frame.token_group) <= {"first subject", "last subject", "last"}  # a one-token subject: "first"


@pytest.mark.slow
def test_causal_trace_of_every_token_equals_hooks_under_ndif_simulation(tiny_model):
    """Every token traced (so each batch mixes the checked cells with others), through nnsight's local NDIF
    simulation."""
    study = Study(trace_spec(remote="local"), model=tiny_model)
    frame = study.run()
    n_layers = tiny_model.hf.config.num_hidden_layers
    checked = check_trace_against_hooks(study, frame, tiny_model, TRACE_PROBES, list(range(n_layers)))
    assert checked == 2 * 2 * n_layers * 2 * 2
    # ROME's token groups: the last token of " valproic acid" and the prompt's last token
    tok = tiny_model.tokenizer
    subject = ref.subject_indices(tok, TRACE_PROBES[1]["clean"], TRACE_PROBES[1]["labels"]["subject"])
    vpa = frame[(frame.probe_id == "vpa") & (frame.site == "layers.0.resid_post")].set_index("position")
    assert vpa.loc[subject[-1], "token_group"] == "last subject"
    assert vpa.loc[subject[0], "token_group"] == "first subject"
    assert vpa.loc[len(tok(TRACE_PROBES[1]["clean"])["input_ids"]) - 1, "token_group"] == "last"


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_stacked_steer_and_interpolate_equal_hooks(tiny_model, tmp_path):
    from .conftest import PROBES

    check_stacked_steer_interpolate(tiny_model, PROBES, tmp_path, remote="local")


@pytest.mark.slow
def test_stacked_steer_and_interpolate_equal_hooks_on_smollm2(tmp_path):
    """The same checks on real weights (SmolLM2-135M, three shipped probes)."""
    import json
    from pathlib import Path

    from .conftest import load_smollm2_or_skip

    model = load_smollm2_or_skip()
    lines = (Path(__file__).resolve().parents[2] / "clap/data/demo_probes.jsonl").read_text().splitlines()
    probes = [json.loads(line) for line in lines[:3]]
    probes = [{k: p[k] for k in ("id", "clean", "corrupted", "answer", "wrong")} for p in probes]
    check_stacked_steer_interpolate(model, probes, tmp_path, remote=False)


def check_stacked_steer_interpolate(tiny_model, PROBES, tmp_path, remote):
    """Stacked restores (three sites combined, two position selections), steering by a vector file and by a mean
    difference, and interpolation, each against plain hooks (``ref``) to TOL on the answer probability."""
    hf, tok, paths = tiny_model.hf, tiny_model.tokenizer, PATHS[family(tiny_model)]
    width = hf.config.hidden_size
    vector = torch.randn(width, generator=torch.Generator().manual_seed(3))
    torch.save(vector, tmp_path / "v.pt")
    plus, minus = ["Seizures are caused by the", "The neurologist"], ["Rashes are caused by the", "The dermatologist"]
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff", "prob"],
        "patches": [
            {"sites": ["layers[0].attn_out", "layers[1].resid_pre", "layers[2].mlp_out"], "combine": True,
             "positions": ["last", {"indices": [0, 1]}]},
            {"sites": ["layers[1].resid_pre"], "positions": ["last"],
             "operations": [{"name": "steer", "alpha": 2.5, "vector": str(tmp_path / "v.pt")},
                            {"name": "steer", "alpha": -1.0, "vector_from": {"plus": plus, "minus": minus}}]},
            {"sites": ["layers[2].mlp_out"], "positions": ["all"],
             "operations": [{"name": "interpolate", "alpha": 0.3}]},
        ],
        "execution": {"progress": False, "remote": remote, "max_rows": 7},
    })
    frame = Study(spec, model=hf_model(tiny_model)).run()
    # the mean-difference vector, from plain hooks
    def last(prompts):
        return torch.stack([ref.capture(hf, tok(t)["input_ids"], paths["block"].format(1), "input")[-1]
                            for t in prompts]).double().mean(0)
    diff = (last(plus) - last(minus)).float()
    for probe in PROBES:
        clean, corrupted = tok(probe["clean"])["input_ids"], tok(probe["corrupted"])["input_ids"]
        answers = probe["answer"] if isinstance(probe["answer"], list) else [probe["answer"]]
        answer = [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers]
        n = len(corrupted)
        sites = [(paths["attn"].format(0), "output"), (paths["block"].format(1), "input"),
                 (paths["mlp"].format(2), "output")]

        def check(site, positions, operation, patches, corrupted=corrupted, probe=probe, answer=answer):
            logits = ref.run(hf, corrupted, patches)
            row = frame[(frame.probe_id == probe["id"]) & (frame.site == site) & (frame.positions == positions)
                        & (frame.operation == operation) & (frame.metric == "prob")]
            assert len(row) == 1, (site, positions, operation)
            assert row.iloc[0].patched == pytest.approx(ref.answer_prob(logits, answer), abs=TOL), (site, operation)

        for label, positions in (("last", [n - 1]), ("indices:0,1", [0, 1])):
            patches = [(path, access, ref.replace_edit(ref.capture(hf, clean, path, access)[positions], positions,
                                                        None, None)) for path, access in sites]
            check("layers.0.attn_out+layers.1.resid_pre+layers.2.mlp_out", label, "replace", patches)
        block = paths["block"].format(1)
        check("layers.1.resid_pre", "last", "steer(2.5)", [(block, "input", ref.add_edit(2.5 * vector[None], [n - 1]))])
        check("layers.1.resid_pre", "last", "steer(-1)", [(block, "input", ref.add_edit(-1.0 * diff[None], [n - 1]))])
        mlp = paths["mlp"].format(2)
        source = ref.capture(hf, clean, mlp, "output")
        check("layers.2.mlp_out", "all", "interpolate(0.3)", [(mlp, "output", ref.mix_edit(source, range(n), 0.3))])


def hf_model(model):
    return model


def test_restores_without_corruption_are_refused():
    probes = [{"clean": "a b", "corrupted": "a b", "answer": " c", "labels": {"subject": "a"}}]
    with pytest.raises(ClapError, match="nothing to restore from.*add a baseline intervention"):
        StudySpec.from_dict({"model": {"source": "x"}, "probes": {"inline": probes}, "corrupted_prompt": "clean",
                             "sites": ["layers[*].resid_post"]})
    with pytest.raises(ClapError, match="`samples` draws noise several times"):
        StudySpec.from_dict({"model": {"source": "x"}, "probes": {"inline": probes}, "sites": ["embed"],
                             "samples": 3})
    with pytest.raises(ClapError, match=r"unknown operation 'stear'; did you mean 'steer'"):
        StudySpec.from_dict({"model": {"source": "x"}, "probes": {"inline": probes}, "sites": ["embed"],
                             "operations": [{"name": "stear", "alpha": 1}]})
    with pytest.raises(ClapError, match="`alpha` only applies to operation `steer` / `interpolate`"):
        StudySpec.from_dict({"model": {"source": "x"}, "probes": {"inline": probes}, "sites": ["embed"],
                             "operations": [{"name": "replace", "alpha": 1}]})


def test_trace_outputs_and_cli_refusal(tiny_gpt2, tmp_path, capsys):
    from analyses.trace import token_group_table, write_trace_outputs

    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": TRACE_PROBES}, "recovery_epsilon": 0,
        "trace": {"samples": 1, "kinds": {"resid_post": 1}}, "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    tok = tiny_gpt2.tokenizer
    # ROME's token groups: the first and last tokens of " valproic acid" and the prompt's last token
    subjects = {p["id"]: ref.subject_indices(tok, p["clean"], p["labels"]["subject"]) for p in TRACE_PROBES}
    assert len(subjects["ep"]) == 1 and len(subjects["vpa"]) > 1  # the tiny tokenizer: "Epilepsy" is one token
    vpa = frame[(frame.probe_id == "vpa") & (frame.site == "layers.0.resid_post")].set_index("position")
    assert vpa.loc[subjects["vpa"][-1], "token_group"] == "last subject"
    assert vpa.loc[subjects["vpa"][0], "token_group"] == "first subject"
    assert vpa.loc[len(tok(TRACE_PROBES[1]["clean"])["input_ids"]) - 1, "token_group"] == "last"
    table = token_group_table(frame).set_index(["layer", "token_group"]).effect
    layer1 = frame[frame.layer == 1]

    def effect(probe: str, position: int) -> float:
        return float(layer1[(layer1.probe_id == probe) & (layer1.position == position)].effect.iloc[0])

    # by hand: per probe the mean effect of its tokens in the group, then the mean over probes
    expected = layer1[layer1.token_group == "further"].groupby("probe_id").effect.mean().mean()
    assert table[(1, "further")] == pytest.approx(expected, abs=1e-12)
    # a one-token subject's token is its first and its last subject token (ROME's averages)
    ep, vpa_ids = subjects["ep"][0], subjects["vpa"]
    assert table[(1, "first subject")] == pytest.approx((effect("ep", ep) + effect("vpa", vpa_ids[0])) / 2, abs=1e-12)
    assert table[(1, "last subject")] == pytest.approx((effect("ep", ep) + effect("vpa", vpa_ids[-1])) / 2, abs=1e-12)
    written = write_trace_outputs(frame, tmp_path, n_probe_figures=1)
    assert [p.name for p in written] == ["token_groups.csv", "trace_groups.png", "trace_ep.png"]
    assert all(p.stat().st_size > 0 for p in written)
    (tmp_path / "plain.yaml").write_text("model: {source: x}\n"
                                         "probes: {inline: [{clean: a, corrupted: b, answer: ' c'}]}\n"
                                         "sites: [embed]\n")
    from clap.app.cli import main

    assert main(["trace", str(tmp_path / "plain.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert "needs a `trace:` section" in capsys.readouterr().err
