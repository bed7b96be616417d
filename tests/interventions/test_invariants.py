"""Invariants every patching engine must satisfy, whatever the weights."""

from __future__ import annotations

import numpy as np

from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


def run(model, sites, positions, operations=("replace",), metrics=("logit_diff", "logit", "kl")):
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": PROBES}, "sites": sites,
        "positions": positions, "operations": list(operations), "metrics": list(metrics),
        "execution": {"progress": False, "remote": "local"},  # every plan must survive NDIF serialisation
    })
    return Study(spec, model=model).run()


def test_patching_the_whole_final_residual_stream_recovers_everything(tiny_model):
    last = tiny_model.hf.config.num_hidden_layers - 1
    frame = run(tiny_model, [f"layers[{last}].resid_post", "final_norm", "unembed"], ["all", "last"])
    defined = frame[frame.recovery_defined]
    assert len(defined) == len(frame) > 0
    np.testing.assert_allclose(defined.recovery.to_numpy(), 1.0, atol=1e-4)
    assert frame.trivial.all()


def test_patching_nothing_recovers_nothing(tiny_model):
    frame = run(tiny_model, ["layers[*].resid_pre", "layers[0].heads[*]"], ["none"])
    assert (frame.n_patched_tokens == 0).all()
    np.testing.assert_allclose(frame.patched.to_numpy(), frame.corrupted.to_numpy(), atol=1e-5)
    np.testing.assert_allclose(frame.recovery.to_numpy(), 0.0, atol=1e-4)
    assert not frame.trivial.any()


def test_replacing_lm_head_output_recovers_one_and_is_flagged(tiny_gpt2):
    frame = run(tiny_gpt2, ["lm_head", "layers[0].mlp_out"], ["last"])
    head = frame[frame.site == "lm_head"]
    assert set(head.site_kind) == {"unembed"}
    np.testing.assert_allclose(head.recovery.to_numpy(), 1.0, atol=1e-5)
    assert head.trivial.all()
    assert not frame[frame.site == "layers.0.mlp_out"].trivial.any()


def test_patching_a_non_final_position_of_the_last_layer_is_not_trivial(tiny_gpt2):
    frame = run(tiny_gpt2, ["layers[2].resid_post", "unembed"], [0])
    assert not frame.trivial.any()
    # the final position reads only its own residual stream at the last layer: position 0 changes nothing
    np.testing.assert_allclose(frame.patched.to_numpy(), frame.corrupted.to_numpy(), atol=1e-5)


def test_resid_pre_of_layer_l_plus_one_equals_resid_post_of_layer_l(tiny_model):
    frame = run(tiny_model, ["layers[0].resid_post", "layers[1].resid_pre", "layers[0].block_out"], ["last", "all"])
    pivot = frame[frame.metric == "logit_diff"].pivot_table(index=["probe_id", "positions"], columns="site",
                                                             values="patched")
    np.testing.assert_allclose(pivot["layers.0.resid_post"], pivot["layers.1.resid_pre"], atol=1e-5)
    np.testing.assert_allclose(pivot["layers.0.resid_post"], pivot["layers.0.block_out"], atol=1e-6)


def test_result_schema_and_group_labels(tiny_gpt2):
    frame = run(tiny_gpt2, ["layers[1].heads[0:2]"], ["each"])
    required = ["probe_id", "knowledge_type", "site", "site_kind", "layer", "head", "position", "positions", "token",
                "operation", "direction", "metric", "clean", "corrupted", "patched", "recovery",
                "recovery_defined", "trivial"]
    assert list(frame.columns[:2]) == ["probe_id", "knowledge_type"]
    assert set(required) <= set(frame.columns)
    assert str(frame.layer.dtype) == "Int64" and str(frame.position.dtype) == "Int64"
    assert set(frame["head"].dropna()) == {0, 1}
    tok = tiny_gpt2.tokenizer
    fr = frame[(frame.probe_id == "fr") & (frame.metric == "logit_diff") & (frame["head"] == 0)].sort_values("position")
    ids = tok(PROBES[0]["corrupted"])["input_ids"]
    assert list(fr.position) == list(range(len(ids)))
    assert list(fr.token) == [tok.decode([i]) for i in ids]
    assert dict(zip(frame.probe_id, frame.knowledge_type, strict=True)) == {
        p["id"]: p["labels"]["knowledge_type"] for p in PROBES}


def test_match_positions_cover_the_subject_tokens(tiny_gpt2):
    probes = [{"id": "ep", "clean": "Epilepsy is a chronic disorder of the",
               "corrupted": "Migraine is a chronic disorder of the", "answer": " brain", "wrong": " head"}]
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": probes}, "sites": ["layers[0].resid_pre"],
        "positions": [{"match": "Epilepsy"}, {"match": "chronic"}], "metrics": ["logit_diff"],
        "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    tok = tiny_gpt2.tokenizer
    subject = frame[frame.positions == "match:Epilepsy"].iloc[0]
    n_subject = len(tok("Epilepsy")["input_ids"])
    assert subject.n_patched_tokens == n_subject
    assert subject.token == "Migraine"  # the target (corrupted) prompt's tokens at those positions
    assert subject.source_token == "Epilepsy"
    chronic = frame[frame.positions == "match:chronic"].iloc[0]
    assert chronic.token == " chronic" and chronic.position == n_subject + 2


def test_right_alignment_patches_matching_positions_from_the_end(tiny_gpt2):
    probes = [{"id": "uneven", "clean": "Valproate sodium treats", "corrupted": "Insulin treats",
               "answer": " seizures", "wrong": " pain"}]
    n_clean, n_corrupted = (len(tiny_gpt2.tokenizer(probes[0][k])["input_ids"]) for k in ("clean", "corrupted"))
    assert n_clean > n_corrupted
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": probes}, "sites": ["layers[2].resid_post"],
        "positions": ["last", "all"], "alignment": "right", "metrics": ["logit_diff"],
        "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    np.testing.assert_allclose(frame.recovery.to_numpy(), 1.0, atol=1e-4)
    assert frame.set_index("positions").n_patched_tokens.to_dict() == {"last": 1, "all": n_corrupted}


def test_patch_groups_have_their_own_positions_and_merge_duplicates(tiny_gpt2):
    spec = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": PROBES}, "metrics": ["logit_diff"],
        "sites": ["layers[*].mlp_out"], "positions": ["last"],
        "patches": [
            {"sites": ["layers[*].resid_pre"], "positions": ["each"]},
            {"sites": ["layers[0].mlp_out"], "positions": ["last"], "operations": ["replace", "zero"]},
        ],
        "execution": {"progress": False},
    })
    frame = Study(spec, model=tiny_gpt2).run()
    lengths = {p["id"]: len(tiny_gpt2.tokenizer(p["corrupted"])["input_ids"]) for p in PROBES}
    resid = frame[frame.site_kind == "resid_pre"]
    assert len(resid) == 3 * sum(lengths.values())
    mlp = frame[frame.site_kind == "mlp_out"]
    assert set(mlp.positions) == {"last"}
    # layers.0.mlp_out/last/replace appears in both groups but is run and reported once
    assert len(mlp) == len(PROBES) * (3 + 1)
    assert not frame.duplicated(["probe_id", "site", "positions", "position", "operation", "metric"]).any()
