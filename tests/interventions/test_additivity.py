"""The additivity check's joint patches and the clean-run ablations equal plain PyTorch hooks (reference.py) to 1e-5
on tiny GPT-2 and Llama: cumulative stacks of attention / MLP outputs from the bottom and from the top, each probe's
top-m layers together and pairs among its top layers (the sets derived from the single-layer results), and zero,
mean and resample ablation of a head and of a layer's attention / MLP output on the clean run."""

from __future__ import annotations

import pytest
import torch

from clap.errors import ClapError
from interventions.derived import AblationSection, AdditivitySection, ablation_spec, additivity_spec
from interventions.spec import StudySpec
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES
from .test_compose import PATHS, family

TOL = 1e-5
#: equal-length pairs; the tiny tokenizer makes each word one token (three probes of three lengths)
AB_PROBES = [{k: p[k] for k in ("id", "clean", "corrupted", "answer", "wrong")} for p in PROBES]
for _p in AB_PROBES:
    _p["answer"] = _p["answer"] if isinstance(_p["answer"], str) else _p["answer"][0]


def _spec(**fields) -> StudySpec:
    return StudySpec.from_dict({"model": {"source": "in-memory"}, "probes": {"inline": AB_PROBES},
                                "metrics": ["logit_diff"], "recovery_epsilon": 0,
                                "execution": {"progress": False, "max_rows": 16}, **fields})


def _logit_diff(logits, answer, wrong) -> float:
    return float(logits[answer].mean() - logits[wrong].mean())


def test_joint_patches_equal_hooks(tiny_model):
    hf, paths = tiny_model.hf, PATHS[family(tiny_model)]
    n_layers = hf.config.num_hidden_layers
    spec = _spec(patches=[{"sites": ["layers[*].attn_out", "layers[*].mlp_out"], "positions": ["last"]}])
    singles = Study(spec, model=tiny_model).run()
    section = AdditivitySection(top=[2, 3], pairs=3)
    joint_spec, design = additivity_spec(spec, singles, section, n_layers=n_layers)
    joint = Study(joint_spec, model=tiny_model).run()
    assert set(zip(design.probe_id, design.site, strict=True)) == set(zip(joint.probe_id, joint.site, strict=True))
    module = {"attn_out": paths["attn"], "mlp_out": paths["mlp"]}
    checked = 0
    for probe in AB_PROBES:
        clean, corrupted, answer, wrong = ref.probe_ids(tiny_model, probe)
        last = len(corrupted) - 1
        rows = singles[singles.probe_id == probe["id"]]
        for kind in ("attn_out", "mlp_out"):
            # the design's top layers, by hand from the single-layer recoveries
            rec = rows[rows.site_kind == kind].set_index("layer").recovery.sort_index()
            order = sorted(range(n_layers), key=lambda layer, rec=rec: (-rec[layer], layer))
            mine = design[(design.probe_id == probe["id"]) & (design.site_kind == kind)]
            top = mine[mine.family == "top_m"].set_index("k").layers
            assert top[2] == ",".join(map(str, sorted(order[:2]))) and top[3] == "0,1,2"
            assert sorted(mine[mine.family == "pair"].layers) == ["0,1", "0,2", "1,2"]
            for entry in mine.itertuples():
                layers = [int(v) for v in entry.layers.split(",")]
                patches = []
                for layer in layers:
                    path = module[kind].format(layer)
                    act = ref.capture(hf, clean, path, "output")
                    patches.append((path, "output", ref.replace_edit(act[[last]], [last], None, None)))
                expected = _logit_diff(ref.run(hf, corrupted, patches), answer, wrong)
                row = joint[(joint.probe_id == probe["id"]) & (joint.site == entry.site)]
                assert len(row) == 1, entry.site
                assert row.patched.iloc[0] == pytest.approx(expected, abs=TOL), (probe["id"], entry.site)
                assert row["window"].iloc[0] == len(layers)
                checked += 1
    # per probe and kind: 2 x 3 cumulative stacks (one shared by bottom and top: all layers), top-2, top-3, 3 pairs
    assert checked == 3 * 2 * (6 + 2 + 3)
    bottom = joint[joint.site == "layers[0:2].mlp_out"]
    assert (bottom.layer == 1).all()  # a cumulative stack is reported at its varying end


def test_cumulative_refuses_the_residual_stream_and_unknown_probes(tiny_gpt2):
    spec = _spec(patches=[{"sites": ["layers[*].resid_pre"], "cumulative": "bottom"}])
    with pytest.raises(ClapError, match="cumulative.*resid_pre.*last layer's patch"):
        Study(spec, model=tiny_gpt2).plan()
    spec = _spec(patches=[{"sites": ["layers[0].mlp_out"], "probes": ["frr"]}])
    with pytest.raises(ClapError, match="patches\\[0\\].probes: no probe 'frr' in the study; did you mean 'fr'"):
        Study(spec, model=tiny_gpt2).plan()
    with pytest.raises(ClapError, match="`cumulative` excludes `window` and `combine`"):
        _spec(patches=[{"sites": ["layers[*].mlp_out"], "cumulative": "top", "combine": True}])
    with pytest.raises(ValueError, match="resid_pre: a residual-stream state"):
        AdditivitySection(kinds=["resid_pre"])


