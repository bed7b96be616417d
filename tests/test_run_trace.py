"""``clap run`` with a ``trace:`` section: the patch stage runs the causal trace (results.parquet, samples.parquet),
a ``trace[NAME]`` stage writes ROME's token-group table (with the spread over noise draws) and the heatmaps, the
study report shows them; the study file and ``clap trace`` give the same numbers; the old spelling is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from clap.app.pipeline import run_study
from clap.app.study_file import StudyFile
from clap.contract import BEFORE_SUBJECT, TOKEN_GROUPS, read_results, read_samples
from clap.errors import ClapError
from tests.tiny_tokenizer import tiny_tokenizer

PROBES = [  # corrupted prompts are never run: the trace's corrupted run is the clean prompt + noise on the subject
    {"id": "ep", "clean": "Epilepsy is a chronic disorder of the", "corrupted": "Migraine is a chronic disorder of the",
     "answer": " brain", "wrong": " head", "knowledge_type": "definitional", "subject": "Epilepsy"},
    {"id": "eth", "clean": "Ethosuximide is a drug used to treat", "corrupted": "Amlodipine is a drug used to treat",
     "answer": " epilepsy", "wrong": " hypertension", "knowledge_type": "associative", "subject": "Ethosuximide"},
    {"id": "fr", "clean": "The capital of France is", "corrupted": "The capital of Spain is",
     "answer": " Paris", "wrong": " Madrid", "knowledge_type": "definitional", "subject": " France"},
    {"id": "vpa", "clean": "The drug valproic acid treats", "corrupted": "The drug valproic acid treats",
     "answer": " seizures", "wrong": " pain", "knowledge_type": "associative", "subject": " valproic acid"},
    {"id": "mig", "clean": "Migraine is a chronic disorder of the",
     "corrupted": "Epilepsy is a chronic disorder of the", "answer": " head", "wrong": " brain",
     "knowledge_type": "associative", "subject": "Migraine"},
]
TRACE = "{samples: 3, noise: 3, relative_to: selected_std, kinds: {resid_post: 1, mlp_out: 2}}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=32,
                                       vocab_size=len(tokenizer))).eval()
    folder = tmp_path_factory.mktemp("trace-model") / "gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_study(folder: Path, model_dir: Path, section: str = f"trace: {TRACE}", figures: bool = True) -> Path:
    (folder / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES), encoding="utf-8")
    path = folder / "study.yaml"
    path.write_text(f"name: tiny-trace\nmodel: {{source: {model_dir}}}\nprobes: {{file: probes.jsonl}}\n{section}\n"
                    f"seed: 5\nexecution: {{progress: false}}\nreport: {{figures: {str(figures).lower()}}}\n",
                    encoding="utf-8")
    return path


def rome_groups_by_hand(first_e: int, first_a: int, n_tokens: int) -> dict[str, list[int]]:
    """The token indices of ROME's six groups as ``average_causal_effects`` slices its scores (``subject_range`` =
    (first_e, first_a), the subject's tokens and the one after; tokens before the subject in none)."""
    last_e, last_a = first_a - 1, n_tokens - 1
    return {"first subject": [first_e], "middle subject": list(range(first_e + 1, last_e)),
            "last subject": [last_e], "first subsequent": [first_a],
            "further": list(range(first_a + 1, last_a)), "last": [last_a]}


def check_table_by_hand(folder: Path, n_draws: int) -> int:
    """``token_groups.csv`` recomputed from samples.parquet with numpy, each token placed in ROME's groups from the
    subject's token range found by hand: per draw, per probe the mean effect of its tokens in the group, the mean
    over probes; then the mean, sd (ddof 1) and t interval over the draws."""
    from tests.interventions.reference import subject_indices

    tokenizer = tiny_tokenizer()
    groups = {}
    for p in PROBES:
        indices = subject_indices(tokenizer, p["clean"], p["subject"])
        groups[p["id"]] = rome_groups_by_hand(indices[0], indices[-1] + 1, len(tokenizer(p["clean"])["input_ids"]))
    assert any(len(subject_indices(tokenizer, p["clean"], p["subject"])) == 1 for p in PROBES)
    assert any(len(subject_indices(tokenizer, p["clean"], p["subject"])) > 1 for p in PROBES)
    assert any(g["first subsequent"] == g["last"] for g in groups.values())  # a subject right before the last token
    assert any(g["first subject"][0] > 0 for g in groups.values())  # tokens before the subject, in no group
    table = pd.read_csv(folder / "token_groups.csv")
    samples = read_samples(folder)
    for row in table.itertuples(index=False):
        cells = samples[(samples.site_kind == row.kind) & (samples.layer == row.layer)
                        & (samples["window"] == row.window)]
        members = [(p, q) for p, g in groups.items() for q in g[row.token_group]]
        cells = cells[[(p, q) in members for p, q in zip(cells.probe_id, cells.position, strict=True)]]
        per_draw = np.array([np.mean([cells[(cells["sample"] == s) & (cells.probe_id == p)].effect.mean()
                                      for p in sorted(set(cells.probe_id))]) for s in range(n_draws)])
        mean, sd = per_draw.mean(), per_draw.std(ddof=1)
        half = stats.t.ppf(0.975, n_draws - 1) * sd / np.sqrt(n_draws)
        assert row.effect == pytest.approx(mean, abs=1e-12)
        assert row.sample_sd == pytest.approx(sd, abs=1e-12)
        assert (row.sample_ci_low, row.sample_ci_high) == pytest.approx((mean - half, mean + half), abs=1e-12)
        assert row.n_samples == n_draws and row.n_probes == cells.probe_id.nunique()
    assert set(table.kind) == {"resid_post", "mlp_out"}
    # every (group, layer) that has a member token in some probe is in the table
    n_layers = samples.layer.nunique()
    expected = {g for probe in groups.values() for g, tokens in probe.items() if tokens}
    assert set(table.token_group) == expected
    assert len(table) == len(expected) * n_layers * 2
    return len(table)


