"""Causal tracing on real weights (SmolLM2-135M): ROME's qualitative pattern over the shipped definitional facts the
model knows, and equality with the independent hook reference (identical noise draws) on a few probes.

The pattern test checks ``docs/causal-trace-smollm2.csv`` (layers x ROME's six token groups, averaged over facts:
the table behind ``docs/causal-trace-smollm2.png``) against the run, and prints the cells, samples, wall time and
load. ``CLAP_WRITE_DOCS=1`` rewrites both files from the run instead; a test run never changes a tracked file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from analyses.trace import plot_groups, token_group_table
from interventions.probe_check import check_probes
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import load_smollm2_or_skip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONAL = ROOT / "clap/data/probes/definitional.jsonl"


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2_or_skip()


def known_facts(model, path: Path, target: Path) -> int:
    """The probes of ``path`` whose answer the model prefers to the wrong answer on the clean prompt (``clap probes
    check``'s "knows"), written to ``target``; ROME traces only facts the model knows."""
    frame = check_probes(path, model.tokenizer, model)
    known = set(frame.loc[frame["knows"].astype(bool), "id"])
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["id"] in known]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def test_causal_trace_shows_the_published_pattern(smollm2, tmp_path):
    """ROME (Meng et al. 2022, figures 1-2, GPT-2 XL and GPT-J): restoring the hidden state of the *last subject
    token* has its large effect in the early-middle layers and fades later, restoring the *last token* has almost
    none early and its large effect in the late layers, where it exceeds the last subject token's. The assertions are
    those orderings over thirds of the layer stack, not values fitted to this run."""
    probes = tmp_path / "known.jsonl"
    n_known = known_facts(smollm2, DEFINITIONAL, probes)
    assert n_known >= 30
    samples = 3  # ROME draws 10; 3 keeps this to ~37,000 patched rows (about 4 rows/s on 2 cores at load 10)
    spec = StudySpec.from_dict({
        "name": "trace-smollm2", "model": {"source": "smollm2-135m"}, "probes": {"file": str(probes)},
        "trace": {"samples": samples, "kinds": {"resid_post": 1}},
        "execution": {"progress": False, "max_rows": 128},
    })
    load_before = os.getloadavg()
    started = time.perf_counter()
    study = Study(spec, model=smollm2)
    frame = study.run(tmp_path / "trace")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    assert frame.probe_id.nunique() == n_known
    table = token_group_table(frame)
    docs = ROOT / "docs"
    if os.environ.get("CLAP_WRITE_DOCS") == "1":
        plot_groups(frame, docs / "causal-trace-smollm2.png")
        table.to_csv(docs / "causal-trace-smollm2.csv", index=False)
    shipped = pd.read_csv(docs / "causal-trace-smollm2.csv")
    fresh = table.reset_index(drop=True)[list(shipped.columns)]
    for column in shipped.columns:  # labels compared as text (the table's are categorical)
        if not pd.api.types.is_numeric_dtype(shipped[column]):
            fresh[column], shipped[column] = fresh[column].astype(str), shipped[column].astype(str)
    pd.testing.assert_frame_equal(fresh, shipped, check_dtype=False, atol=1e-5, rtol=0)  # the documented figure
    effect = table.set_index(["token_group", "layer"]).effect
    n_layers = smollm2.hf.config.num_hidden_layers
    third = n_layers // 3
    early, late = list(range(third)), list(range(n_layers - third, n_layers))
    subject = effect["last subject"]
    last = effect["last"]
    print(f"\ncausal trace: {n_known} facts, {len(frame)} cells x {samples} samples, {elapsed:.0f} s wall, "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; total effect (clean - corrupted) "
          f"{(frame.clean - frame.corrupted).mean():.4f}; last subject token: early {subject.loc[early].mean():.4f}, "
          f"late {subject.loc[late].mean():.4f}, peak at layer {int(subject.idxmax())}; last token: early "
          f"{last.loc[early].mean():.4f}, late {last.loc[late].mean():.4f}")
    assert int(subject.idxmax()) < 2 * n_layers / 3  # the last subject token peaks in the early-middle layers
    assert subject.loc[early].mean() > subject.loc[late].mean()  # ... and fades
    assert subject.loc[early].mean() > last.loc[early].mean()  # early on, the subject matters, the last token not
    assert last.loc[late].mean() > last.loc[early].mean()  # the last token rises in the late layers
    assert last.loc[late].mean() > subject.loc[late].mean()  # ... and exceeds the last subject token there


def test_causal_trace_equals_hooks_on_smollm2(smollm2, tmp_path):
    """Three shipped facts, three layers, every traced component (hidden states single, MLP and attention in
    windows of 10), two noise draws: equal to the plain-hook reference with identical draws, to 1e-5."""
    from .test_compose import CHECKED_POSITIONS, check_trace_against_hooks

    lines = DEFINITIONAL.read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "three.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    probes = [json.loads(line) for line in lines]
    spec = StudySpec.from_dict({
        "model": {"source": "smollm2-135m"}, "probes": {"file": str(tmp_path / "three.jsonl")}, "seed": 11,
        "recovery_epsilon": 0, "execution": {"progress": False, "max_rows": 64},
        "trace": {"samples": 2, "layers": "10:13", "positions": CHECKED_POSITIONS,
                  "kinds": {"resid_post": 1, "mlp_out": 10, "attn_out": 10}},
    })
    study = Study(spec, model=smollm2)
    frame = study.run()
    assert sorted(frame.layer.unique()) == [10, 11, 12]
    assert check_trace_against_hooks(study, frame, smollm2, probes, [10, 11, 12]) == 3 * 2 * 3 * 3 * 2
