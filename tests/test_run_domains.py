"""``clap run`` on probes of several domains (a ``topic`` label) with the additivity check: the cross-domain table is
written beside the model's analysis, equals a recomputation from the results folders (localization.py on each
domain's probes, the joint run's gaps by hand, composed probes paired with their parts) and is in both reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.localization import compare_localization, localization_measures
from clap.app.pipeline import run_study
from clap.contract import read_results
from tests.test_run import tokenizer  # noqa: F401 (fixture)

COUNTRIES = ["France", "Germany", "Italy", "Spain"]
CAPITALS = [" Paris", " Berlin", " Rome", " Madrid"]
N_LAYERS = 4


def probe(pid: str, noun: str, i: int, kind: str, topic: str, composes: list[str] | None = None) -> dict:
    """``The NOUN of COUNTRY is`` -> its capital; the corruption swaps the country for the next one (one token)."""
    x, y = i % 4, (i + 1) % 4
    return {"id": pid, "knowledge_type": kind, "topic": topic, "clean": f"The {noun} of {COUNTRIES[x]} is",
            "corrupted": f"The {noun} of {COUNTRIES[y]} is", "answer": CAPITALS[x], "wrong": CAPITALS[y],
            "composes": composes or []}


def domain_probes() -> tuple[list[dict], list[dict]]:
    """Two domains of definitional / associative probes (4 each) and a compositional one: 3 chains of two one-hop
    probes and the two-hop probe composing them."""
    nouns = {("geo", "definitional"): "capital city history land", ("geo", "associative"): "heart mind word story",
             ("med", "definitional"): "school family world light", ("med", "associative"): "water house name life"}
    plain = [probe(f"{t}-{k[:3]}-{i}", noun, i, k, t) for (t, k), words in nouns.items()
             for i, noun in enumerate(words.split())]
    chains = []
    for c, (first, second, composed) in enumerate([("people", "place", "group"), ("country", "part", "example"),
                                                   ("study", "question", "answer")]):
        chains += [probe(f"h1-{c}", first, c, "one_hop", "chain"), probe(f"h2-{c}", second, c + 1, "one_hop", "chain"),
                   probe(f"th-{c}", composed, c + 2, "two_hop", "chain", [f"h1-{c}", f"h2-{c}"])]
    return plain, chains


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):  # noqa: F811
    from transformers import GPT2Config, GPT2LMHeadModel

    for p in [*domain_probes()[0], *domain_probes()[1]]:
        assert len(tokenizer(p["clean"]).input_ids) == len(tokenizer(p["corrupted"]).input_ids)
    torch.manual_seed(13)
    model = GPT2LMHeadModel(GPT2Config(n_layer=N_LAYERS, n_head=2, n_embd=32, n_positions=32,
                                       vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("domains") / "gpt2"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write(path, probes):
    path.write_text("".join(json.dumps(p) + "\n" for p in probes), encoding="utf-8")


def test_cross_domain_table_from_a_whole_study(tmp_path, model_dir):
    plain, chains = domain_probes()
    _write(tmp_path / "plain.jsonl", plain)
    _write(tmp_path / "chains.jsonl", chains)
    (tmp_path / "study.yaml").write_text(f"""
name: tiny-domains
model: {{source: {model_dir}}}
probes: {{files: [plain.jsonl, chains.jsonl]}}
patches:
  - sites: ["layers[*].resid_pre", "layers[*].attn_out", "layers[*].mlp_out"]
    positions: [last]
