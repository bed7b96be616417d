"""Cross-model patching equals plain-PyTorch-hook patching to 1e-5: the source model runs the source prompt, its
activation at the site is written into the target model's run of the target prompt, on two tiny GPT-2s with
different random weights and two tiny Llamas with grouped-query attention. Also: the baselines of both models, the
recovery from the target's run to the source model's, NDIF's local simulation, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from clap.errors import ClapError
from clap.models import wrap
from interventions.spec import SpecError, StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES

TOL = 1e-5
#: site address -> (module path, access, head), written out by hand (not from clap's tables)
SITES = {
    "gpt2": {
        "layers[1].resid_pre": ("transformer.h.1", "input", None),
        "layers[2].attn_out": ("transformer.h.2.attn", "output", None),
        "layers[0].mlp_out": ("transformer.h.0.mlp", "output", None),
        "layers[1].heads[2]": ("transformer.h.1.attn.c_proj", "input", 2),
    },
    "llama": {
        "layers[1].resid_pre": ("model.layers.1", "input", None),
        "layers[2].attn_out": ("model.layers.2.self_attn", "output", None),
        "layers[0].mlp_out": ("model.layers.0.mlp", "output", None),
        "layers[1].heads[2]": ("model.layers.1.self_attn.o_proj", "input", 2),
    },
}
NAMES = {"layers[1].resid_pre": "layers.1.resid_pre", "layers[2].attn_out": "layers.2.attn_out",
         "layers[0].mlp_out": "layers.0.mlp_out", "layers[1].heads[2]": "layers.1.heads.2"}
METRICS = ["logit_diff", "logit", "prob", "logprob", "kl"]
#: two probes of different lengths (left padding), one with an answer set
CROSS_PROBES = [PROBES[0], PROBES[2]]


def gpt2(tokenizer, seed: int, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{"n_layer": 3, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": len(tokenizer),
                        **config})
    cfg._attn_implementation = "eager"
    return wrap(GPT2LMHeadModel(cfg).eval(), tokenizer, {"source": f"tiny-gpt2-{seed}"})


def llama(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg._attn_implementation = "eager"
    return wrap(LlamaForCausalLM(cfg).eval(), tokenizer, {"source": f"tiny-llama-{seed}"})


@pytest.fixture(scope="module")
def pairs(tiny_gpt2, tiny_llama, tokenizer):
    """(target, source) per family: the conftest models as targets, same shapes with other weights as sources."""
    return {"gpt2": (tiny_gpt2, gpt2(tokenizer, 777)), "llama": (tiny_llama, llama(tokenizer, 888))}


def tokenized(tok, probe: dict, same_prompt: bool) -> dict:
    answers = probe["answer"] if isinstance(probe["answer"], list) else [probe["answer"]]
    clean = tok(probe["clean"])["input_ids"]
    return {"clean": clean, "corrupted": clean if same_prompt else tok(probe["corrupted"])["input_ids"],
            "answer": [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers],
            "wrong": [tok(probe["wrong"], add_special_tokens=False)["input_ids"][0]]}


class Reference:
    """Every number of a cross-model cell by hooks, with each model's unpatched runs and captures done once."""

    def __init__(self, target, source, direction: str):
        self.target, self.source = target.hf, source.hf
        self.target_role, self.source_role = ("corrupted", "clean") if direction == "denoising" else \
            ("clean", "corrupted")
        self._runs: dict = {}
        self._acts: dict = {}

    def _run(self, hf, ids) -> torch.Tensor:
        key = (id(hf), tuple(ids))
        if key not in self._runs:
            self._runs[key] = ref.run(hf, ids)
        return self._runs[key]

    def _capture(self, hf, ids, path, access) -> torch.Tensor:
        key = (id(hf), tuple(ids), path, access)
        if key not in self._acts:
            self._acts[key] = ref.capture(hf, ids, path, access)
        return self._acts[key]

    def cell(self, probe: dict, site: tuple, positions: list[int], alpha: float | None) -> dict:
        path, access, head = site
        hf, src = self.target, self.source
        n_heads = hf.config.num_attention_heads if head is not None else None
        t_clean, s_clean = self._run(hf, probe["clean"]), self._run(src, probe["clean"])

        def m(logits, reference):
            return ref.metrics(logits, probe["answer"], probe["wrong"], reference)

        # the SOURCE model on the source prompt
        values = ref.source_values(self._capture(src, probe[self.source_role], path, access), positions, head,
                                   n_heads)
        if alpha is not None:  # (1 - alpha) target + alpha source, the target's own activation unpatched
            own = ref.source_values(self._capture(hf, probe[self.target_role], path, access), positions, head,
                                    n_heads)
            values = own + alpha * (values - own)
        edit = ref.replace_edit(values, positions, head, n_heads)
        out = {"clean": m(t_clean, t_clean), "corrupted": m(self._run(hf, probe["corrupted"]), t_clean),
               "patched": m(ref.run(hf, probe[self.target_role], [(path, access, edit)]), t_clean),
               "source_model_clean": m(s_clean, s_clean),
               "source_model_corrupted": m(self._run(src, probe["corrupted"]), s_clean)}
        start = out[self.target_role]
        out["denominator"] = {k: out[f"source_model_{self.source_role}"][k] - start[k] for k in METRICS}
        out["recovery"] = {k: (out["patched"][k] - start[k]) / out["denominator"][k] if out["denominator"][k]
                           else math.nan for k in METRICS}
        return out


