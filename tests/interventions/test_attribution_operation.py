"""Operation `attribution` in a study spec: its rows equal `attribution_sweep` (itself checked against plain autograd in
test_attribution.py), the exact rows beside them equal the same spec without it, refusals name file and line, and
`clap patch` / `clap report` carry the rows through to the report."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from clap.app.cli import main
from clap.errors import ClapError
from interventions import operations
from interventions.attribution import attribution_sweep
from interventions.output import read_results
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES
from .test_cli import write_spec

RESID = ["layers[*].resid_pre"]
LAST = ["layers[*].attn_out", "layers[*].mlp_out", "layers[*].heads[*]"]
KEYS = ["probe_id", "site", "positions", "position"]


def mixed_spec(ops, direction="denoising", **extra) -> StudySpec:
    """Residual stream at every position, attention / MLP outputs and heads at the last one."""
    return StudySpec.from_dict({
        "model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"}, "sites": RESID,
        "positions": ["each"], "patches": [{"sites": LAST, "positions": ["last"]}], "operations": ops,
        "direction": direction, "metrics": ["logit_diff"], "execution": {"progress": False}, **extra})


@pytest.mark.parametrize("family, direction", [("gpt2", "denoising"), ("llama", "noising")])
def test_replace_and_attribution_in_one_spec(family, direction, tiny_gpt2, tiny_llama):
    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    frame = Study(mixed_spec(["replace", "attribution"], direction), model=model).run()
    approx = frame[frame["operation"] == "attribution"]
    exact = frame[frame["operation"] == "replace"]
    assert set(frame["operation"]) == {"replace", "attribution"} and frame["approximate"].dtype == bool
    assert approx["approximate"].all() and not exact["approximate"].any()

    # the attribution rows are the sweep's, cell for cell
    sweep = pd.concat([
        attribution_sweep(model, PROBES, RESID, positions=["each"], direction=direction, multi_token="set"),
        attribution_sweep(model, PROBES, LAST, positions=["last"], direction=direction, multi_token="set"),
    ])
    merged = approx.merge(sweep, on=KEYS, suffixes=("", "_sweep"))
    assert len(merged) == len(approx) == len(sweep)
    for column in ("effect", "patched", "clean", "corrupted"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_sweep"], atol=1e-6)
    np.testing.assert_allclose(merged["recovery"], merged["recovery_sweep"], atol=1e-6, equal_nan=True)
    assert (merged["trivial"] == merged["trivial_sweep"]).all()
    assert (approx["window"] == 1).all() and (approx["sample"] == 0).all()

    # the exact rows are those of the same spec without `attribution` (which has no `approximate` column)
    alone = Study(mixed_spec(["replace"], direction), model=model).run()
    assert "approximate" not in alone.columns
    both = exact.merge(alone, on=KEYS, suffixes=("", "_alone"))
    assert len(both) == len(exact) == len(alone)
    np.testing.assert_allclose(both["patched"], both["patched_alone"], atol=1e-6)
    # every site kind asked for, and the baselines the two paths share
    assert set(approx["site_kind"]) == {"resid_pre", "attn_out", "mlp_out", "head"}
    np.testing.assert_allclose(merged.sort_values(KEYS)["clean"],
                               exact.merge(approx[KEYS], on=KEYS).sort_values(KEYS)["clean"], atol=1e-5)


def test_attribution_named_by_one_group_only(tiny_gpt2):
    """A group's own `operations: [attribution]` estimates that group alone; a spec with only attribution cells
    runs too (no exact batch)."""
    spec = StudySpec.from_dict({
        "model": {"source": "tiny"}, "probes": {"inline": PROBES, "multi_token": "set"},
        "sites": ["layers[1].mlp_out"], "positions": ["last"], "operations": ["zero"],
        "patches": [{"sites": ["layers[*].heads[*]"], "operations": ["attribution"]}],
        "execution": {"progress": False}})
    frame = Study(spec, model=tiny_gpt2).run()
    assert dict(frame.groupby("operation")["site_kind"].unique().apply(set)) == {
        "zero": {"mlp_out"}, "attribution": {"head"}}
    assert len(frame[frame["operation"] == "attribution"]) == len(PROBES) * 3 * 4
    only = StudySpec.from_dict({**spec.to_dict(), "sites": None, "operations": ["attribution"],
                                "patches": [{"sites": ["layers[*].heads[*]"]}]})
    frame_only = Study(only, model=tiny_gpt2).run()
    assert (frame_only["operation"] == "attribution").all() and frame_only["approximate"].all()
    np.testing.assert_allclose(frame_only.sort_values(KEYS)["effect"],
                               frame[frame["operation"] == "attribution"].sort_values(KEYS)["effect"], atol=1e-9)


def test_registered_as_approximate():
    op = operations.get("attribution")
    assert op.approximate and op.copies_source
    assert not any(o.approximate for name, o in operations.REGISTRY.items() if name != "attribution")
    with pytest.raises(NotImplementedError, match="gradient path"):
        op.compile(None)


YAML = """\
model: {source: tiny}
probes:
  inline:
    - {clean: "The capital of France is", corrupted: "The capital of Spain is", answer: " Paris", wrong: " Madrid"}