def test_trace_stage_table_and_clap_trace_are_one_spelling(model_dir, tmp_path):
    """The trace stage's folder holds results, draws and the token-group table (equal to numpy by hand); the study
    file's `trace:` is the study spec's: `clap trace` on the same section gives the same rows and table."""
    from clap.app.cli import main

    study = write_study(tmp_path, model_dir, figures=False)
    roof = run_study(study, tmp_path / "out", until="trace", echo=lambda line: None)
    assert list(roof.stages) == ["patch[model]", "trace[model]"]
    folder = roof.results_dir("model")
    frame, meta = read_results(folder)
    assert meta["noise"]["samples"] == 3 and set(read_samples(folder)["sample"]) == {0, 1, 2}
    assert set(frame.metric) == {"prob"} and set(frame.token_group) == {*TOKEN_GROUPS, BEFORE_SUBJECT}
    assert check_table_by_hand(folder, 3) > 0
    assert not (folder / "trace_groups.png").exists()  # report.figures: false
    assert main(["trace", str(study), "-o", str(tmp_path / "cli")]) == 2  # a study file is not a plain spec
    spec = tmp_path / "spec.yaml"
    spec.write_text("\n".join(line for line in study.read_text().splitlines() if not line.startswith("report:")))
    # random weights know no fact: `clap trace` refuses them unless told to trace them anyway
    assert main(["trace", str(spec), "-o", str(tmp_path / "cli"), "--probe-figures", "0", "--no-progress"]) == 2
    assert main(["trace", str(spec), "-o", str(tmp_path / "cli"), "--probe-figures", "0", "--no-progress",
                 "--allow-unknown"]) == 0
    keys = ["probe_id", "site", "position"]
    a = frame.sort_values(keys).reset_index(drop=True)
    b = read_results(tmp_path / "cli")[0].sort_values(keys).reset_index(drop=True)
    assert a.patched.to_numpy() == pytest.approx(b.patched.to_numpy(), abs=1e-7)
    assert pd.read_csv(tmp_path / "cli" / "token_groups.csv").effect.to_numpy() == pytest.approx(
        pd.read_csv(folder / "token_groups.csv").effect.to_numpy(), abs=1e-7)


@pytest.mark.slow
def test_run_study_traces_draws_figures_and_reports(model_dir, tmp_path):
    study = write_study(tmp_path, model_dir)
    result = run_study(study, tmp_path / "out", echo=lambda line: None)
    assert list(result.stages) == ["patch[model]", "trace[model]", "analyze[model]", "report"]
    folder = result.results_dir("model")
    for name in ("results.parquet", "samples.parquet", "token_groups.csv", "trace_groups.png", "trace_ep.png",
                 "trace_eth.png", "trace_fr.png"):
        assert (folder / name).stat().st_size > 0, name
    assert check_table_by_hand(folder, 3) > 0
    # the study's report shows the averaged heatmap and the peaks of the table
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "<h2>Causal trace: model</h2>" in html and "src='models/model/trace_groups.png'" in html
    assert "![causal trace of model](models/model/trace_groups.png)" in md
    assert "average over 3 seeded noise draw(s)" in md and "95 % t interval over draws" in md
    # the analyses' Methods say what every value is, and their noise-draws table is there
    analysis = (folder / "analysis" / "report.md").read_text()
    assert "average over 3 seeded noise draws" in analysis and "### Noise draws" in analysis
    again = run_study(study, tmp_path / "out", echo=lambda line: None)
    assert set(again.stages.values()) == {"up to date"}