def cross_spec(sites, positions, operations, direction="denoising", same_prompt=False, remote="local", **extra):
    return StudySpec.from_dict({
        "model": {"source": "target"}, "source_model": {"source": "source"}, "probes": {"inline": CROSS_PROBES},
        "sites": sites, "positions": positions, "operations": operations, "metrics": METRICS,
        "direction": direction, "recovery_epsilon": 0, "corrupted_prompt": "clean" if same_prompt else "probe",
        "execution": {"progress": False, "remote": remote, "max_rows": 40}, **extra})


def check_frame(frame, target, source, sites, direction, same_prompt, alpha_ops):
    fam = "gpt2" if target.hf.config.model_type == "gpt2" else "llama"
    tok = target.tokenizer
    reference = Reference(target, source, direction)
    rows = {(r.probe_id, r.site, r.operation, r.positions, None if r.positions == "last" else int(r.position),
             r.metric): r for r in frame.itertuples()}
    checked = 0
    for raw in CROSS_PROBES:
        probe = tokenized(tok, raw, same_prompt)
        n = len(probe["clean"])
        for address in sites:
            for positions, label in [([n - 1], "last")] + [([i], "each") for i in range(n)]:
                for op_label, alpha in alpha_ops:
                    key = (raw["id"], NAMES[address], op_label, label, None if label == "last" else positions[0])
                    if key + ("kl",) not in rows:
                        continue
                    want = reference.cell(probe, SITES[fam][address], positions, alpha)
                    for metric in METRICS:
                        row = rows[key + (metric,)]
                        for column in ("clean", "corrupted", "patched", "source_model_clean",
                                       "source_model_corrupted"):
                            assert getattr(row, column) == pytest.approx(want[column][metric], abs=TOL), (
                                key, metric, column)
                        if metric == "kl" or not want["denominator"][metric]:  # KL: each model its own reference
                            assert math.isnan(row.recovery) and not row.recovery_defined
                        else:
                            # the metrics' tolerance carried through the division by the denominator
                            rec = want["recovery"][metric]
                            tol = 2 * TOL * (1 + abs(rec)) / abs(want["denominator"][metric])
                            assert row.recovery == pytest.approx(rec, abs=tol), (key, metric)
                        checked += 1
    return checked


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("same_prompt", [False, True], ids=["paired", "same-prompt"])
def test_cross_model_equals_hooks(pairs, fam, same_prompt):
    target, source = pairs[fam]
    sites = list(SITES[fam])
    spec = cross_spec(sites, ["last", "each"], ["replace", {"name": "interpolate", "alpha": 0.3}],
                      same_prompt=same_prompt)
    frame = Study(spec, model=target, source_model=source).run()
    checked = check_frame(frame, target, source, sites, "denoising", same_prompt,
                          [("replace", None), ("interpolate(0.3)", 0.3)])
    n_positions = sum(len(target.tokenizer(p["clean"])["input_ids"]) + 1 for p in CROSS_PROBES)
    assert checked == n_positions * len(sites) * 2 * len(METRICS)
    if same_prompt:  # the target model's two baselines are one run; the models are the difference
        assert (frame.clean == frame.corrupted).all()
    # the source activation is the other model's: a plain (same-model) restore gives other numbers
    same_model = Study(cross_spec(sites, ["last"], ["replace"], remote=False).model_copy(
        update={"source_model": None}), model=target).run() if not same_prompt else None
    if same_model is not None:
        mine = frame[(frame.positions == "last") & (frame.operation == "replace")].set_index(
            ["probe_id", "site", "metric"]).patched.sort_index()
        other = same_model.set_index(["probe_id", "site", "metric"]).patched.sort_index()
        assert (mine - other).abs().max() > 1e-3


def test_noising_across_models(pairs):
    """Noising: the source model's run of the corrupted prompt into the target model's clean run; recovery runs from
    the target on the clean prompt (0) to the source model on the corrupted prompt (1)."""
    target, source = pairs["gpt2"]
    sites = ["layers[1].resid_pre", "layers[1].heads[2]"]
    frame = Study(cross_spec(sites, ["last", "each"], ["replace"], direction="noising"), model=target,
                  source_model=source).run()
    assert check_frame(frame, target, source, sites, "noising", False, [("replace", None)]) > 0


