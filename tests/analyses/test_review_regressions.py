"""Regressions from review: data without variance and mixed raw-module roles give clear errors, not crashes."""

from __future__ import annotations

import pytest

from analyses import friedman, mixed_anova, pairwise_within, rm_anova
from analyses.io import save_results
from analyses.synthetic import make_meta, make_results
from clap.app.cli import main
from clap.errors import ClapError


def constant_results():
    data = make_results(n_probes=6, n_layers=4, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        trivial_sites=False, seed=3)
    data["recovery"] = 0.0  # e.g. a patched token the clean and corrupted prompts share: exactly no effect
    return data


@pytest.mark.parametrize("test", [rm_anova, friedman, pairwise_within])
def test_no_variance_is_a_clear_error(test):
    with pytest.raises(ClapError, match="do not vary"):
        test(constant_results(), dv="recovery", within="layer", subject="probe_id", metric="logit_diff")


def test_no_variance_mixed_anova():
    with pytest.raises(ClapError, match="do not vary"):
        mixed_anova(constant_results(), dv="recovery", within="layer", between="knowledge_type",
                    subject="probe_id", metric="logit_diff")


def test_analyze_records_the_untestable_slice_instead_of_crashing(tmp_path):
    data = constant_results()
    save_results(data, make_meta(data, group_columns=["knowledge_type"]), tmp_path)
    assert main(["analyze", str(tmp_path), "--no-figures"]) == 0
    skipped = (tmp_path / "analysis" / "skipped.csv").read_text()
    assert "do not vary" in skipped


def test_raw_modules_of_different_roles_are_not_one_layer_effect():
    data = make_results(n_probes=6, n_layers=2, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        trivial_sites=False, seed=4)
    data["site_kind"] = "module"
    data["module"] = data["layer"].map({0: "transformer.h.0.mlp", 1: "transformer.h.1.attn.c_attn"})
    with pytest.raises(ClapError, match="different roles"):
        rm_anova(data, dv="recovery", within="layer", subject="probe_id", metric="logit_diff")
    data["module"] = data["layer"].map({0: "transformer.h.0.mlp", 1: "transformer.h.1.mlp"})
    assert rm_anova(data, dv="recovery", within="layer", subject="probe_id", metric="logit_diff").F.notna().all()