def test_additivity_needs_single_layer_rows(tiny_gpt2):
    spec = _spec(patches=[{"sites": ["layers[*].attn_out"], "positions": ["last"]}])
    singles = Study(spec, model=tiny_gpt2).run()
    with pytest.raises(ClapError, match="no single-layer `replace` rows of mlp_out"):
        additivity_spec(spec, singles, AdditivitySection(kinds=["mlp_out"]))
    with pytest.raises(ClapError, match="lack layers 1"):
        additivity_spec(spec, singles[singles.layer != 1], AdditivitySection(kinds=["attn_out"]))


def _derangement(n: int, seed: int) -> list[int]:
    """The documented resample sources: torch.randperm under a generator seeded by the study's seed, redrawn until
    no probe draws itself."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        if all(i != j for i, j in enumerate(perm)):
            return perm


def test_clean_run_ablations_equal_hooks(tiny_model):
    """Zero, mean and resample ablation at the last token of head 1 of layer 1 and of every layer's attention and MLP
    output, on the clean prompt (no corrupted prompt): each ablated logit difference and its change from the clean
    run against hooks."""
    hf, paths, tok = tiny_model.hf, PATHS[family(tiny_model)], tiny_model.tokenizer
    n_heads = hf.config.num_attention_heads
    base = _spec(seed=5, patches=[{"sites": ["layers[0].attn_out"]}])
    spec = ablation_spec(base, AblationSection(sites=["layers[1].heads[1]", "layers[*].attn_out",
                                                      "layers[*].mlp_out"]))
    assert spec.corrupted_prompt == "clean" and spec.ablates_clean_run
    frame = Study(spec, model=tiny_model).run()
    assert not frame.recovery_defined.any()
    proj = {"gpt2": "transformer.h.{}.attn.c_proj", "llama": "model.layers.{}.self_attn.o_proj"}[family(tiny_model)]
    sites = {"layers.1.heads.1": (proj.format(1), "input", 1)}
    for layer in range(hf.config.num_hidden_layers):
        sites[f"layers.{layer}.attn_out"] = (paths["attn"].format(layer), "output", None)
        sites[f"layers.{layer}.mlp_out"] = (paths["mlp"].format(layer), "output", None)
    ids = [ref.probe_ids(tiny_model, p) for p in AB_PROBES]
    sources = _derangement(len(AB_PROBES), 5)
    checked = 0
    for site, (path, access, head) in sites.items():
        last_acts = [ref.source_values(ref.capture(hf, clean, path, access), [len(clean) - 1], head, n_heads)[0]
                     for clean, _, _, _ in ids]
        mean = torch.stack(last_acts).double().mean(0).float()
        for p, probe in enumerate(AB_PROBES):
            clean, _, answer, wrong = ids[p]
            last = len(clean) - 1
            clean_ld = _logit_diff(ref.run(hf, clean), answer, wrong)
            values = {"zero": torch.zeros_like(mean), "mean": mean, "resample": last_acts[sources[p]]}
            for op, value in values.items():
                edit = ref.replace_edit(value[None], [last], head, n_heads)
                expected = _logit_diff(ref.run(hf, clean, [(path, access, edit)]), answer, wrong)
                row = frame[(frame.probe_id == probe["id"]) & (frame.site == site) & (frame.operation == op)]
                assert len(row) == 1
                assert row.patched.iloc[0] == pytest.approx(expected, abs=TOL), (site, op, probe["id"])
                assert row.clean.iloc[0] == pytest.approx(clean_ld, abs=TOL)
                assert row.effect.iloc[0] == pytest.approx(expected - clean_ld, abs=TOL)
                checked += 1
    assert checked == (1 + 2 * hf.config.num_hidden_layers) * 3 * 3
    # the resampled token is the other probe's last token
    vpa = frame[(frame.probe_id == "vpa") & (frame.operation == "resample")].source_token.iloc[0]
    assert vpa == tok.decode([ids[sources[2]][0][-1]])


def test_ablation_section_refuses_restores_and_resample_is_allowed_without_corruption():
    with pytest.raises(ValueError, match="operation 'replace' does not ablate"):
        AblationSection(operations=["replace"])
    spec = _spec(corrupted_prompt="clean", alignment="right", sites=["layers[0].mlp_out"], operations=["resample"])
    assert spec.ablates_clean_run
    with pytest.raises(ClapError, match="nothing to restore from"):
        _spec(corrupted_prompt="clean", sites=["layers[0].mlp_out"], operations=["replace"])
