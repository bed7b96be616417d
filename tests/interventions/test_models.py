"""Models as the engine loads them: ``remote: true`` builds the model on the meta device, without weights."""

from __future__ import annotations

import pytest


def test_remote_model_is_built_on_meta_without_weights_and_resolves_sites(model_dir):
    """remote: true never loads weights locally; the site machinery still works on the meta device."""
    from clap.models import load_remote_model
    from interventions.sites import SiteResolver

    model = load_remote_model(str(model_dir))
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}
    assert model.identity["weights_fingerprint"] is None and model.identity["architecture"] == "GPT2LMHeadModel"
    sites = SiteResolver(model.hf).resolve(["unembed", "layers[*].heads[0]", "layers[0].resid_pre"])
    assert [s.name for s in sites] == ["layers.0.resid_pre", "layers.0.heads.0", "layers.1.heads.0",
                                       "layers.2.heads.0", "unembed"]
    assert model.tokenizer.padding_side == "left"


def test_study_loads_the_tokenizer_from_the_resolved_model_unless_one_is_named(monkeypatch, tmp_path):
    """Regression: with no ``model.tokenizer`` the tokenizer must come from the resolved model location, not from
    ``model.source`` read as a hub id (a built-in name such as ``smollm2-135m`` then went to the network)."""
    from interventions import resolved as resolved_module
    from interventions.spec import StudySpec
    from interventions.study import Study

    seen = []

    def fake_load_model(source, **kwargs):
        seen.append(kwargs.get("tokenizer"))
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(resolved_module, "load_model", fake_load_model)
    probes = [{"id": "a", "clean": "x y", "corrupted": "x z", "answer": " y", "wrong": " z"}]
    for model, expected in (({"source": "smollm2-135m"}, None),
                            ({"source": "smollm2-135m", "tokenizer": "my-tokenizer"}, "my-tokenizer")):
        spec = StudySpec.from_dict({"model": model, "probes": {"inline": probes}, "sites": ["layers[0].resid_pre"]})
        with pytest.raises(RuntimeError, match="stop after recording"):
            Study(spec).model  # noqa: B018 - the property loads the model
        assert seen[-1] == expected
