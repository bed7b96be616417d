"""Cross-model patching on real weights: SmolLM2-135M-Instruct fine-tuned on epilepsy abstracts
(``smollm2-135m-epilepsy``, the shipped LoRA adapter merged) patched into the base model (``smollm2-135m``), for
shipped probes at a few layers, equals plain-PyTorch-hook patching to 2e-5: float32 rounding alone (a batched,
left-padded forward vs one unpadded prompt) differs by up to 1.5e-5 at logit differences near 10 (measured; 7.6e-6
with paired prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import load_smollm2_or_skip

pytestmark = pytest.mark.slow

PROBE_DIR = Path(__file__).resolve().parents[2] / "clap" / "data" / "probes"
SITES = {  # written out by hand (Llama module names)
    "layers[3].resid_pre": ("model.layers.3", "input", None),
    "layers[15].resid_pre": ("model.layers.15", "input", None),
    "layers[12].attn_out": ("model.layers.12.self_attn", "output", None),
    "layers[20].mlp_out": ("model.layers.20.mlp", "output", None),
    "layers[15].heads[3]": ("model.layers.15.self_attn.o_proj", "input", 3),
}
NAMES = {"layers[3].resid_pre": "layers.3.resid_pre", "layers[15].resid_pre": "layers.15.resid_pre",
         "layers[12].attn_out": "layers.12.attn_out", "layers[20].mlp_out": "layers.20.mlp_out",
         "layers[15].heads[3]": "layers.15.heads.3"}
TOL = 2e-5


@pytest.fixture(scope="module")
def models():
    return load_smollm2_or_skip("smollm2-135m"), load_smollm2_or_skip("smollm2-135m-epilepsy")


def shipped_probes() -> list[dict]:
    rows = []
    for name, n in (("definitional.jsonl", 2), ("associative.jsonl", 1)):
        lines = (PROBE_DIR / name).read_text(encoding="utf-8").splitlines()[:n]
        for line in lines:
            p = json.loads(line)
            rows.append({k: p[k] for k in ("id", "clean", "corrupted", "answer", "wrong")})
    return rows


@pytest.mark.parametrize("same_prompt", [False, True], ids=["paired", "same-prompt"])
def test_finetuned_into_base_equals_hooks(models, same_prompt):
    base, tuned = models
    assert base.identity["weights_fingerprint"] != tuned.identity["weights_fingerprint"]
    probes = shipped_probes()
    spec = StudySpec.from_dict({
        "model": {"source": "smollm2-135m"}, "source_model": {"source": "smollm2-135m-epilepsy"},
        "probes": {"inline": probes}, "sites": list(SITES), "positions": ["last"], "metrics": ["logit_diff"],
        "corrupted_prompt": "clean" if same_prompt else "probe", "recovery_epsilon": 0,
        "execution": {"progress": False, "remote": "local"},
    })
    frame = Study(spec, model=base, source_model=tuned).run()
    tok = base.tokenizer
    n_heads = base.hf.config.num_attention_heads
    worst = 0.0
    for probe in probes:
        clean = tok(probe["clean"])["input_ids"]
        target = clean if same_prompt else tok(probe["corrupted"])["input_ids"]
        answer = tok(probe["answer"], add_special_tokens=False)["input_ids"]
        wrong = tok(probe["wrong"], add_special_tokens=False)["input_ids"]

        def ld(logits, answer=answer, wrong=wrong):
            return float(logits[answer].mean() - logits[wrong].mean())

        base_target, tuned_clean = ld(ref.run(base.hf, target)), ld(ref.run(tuned.hf, clean))
        for address, (path, access, head) in SITES.items():
            heads = n_heads if head is not None else None
            values = ref.source_values(ref.capture(tuned.hf, clean, path, access), [len(clean) - 1], head, heads)
            edit = ref.replace_edit(values, [len(target) - 1], head, heads)
            patched = ld(ref.run(base.hf, target, [(path, access, edit)]))
            row = frame[(frame.probe_id == probe["id"]) & (frame.site == NAMES[address])].iloc[0]
            for got, want in ((row.patched, patched), (row.corrupted, base_target),
                              (row.source_model_clean, tuned_clean)):
                worst = max(worst, abs(got - want))
                assert got == pytest.approx(want, abs=TOL), (probe["id"], address)
            rec = (patched - base_target) / (tuned_clean - base_target)
            assert row.recovery == pytest.approx(rec, abs=4 * TOL * (1 + abs(rec)) / abs(tuned_clean - base_target))
    print(f"largest difference from the hook reference: {worst:.2e}")