def test_local_execution_equals_ndif_simulation(pairs):
    target, source = pairs["llama"]
    sites = ["layers[1].resid_pre", "layers[1].heads[2]", "layers[0].mlp_out"]
    ops = ["replace", {"name": "interpolate", "alpha": 0.5}]
    simulated = Study(cross_spec(sites, ["each"], ops), model=target, source_model=source).run()
    local = Study(cross_spec(sites, ["each"], ops, remote=False), model=target, source_model=source).run()
    for column in ("patched", "clean", "corrupted", "source_model_clean", "source_model_corrupted"):
        assert (simulated[column] - local[column]).abs().max() < 1e-6, column


def test_unembedding_at_answer_recovers_one(pairs):
    """Invariant: the source model's logits at the last token make the target model's answer scores exactly the
    source model's (recovery 1, flagged trivial); an earlier site still passes through the target's own weights."""
    target, source = pairs["gpt2"]
    frame = Study(cross_spec(["unembed"], ["last"], ["replace"]), model=target,
                  source_model=source).run()
    rows = frame[frame.metric != "kl"]
    assert rows.trivial.all()
    assert (rows.patched - rows.source_model_clean).abs().max() < TOL
    assert (rows.recovery - 1).abs().max() < 1e-4


def test_run_json_records_both_models_and_fingerprint_covers_source(pairs, tokenizer, tmp_path):
    import json

    target, source = pairs["gpt2"]
    spec = cross_spec(["layers[1].resid_pre"], ["last"], ["replace"], remote=False)
    Study(spec, model=target, source_model=source).run(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["source_model"]["weights_fingerprint"] != meta["model"]["weights_fingerprint"]
    assert meta["spec"]["source_model"]["source"] == "source"
    other = gpt2(tokenizer, 999)
    first = Study(spec, model=target, source_model=source).plan().fingerprint
    assert Study(spec, model=target, source_model=other).plan().fingerprint != first
    assert Study(spec, model=target, source_model=source).plan().fingerprint == first


# -- refusals ------------------------------------------------------------------------------------------------------


def test_refuses_operations_that_do_not_read_the_source():
    for op in ("zero", "mean", {"name": "noise", "scale": 1.0}, "resample",
               {"name": "steer", "alpha": 1.0, "vector": "v.pt"}):
        with pytest.raises(SpecError, match="does not read the source run"):
            cross_spec(["layers[0].resid_pre"], ["last"], [op])


def test_refuses_baseline_interventions_with_a_source_model():
    with pytest.raises(SpecError, match="does not combine with `baseline`"):
        cross_spec(["layers[0].resid_pre"], ["last"], ["replace"], same_prompt=True,
                   baseline=[{"sites": ["embed"], "operation": {"name": "noise", "scale": 1.0}}])


def test_same_prompt_without_source_model_is_still_refused():
    data = cross_spec(["layers[0].resid_pre"], ["last"], ["replace"], same_prompt=True).to_dict()
    data.pop("source_model")
    with pytest.raises(SpecError, match="nothing to restore from"):
        StudySpec.from_dict(data)


@pytest.mark.parametrize("change", [{"n_layer": 2}, {"n_embd": 32}, {"n_head": 2}])
def test_refuses_other_sizes(tiny_gpt2, tokenizer, change):
    other = gpt2(tokenizer, 5, **change)
    study = Study(cross_spec(["layers[0].resid_pre"], ["last"], ["replace"]), model=tiny_gpt2, source_model=other)
    with pytest.raises(ClapError, match="source_model: the source model's .* cross-model patching needs the same"):
        study.run()


def test_refuses_another_architecture(tiny_gpt2, tiny_llama):
    study = Study(cross_spec(["layers[0].resid_pre"], ["last"], ["replace"]), model=tiny_gpt2,
                  source_model=tiny_llama)
    with pytest.raises(ClapError, match="model_type is 'llama', the target model's 'gpt2'"):
        study.run()


class Shifted:
    """A tokenizer that gives every token the next id: same vocabulary size, other token ids."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)

    def __call__(self, *args, **kwargs):
        out = self._tokenizer(*args, **kwargs)
        return {**out, "input_ids": [(i + 1) % len(self._tokenizer) for i in out["input_ids"]]}


def test_refuses_another_tokenizer(tiny_gpt2, tokenizer):
    source = gpt2(tokenizer, 6)
    source.tokenizer = Shifted(tokenizer)
    study = Study(cross_spec(["layers[0].resid_pre"], ["last"], ["replace"]), model=tiny_gpt2, source_model=source)
    with pytest.raises(ClapError, match="tokenizer gives probe fr other clean token ids"):
        study.run()


# -- the three front ends ------------------------------------------------------------------------------------------


def test_yaml_python_sweep_and_cli_give_identical_frames(model_dir, tokenizer, tmp_path, capsys):
    """`source_model:` in YAML, `Study(..., source_model=...)`, `cross_model_sweep` and `clap patch --source-model`
    compute the same frame; the CLI refuses an operation that cannot read another model with exit code 2."""
    import pandas as pd

    from clap.app.cli import main
    from clap.models import load_model
    from interventions import cross_model_sweep

    other = tmp_path / "other-model"
    source = gpt2(tokenizer, 31)
    source.hf.save_pretrained(other)
    tokenizer.save_pretrained(other)
    (tmp_path / "probes.jsonl").write_text("".join(
        __import__("json").dumps({**{k: v for k, v in p.items() if k != "labels"}, **p["labels"]}) + "\n"
        for p in CROSS_PROBES))
    base = f"""model: {{source: {model_dir}}}
probes: {{file: probes.jsonl}}
sites: ["layers[*].resid_pre", "layers[0].heads[1]"]
positions: [last]
metrics: [logit_diff, prob]
corrupted_prompt: clean
execution: {{progress: false}}
"""
    (tmp_path / "plain.yaml").write_text(base.replace("corrupted_prompt: clean\n", ""))
    (tmp_path / "cross.yaml").write_text(base + f"source_model: {{source: {other}}}\n")
    from_yaml = Study.from_yaml(tmp_path / "cross.yaml").run(tmp_path / "yaml")
    target, loaded = load_model(str(model_dir)), load_model(str(other))
    from_python = Study(StudySpec.from_yaml(tmp_path / "plain.yaml").model_copy(update={"corrupted_prompt": "clean"}),
                        model=target, source_model=loaded).run()
    from_sweep = cross_model_sweep(target, loaded, CROSS_PROBES, ["layers[*].resid_pre", "layers[0].heads[1]"],
                                   positions=["last"], same_prompt=True, metrics=["logit_diff", "prob"])
    assert main(["patch", str(tmp_path / "cross.yaml"), "-o", str(tmp_path / "cli"), "--no-progress"]) == 0
    plain = str(tmp_path / "plain.yaml")
    columns = ["probe_id", "site", "metric", "clean", "corrupted", "patched", "source_model_clean", "recovery"]
    for frame in (from_python, from_sweep, pd.read_parquet(tmp_path / "cli" / "results.parquet")):
        pd.testing.assert_frame_equal(frame[columns].reset_index(drop=True),
                                      from_yaml[columns].reset_index(drop=True))
    assert from_yaml.recovery_defined.any()
    # paired prompts: the flag equals the Python API
    assert main(["patch", plain, "-o", str(tmp_path / "flag"), "--no-progress", "--source-model", str(other)]) == 0
    paired = Study(StudySpec.from_yaml(plain), model=target, source_model=loaded).run()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "flag" / "results.parquet")[columns],
                                  paired[columns])
    assert not paired.patched.equals(from_yaml.patched)
    (tmp_path / "zero.yaml").write_text(base.replace("positions: [last]", "positions: [last]\noperations: [zero]"))
    capsys.readouterr()
    assert main(["patch", str(tmp_path / "zero.yaml"), "-o", str(tmp_path / "zero"), "--source-model", plain]) == 2
    assert "operation 'zero' does not read the source run" in capsys.readouterr().err


def test_models_that_answer_alike_are_refused(tiny_gpt2, tokenizer):
    """A source model with the target's weights: every recovery denominator is 0, and the study says so."""
    twin = gpt2(tokenizer, 1234)  # the conftest's seed: the same weights
    study = Study(cross_spec(["layers[0].resid_pre"], ["last"], ["replace"], same_prompt=True), model=tiny_gpt2,
                  source_model=twin)
    with pytest.raises(ClapError, match="the two models answer alike"):
        study.run()


def test_python_api_source_model_follows_the_spec_rules(pairs):
    target, source = pairs["gpt2"]
    data = cross_spec(["layers[0].resid_pre"], ["last"], ["replace"]).to_dict()
    data.pop("source_model")
    data["operations"] = [{"name": "zero"}]
    with pytest.raises(SpecError, match="source_model: operation 'zero' does not read the source run"):
        Study(StudySpec.from_dict(data), model=target, source_model=source)


def test_attribution_with_a_source_model_is_refused_with_its_own_reason():
    spec = {"model": {"source": "a"}, "source_model": {"source": "b"}, "probes": {"inline": CROSS_PROBES},
            "sites": ["layers[0].resid_pre"], "operations": ["attribution"]}
    with pytest.raises(SpecError, match="estimates a patch within one model"):
        StudySpec.from_dict(spec)
