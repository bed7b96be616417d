"""The analysis: section (spec, run.json) and the command-line flags that override it."""

from __future__ import annotations

import pytest

from analyses.io import save_results
from analyses.options import resolve_options
from analyses.synthetic import make_meta, make_results
from clap.analysis_options import AnalysisOptions, parse_position_reduction
from clap.app.cli import main
from clap.errors import ClapError
from interventions.spec import StudySpec

SPEC = """
model: {source: gpt2}
probes: {inline: [{clean: "a b", corrupted: "c b", answer: " x", wrong: " y"}]}
sites: ["layers[*].resid_pre"]
analysis:
  position_reduction: %s
  head_reduction: sum
  require_flip: true
"""


def test_spec_accepts_and_validates_the_analysis_section(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC % "-1")
    spec = StudySpec.from_yaml(path)
    assert spec.analysis.position_reduction == -1 and spec.analysis.require_flip
    assert spec.to_dict()["analysis"]["position_reduction"] == -1  # recorded in run.json
    path.write_text(SPEC % "mean")
    with pytest.raises(ClapError, match="position_reduction"):
        StudySpec.from_yaml(path)


def test_flags_override_the_recorded_section():
    meta = {"spec": {"analysis": {"position_reduction": "max", "interval": "bca"}}}
    opts = resolve_options(meta, position_reduction="subject_last")
    assert opts.position_reduction == "subject_last" and opts.interval == "bca"
    assert resolve_options({}).position_reduction == "last" and resolve_options({}).head_reduction == "sum"
    with pytest.raises(ClapError, match=r"analysis option ss_type"):
        resolve_options(meta, ss_type=4)
    assert parse_position_reduction("3") == 3
    with pytest.raises(ClapError, match="--position-reduction mean: unknown position reduction"):
        parse_position_reduction("mean")
    assert AnalysisOptions().model_dump()["subject"] == "probe"


def test_cli_flags_reach_the_tables(tmp_path, capsys):
    data = make_results(n_probes=6, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",),
                        tokens=("a", " b", " c"))
    save_results(data, make_meta(data), tmp_path / "r")
    assert main(["analyze", str(tmp_path / "r"), "--no-figures", "--position-reduction", "max", "--interval", "t"]) == 0
    import pandas as pd

    rm = pd.read_csv(tmp_path / "r" / "analysis" / "rm_anova.csv")
    assert (rm["reduction"] == "max over positions").all()
    assert main(["analyze", str(tmp_path / "r"), "--no-figures", "--position-reduction", "middle"]) == 2
    assert "unknown position reduction 'middle'" in capsys.readouterr().err