metrics: [logit_diff]
seed: 3
execution: {{max_rows: 64, progress: false}}
report: {{figures: false, n_boot: 200}}
additivity: {{cumulative: false, top: [2, {N_LAYERS}], pairs: 2}}
""", encoding="utf-8")
    out = tmp_path / "out"
    result = run_study(tmp_path / "study.yaml", out, echo=lambda line: None)
    assert list(result.stages) == ["patch[model]", "patch[additivity:model]", "analyze[model]", "report"]
    analysis = out / "models" / "model" / "analysis"
    table = pd.read_csv(analysis / "cross_domain.csv")
    frame = read_results(out / "models" / "model")[0]
    assert set(table["domain"]) == {"geo", "med", "chain"} and set(table["domain_label"]) == {"topic"}

    # localization: each domain's probes alone through localization.py, the pair written definitional first
    loc = table[table["part"] == "localization"]
    checked = 0
    for topic in ("geo", "med", "chain"):
        for kind in ("attn_out", "mlp_out", "resid_pre"):
            measures = localization_measures(frame[frame["topic"] == topic], between="knowledge_type",
                                             site_kind=kind, metric="logit_diff", n_layers=N_LAYERS)
            tests = compare_localization(measures, "knowledge_type").set_index("measure")
            rows = loc[(loc["domain"] == topic) & (loc["site_kind"] == kind)].set_index("quantity")
            first = {"geo": "definitional", "med": "definitional", "chain": "one_hop"}[topic]
            for measure, t in tests.iterrows():
                sign = 1.0 if t["A"] == first else -1.0
                assert rows.loc[measure, "A"] == first
                assert rows.loc[measure, "diff"] == pytest.approx(sign * t["diff"], nan_ok=True)
                assert rows.loc[measure, "p_holm"] == pytest.approx(t["p_perm_holm"], nan_ok=True)
                checked += 1
    assert checked == 3 * 3 * 7

    # additivity: every layer's MLP output together minus the sum of the single layers, per probe, by hand
    joint = read_results(out / "additivity" / "model")[0]
    whole = joint[joint["site"] == "+".join(f"layers.{i}.mlp_out" for i in range(N_LAYERS))]
    single = frame[frame["site_kind"] == "mlp_out"].pivot(index="probe_id", columns="layer", values="recovery")
    gap = (whole.set_index("probe_id")["recovery"] - single.sum(axis=1)).dropna()
    geo_def = [p["id"] for p in plain if p["topic"] == "geo" and p["knowledge_type"] == "definitional"]
    row = table[(table["part"] == "additivity") & (table["domain"] == "geo") & (table["site_kind"] == "mlp_out")
                & (table["quantity"] == "gap_all_layers")].iloc[0]
    expected = gap.reindex(geo_def).dropna()
    assert (row["A"], row["n_A"]) == ("definitional", len(expected))
    assert row["mean_A"] == pytest.approx(expected.mean(), abs=1e-9)

    # composition: each two-hop probe's centre of mass against the mean of its two hops, paired
    measures = localization_measures(frame, between="knowledge_type", site_kind="mlp_out", metric="logit_diff",
                                     n_layers=N_LAYERS).set_index("probe_id")
    pairs = [c for c in ("th-0", "th-1", "th-2") if {c, f"h1-{c[-1]}", f"h2-{c[-1]}"} <= set(measures.index)]
    diffs = np.array([measures.loc[c, "centre_of_mass"] - (measures.loc[f"h1-{c[-1]}", "centre_of_mass"]
                                                           + measures.loc[f"h2-{c[-1]}", "centre_of_mass"]) / 2
                      for c in pairs])
    comp = table[(table["part"] == "composition") & (table["site_kind"] == "mlp_out")
                 & (table["quantity"] == "centre_of_mass") & (table["B"] == "both hops (mean)")].iloc[0]
    assert (comp["domain"], comp["A"], comp["n_A"]) == ("chain", "two_hop", len(pairs)) and len(pairs) >= 2
    assert comp["diff"] == pytest.approx(diffs.mean(), abs=1e-12)

    # both reports show it
    model_md = (analysis / "report.md").read_text(encoding="utf-8")
    assert "## Across domains: localization within each `topic`" in model_md
    study_md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Across domains: model (`topic`)" in study_md and "cross_domain.csv" in study_md
    assert "Composed probes vs their one-hop parts" in study_md
    assert "Across domains: model" in (out / "report.html").read_text(encoding="utf-8")


def test_a_single_probe_file_is_recorded_by_its_resolved_path(tmp_path):
    """run.json names the probe file wherever the run is analysed, so the analysis can read its `composes` lists."""
    from pathlib import Path

    from clap.app.study_file import StudyFile
    from interventions.spec import ModelSpec

    plain, chains = domain_probes()
    _write(tmp_path / "chains.jsonl", chains)
    (tmp_path / "study.yaml").write_text("name: one-file\nmodel: {source: smollm2-135m}\n"
                                         "probes: {file: chains.jsonl}\nsites: ['layers[*].mlp_out']\n",
                                         encoding="utf-8")
    study = StudyFile.from_yaml(tmp_path / "study.yaml")
    spec = study.patch_spec(ModelSpec(source="smollm2-135m"), tmp_path / "chains.jsonl")
    assert Path(spec.probes.file).is_absolute() and Path(spec.probes.file) == tmp_path / "chains.jsonl"
    from analyses.domains import read_compositions

    assert read_compositions({"spec": spec.to_dict()}) == {f"th-{c}": [f"h1-{c}", f"h2-{c}"] for c in range(3)}
