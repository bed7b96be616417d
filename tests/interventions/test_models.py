"""Models as the engine loads them: ``remote: true`` builds the model on the meta device, without weights."""

from __future__ import annotations


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