sites: ["SITE"]
operations: [replace, attribution]
"""


@pytest.mark.parametrize("extra, site, where", [
    ("metrics: [logit_diff, prob]\n", "layers[*].mlp_out", r"study\.yaml:7: metrics: .*logit_diff only; remove prob"),
    ("baseline: [{sites: [embed], operation: {name: noise, scale: 1}}]\n", "layers[*].mlp_out",
     r"study\.yaml:7: baseline: .*baseline intervention"),
    ("samples: 2\npatches: [{sites: [embed], operations: [{name: noise, scale: 1}]}]\n", "layers[*].mlp_out",
     r"study\.yaml:7: samples: .*must be 1"),
    ("patches: [{sites: ['layers[*].mlp_out'], window: 3}]\n", "layers[0].mlp_out",
     r"study\.yaml:7: patches\[0\]\.window: .*one site at a time"),
    ("patches: [{sites: ['layers[*].mlp_out'], combine: true}]\n", "layers[0].mlp_out",
     r"study\.yaml:7: patches\[0\]\.combine: .*one site at a time"),
    ("", "transformer.wte:input", r"study\.yaml:5: sites\[0\]: .*token ids, which have no gradient"),
])
def test_refusals_name_file_and_line(tmp_path, tiny_gpt2, extra, site, where):
    path = tmp_path / "study.yaml"
    path.write_text(YAML.replace("SITE", site) + extra)
    study = Study.from_yaml(path, model=tiny_gpt2)
    with pytest.raises(ClapError, match=where) as error:
        study.run()
    if not site.endswith(":input"):  # spec-level refusals also say where attribution was named
        assert str(error.value).endswith("(operation `attribution` at line 6: operations[1])")


def test_attribution_takes_only_steps(tmp_path):
    """`steps` (integration points, >= 1) is the operation's one field; other operations refuse it."""
    path = tmp_path / "study.yaml"
    text = YAML.replace("SITE", "layers[*].mlp_out")
    path.write_text(text.replace("[replace, attribution]", "[replace, {name: attribution, alpha: 0.5}]"))
    with pytest.raises(ClapError, match=r"study\.yaml:6: operations\.1.*`alpha`.*not 'attribution'"):
        StudySpec.from_yaml(path)
    path.write_text(text.replace("[replace, attribution]", "[replace, {name: attribution, steps: 0}]"))
    with pytest.raises(ClapError, match=r"study\.yaml:6: operations\.1\.steps.*greater than or equal to 1"):
        StudySpec.from_yaml(path)
    path.write_text(text.replace("[replace, attribution]", "[{name: replace, steps: 3}, attribution]"))
    with pytest.raises(ClapError, match=r"`steps` only applies to operation `attribution`, not 'replace'"):
        StudySpec.from_yaml(path)
    path.write_text(text.replace("[replace, attribution]", "[replace, {name: attribution, steps: 3}]"))
    ops = StudySpec.from_yaml(path).all_operations()
    assert [op.label for op in ops] == ["replace", "attribution(ig3)"]
    assert operations.get("attribution").label(SimpleNamespace(steps=1)) == "attribution"