def test_old_section_name_is_refused_with_the_one_spelling(model_dir, tmp_path):
    study = write_study(tmp_path, model_dir, section=f"causal_tracing: {TRACE}")
    with pytest.raises(ClapError, match=r"`causal_tracing:` is spelled `trace:`"):
        StudyFile.from_yaml(study)


def test_trace_without_prob_is_refused_before_anything_runs(model_dir, tmp_path):
    """`metrics: [logit_diff]` in a trace ran to the end and crashed drawing figures; it is refused at load time,
    naming the file, the line and the fix."""
    study = write_study(tmp_path, model_dir, section=f"trace: {TRACE}\nmetrics: [logit_diff]")
    with pytest.raises(ClapError) as info:
        run_study(study, tmp_path / "out", echo=lambda line: None)
    assert f"{study}:4: trace: a causal trace measures the indirect effect on p(answer), the metric `prob`" in (
        str(info.value))
    assert "add it (metrics: [prob, logit_diff])" in str(info.value)
    assert not (tmp_path / "out").exists()
    with_prob = write_study(tmp_path, model_dir, section=f"trace: {TRACE}\nmetrics: [logit_diff, prob]")
    assert StudyFile.from_yaml(with_prob).metrics == ["logit_diff", "prob"]


def test_trace_outputs_of_results_without_prob_say_so():
    from analyses.trace import write_trace_outputs

    frame = pd.DataFrame({"metric": ["logit_diff"], "position": [0]})
    with pytest.raises(ClapError, match=r"read the metric `prob`.*these results hold logit_diff"):
        write_trace_outputs(frame, "unused")


def test_probe_ids_and_study_names_cannot_leave_the_output_folder(model_dir, tmp_path):
    """A probe id `../../../X` wrote `trace_../../../X.png` outside `-o`, an id with `/` made folders, a study
    `name: ../../X` wrote `../../X-output`: refused at load time with file:line; file names from ids are safe."""
    from analyses.trace import write_trace_outputs
    from clap.names import file_stem

    bad = [dict(PROBES[0], id="../../../X"), *PROBES[1:]]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in bad), encoding="utf-8")
    study = tmp_path / "study.yaml"
    study.write_text(f"name: tiny-trace\nmodel: {{source: {model_dir}}}\nprobes: {{file: probes.jsonl}}\n"
                     f"trace: {TRACE}\nexecution: {{progress: false}}\n", encoding="utf-8")
    with pytest.raises(ClapError) as info:
        run_study(study, tmp_path / "out", echo=lambda line: None)
    assert f"{tmp_path / 'probes.jsonl'}:1: id: probe id '../../../X' contains '/'" in str(info.value)
    for probe_id, reason in (("a/b", "contains '/'"), ("a\\b", "contains '\\\\'"), ("..", "is '..', a path"),
                             ("a\nb", "contains the control character '\\n'"), (" ", "is empty")):
        (tmp_path / "probes.jsonl").write_text(json.dumps(dict(PROBES[0], id=probe_id)) + "\n", encoding="utf-8")
        with pytest.raises(ClapError) as info:
            run_study(study, tmp_path / "out", echo=lambda line: None)
        assert f"probes.jsonl:1: id: probe id {probe_id!r} {reason}" in str(info.value)
    text = study.read_text().replace("name: tiny-trace", "name: ../../X")
    study.write_text(text, encoding="utf-8")
    with pytest.raises(ClapError, match=rf"{study}:1: name: study name '\.\./\.\./X' contains '/'"):
        run_study(study, echo=lambda line: None)
    assert not (tmp_path.parent.parent / "X-output").exists()

    # results of an older run (or built in Python) with such ids: the figures stay inside the folder
    (tmp_path / "ok").mkdir()
    run = run_study(write_study(tmp_path / "ok", model_dir), tmp_path / "ok" / "out", until="patch",
                    echo=lambda line: None)
    frame = read_results(run.results_dir("model"))[0]
    frame["probe_id"] = frame["probe_id"].map({"ep": "../../../X", "eth": "a/b"}).fillna(frame["probe_id"])
    out = tmp_path / "figs"
    written = write_trace_outputs(frame, out, n_probe_figures=2)
    assert all(p.parent == out for p in written)
    assert {p.name for p in written} >= {f"trace_{file_stem('../../../X')}.png", f"trace_{file_stem('a/b')}.png"}
    assert file_stem("../../../X").startswith(".._.._.._X-") and file_stem("ep") == "ep"
    assert file_stem("a/b") != file_stem("a_b") and file_stem("..") != ".."
    assert not (tmp_path.parent.parent / "X.png").exists() and not (out / "a").exists()