def test_groups_with_different_steps(tiny_gpt2):
    """Each group's `attribution` keeps its own `steps`: rows equal to the sweep with those steps, labelled apart."""
    spec = mixed_spec(["replace"])
    data = spec.model_dump(exclude_none=True)
    data["patches"] = [{"sites": RESID, "positions": ["each"], "operations": [{"name": "attribution", "steps": 3}]},
                       {"sites": LAST, "positions": ["last"], "operations": ["attribution"]}]
    del data["sites"], data["positions"]
    frame = Study(StudySpec.from_dict(data), model=tiny_gpt2).run()
    assert sorted(frame["operation"].unique()) == ["attribution", "attribution(ig3)"]
    for sites, positions, steps, label in ((RESID, ["each"], 3, "attribution(ig3)"), (LAST, ["last"], 1,
                                                                                         "attribution")):
        expected = attribution_sweep(tiny_gpt2, PROBES, sites, positions=positions, multi_token="set", steps=steps)
        mine = frame[frame["operation"] == label]
        merged = mine.merge(expected, on=KEYS)
        assert len(merged) == len(mine) == len(expected[expected["n_patched_tokens"] > 0])
        np.testing.assert_allclose(merged["effect_x"], merged["effect_y"], atol=1e-9)


def test_clap_patch_and_report(tmp_path, model_dir):
    """`clap patch` runs a spec naming attribution like any other; `clap report` labels its rows."""
    spec = write_spec(tmp_path, model_dir)
    text = spec.read_text().replace("operations: [replace, zero]",
                                    "operations: [replace, attribution, {name: attribution, steps: 3}]")
    spec.write_text(text.replace("metrics: [logit_diff, prob]", "metrics: [logit_diff]"))
    out = tmp_path / "out"
    assert main(["patch", str(spec), "-o", str(out), "--no-progress"]) == 0
    frame, _ = read_results(out)
    approx = frame[frame["approximate"]]
    assert len(approx) == 2 * len(frame) / 3
    assert sorted(approx["operation"].unique()) == ["attribution", "attribution(ig3)"]
    exact, estimated = (frame[frame["operation"] == op].set_index(KEYS) for op in ("replace", "attribution"))
    assert (exact["clean"] - estimated.loc[exact.index, "clean"]).abs().max() < 1e-5  # one model, two paths
    report = tmp_path / "report"
    assert main(["report", str(out), "-o", str(report), "--no-figures", "--n-boot", "100"]) == 0
    text = (report / "report.md").read_text()
    assert f"{len(approx)} of {len(frame)} rows are attribution-patching estimates" in text
    assert (f"{len(approx)} rows (operation `attribution`, `attribution(ig3)`) are attribution-patching estimates, "
            "not measurements: `attribution` is the first-order term") in text
    assert "`attribution(igK)` (K = 3) multiplies the same activation difference" in text
    assert "operation=attribution" in text and "operation=replace" in text


@pytest.mark.parametrize("steps, rows", [(1, 2), (3, 3), (4, 4)])
def test_max_rows_bounds_the_path_rows(tiny_gpt2, monkeypatch, steps, rows):
    """`execution.max_rows` bounds a pass's rows with the path's extra rows counted (equal-length pairs: the two
    ends are the target and source rows); the numbers do not depend on it."""
    from interventions import attribution

    seen = []
    original = attribution._run_chunk

    def recording(model, chunk, *args, **kwargs):
        seen.append(chunk.input_ids.shape[0])
        return original(model, chunk, *args, **kwargs)

    monkeypatch.setattr(attribution, "_run_chunk", recording)
    bounded = Study(mixed_spec([{"name": "attribution", "steps": steps}], execution={"progress": False,
                                                                                   "max_rows": 2 * rows}),
                    model=tiny_gpt2).run()
    assert seen == [2 * rows, rows]  # 3 probes: two per pass, then one
    seen.clear()
    whole = Study(mixed_spec([{"name": "attribution", "steps": steps}]), model=tiny_gpt2).run()
    assert seen == [3 * rows]
    merged = bounded.merge(whole, on=KEYS)
    assert len(merged) == len(whole)
    np.testing.assert_allclose(merged["effect_x"], merged["effect_y"], atol=1e-6)
