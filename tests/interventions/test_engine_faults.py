"""Faults of the engine found by an adversarial pass, each checked against an independent computation where a number
is involved: steering vectors (unreadable or non-finite files, the width checked only where the steer acts),
attribution rows' ``effect`` convention under noising, memory budgets too small for one batch, a stale
``samples.parquet``, a full disk while batches are saved, a ``fingerprints.json`` that is not an object."""

from __future__ import annotations

import errno
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from clap import models
from clap.app.cli import main
from clap.contract import SAMPLES_FILE, read_samples
from clap.errors import ClapError
from interventions.plan import rows_for_budget
from interventions.spec import StudySpec
from interventions.statistics import load_vector
from interventions.study import Study

from . import reference as ref
from .conftest import PROBES

SINGLE = PROBES[:2]  # one-token answers: the hook reference's logit difference needs no averaging


def spec_of(patches, **extra) -> StudySpec:
    return StudySpec.from_dict({"model": {"source": "in-memory"}, "probes": {"inline": SINGLE},
                                "metrics": ["logit_diff"], "patches": patches,
                                "execution": {"progress": False}, **extra})


# ------------------------------------------------------------------------------------------------- steering
def test_steer_width_is_checked_only_at_the_sites_it_acts_on(tiny_gpt2, tmp_path):
    """A full-width steer in one group and a head (a quarter of the width) in another: the steer runs, and its rows
    equal plain hooks adding alpha * v to block 1's input at the last token."""
    width = tiny_gpt2.hf.config.n_embd
    vector = torch.randn(width, generator=torch.Generator().manual_seed(5))
    torch.save(vector, tmp_path / "v.pt")
    spec = spec_of([
        {"sites": ["layers[1].resid_pre"], "positions": ["last"],
         "operations": [{"name": "steer", "alpha": 2.0, "vector": str(tmp_path / "v.pt")}]},
        {"sites": ["layers[2].heads[0]"], "positions": ["last"], "operations": ["replace"]},
    ])
    frame = Study(spec, model=tiny_gpt2).run()
    assert set(frame.site) == {"layers.1.resid_pre", "layers.2.heads.0"}
    for probe in SINGLE:
        row = frame[(frame.probe_id == probe["id"]) & (frame.operation == "steer(2)")]
        expected = ref.hook_logit_diff(tiny_gpt2, probe, lambda clean, corrupted: [
            ("transformer.h.1", "input", ref.add_edit(2.0 * vector[None], [len(corrupted) - 1]))])
        assert len(row) == 1 and row.iloc[0].patched == pytest.approx(expected, abs=1e-5)
    # where the steer does act, a wrong width is still refused
    torch.save(vector[:16], tmp_path / "short.pt")
    spec = spec_of([{"sites": ["layers[2].heads[0]", "layers[1].resid_pre"], "positions": ["last"],
                     "operations": [{"name": "steer", "alpha": 1.0, "vector": str(tmp_path / "short.pt")}]}])
    with pytest.raises(ClapError, match=r"short.pt: 16 values, but site layers.1.resid_pre is 64 wide"):
        Study(spec, model=tiny_gpt2).run()


@pytest.mark.parametrize("name, write, message", [
    ("text.pt", lambda p: p.write_text("0.1 0.2 0.3\n"), r"is not a tensor saved by torch.save \(UnpicklingError"),
    ("nan.pt", lambda p: torch.save(torch.tensor([0.0, float("nan"), 1.0, float("nan")]), p),
     r"holds 2 NaN or infinite value\(s\) \(first at index 1\)"),
    ("inf.npy", lambda p: np.save(p, np.array([1.0, 2.0, np.inf], dtype=np.float32)),
     r"holds 1 NaN or infinite value\(s\) \(first at index 2\)"),
    ("words.npy", lambda p: p.write_text("not numpy"), r"is not a tensor saved by numpy.save"),
])
def test_unreadable_or_non_finite_steering_vectors_are_refused_naming_the_file(tiny_gpt2, tmp_path, name, write,
                                                                              message):
    path = tmp_path / name
    write(path)
    with pytest.raises(ClapError, match=rf"steering vector file {path} " + message):
        load_vector(name, tmp_path)
    spec = spec_of([{"sites": ["layers[1].resid_pre"], "positions": ["last"],
                     "operations": [{"name": "steer", "alpha": 1.0, "vector": str(path)}]}])
    with pytest.raises(ClapError, match=rf"steering vector file {path} "):
        Study(spec, model=tiny_gpt2).run()


# ---------------------------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_effect_is_patched_minus_corrupted_like_exact_rows(tiny_gpt2, direction):
    """At the final norm's output the metric is linear in the activation, so the first-order estimate is exact: an
    attribution row's ``effect`` must equal the exact row's (``patched - corrupted``, README) in both directions."""
    spec = spec_of([{"sites": ["final_norm"], "positions": ["last"], "operations": ["replace", "attribution"]}],
                   direction=direction)
    frame = Study(spec, model=tiny_gpt2).run()
    approx = frame[frame.operation == "attribution"].set_index("probe_id")
    exact = frame[frame.operation == "replace"].set_index("probe_id")
    assert len(approx) == len(exact) == len(SINGLE)
    for rows in (approx, exact):
        np.testing.assert_allclose(rows.effect, rows.patched - rows.corrupted, atol=1e-6)
    np.testing.assert_allclose(approx.effect, exact.loc[approx.index].effect, atol=1e-4)
    np.testing.assert_allclose(approx.patched, exact.loc[approx.index].patched, atol=1e-4)
    # the exact patched value of the whole final-norm state at the last token is the source run's metric
    source = exact.clean if direction == "denoising" else exact.corrupted
    np.testing.assert_allclose(exact.patched, source, atol=1e-4)


# --------------------------------------------------------------------------------------------- memory budget
def test_memory_budget_too_small_for_one_batch_is_refused_with_the_minimum(tiny_gpt2):
    # per row: 10 tokens x (2 x 100 logits + 16 x 8 x 2 activations) x 4 bytes = 18,240 bytes
    per_row = 10 * (2 * 100 + 16 * 8 * 2) * 4
    assert rows_for_budget(0.1, None, 10, 100, 8, 2, 4) == int(0.1 * 2**20 // per_row) == 5
    assert rows_for_budget(3 * per_row / 2**20, None, 10, 100, 8, 2, 4) == 3
    with pytest.raises(ClapError, match=r"memory_budget_mb: 0.001 MB is too small for one batch: 3 rows .* need about "
                                        r"0.1 MB on this model; give at least memory_budget_mb: 0.1"):
        rows_for_budget(0.001, None, 10, 100, 8, 2, 4)
    spec = spec_of([{"sites": ["layers[0].resid_pre"], "positions": ["last"]}])
    spec.execution.memory_budget_mb = 0.001
    with pytest.raises(ClapError, match=r"memory_budget_mb: 0.001 MB is too small for one batch"):
        Study(spec, model=tiny_gpt2).run()


# ------------------------------------------------------------------------------------------------- samples
def test_samples_left_by_an_earlier_run_are_removed_and_ignored(tiny_gpt2, tmp_path):
    noisy = StudySpec.from_dict({
        "model": {"source": "in-memory"}, "probes": {"inline": SINGLE}, "metrics": ["prob"], "samples": 2,
        "sites": ["layers[0].resid_pre"], "positions": ["last"],
        "operations": [{"name": "noise", "scale": 0.5}], "execution": {"progress": False}})
    out = tmp_path / "out"
    Study(noisy, model=tiny_gpt2).run(out)
    drawn = read_samples(out)
    assert drawn is not None and set(drawn["sample"]) == {0, 1}
    stray = tmp_path / "stray.parquet"
    stray.write_bytes((out / SAMPLES_FILE).read_bytes())
    Study(spec_of([{"sites": ["layers[0].resid_pre"], "positions": ["last"]}]), model=tiny_gpt2).run(out)
    assert not (out / SAMPLES_FILE).exists()
    (out / SAMPLES_FILE).write_bytes(stray.read_bytes())  # put back by hand: still not this run's
    with pytest.warns(UserWarning, match="is ignored: run.json records a run with samples: 1"):
        assert read_samples(out) is None


# ------------------------------------------------------------------------------------------------- full disk
@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-model")
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


def test_full_disk_while_saving_batches_is_one_line_and_leaves_no_temporary(model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "labels"}) + "\n" for p in SINGLE))
    spec = tmp_path / "study.yaml"
    spec.write_text(f"model: {{source: {model_dir}}}\nprobes: {{file: probes.jsonl}}\n"
                    "sites: ['layers[*].resid_pre']\npositions: [each]\nmetrics: [logit_diff]\n"
                    "execution: {progress: false, max_rows: 4, strategy: full}\n")
    out = tmp_path / "out"
    (out / ".partial").mkdir(parents=True)
    real = pd.DataFrame.to_parquet
    calls = []

    def fills_up(frame, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second batch: half a file, then the disk is full
            with open(path, "wb") as handle:
                handle.write(b"PAR1 torn")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fills_up)
    assert main(["patch", str(spec), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]  # after transformers' weight-loading bar
    assert err.startswith("clap: error: ") and "cannot save a finished batch" in err
    assert "No space left on device" in err
    assert "the 1 batch(es) saved before it are kept and a rerun resumes from them" in err
    partial = next((out / ".partial").iterdir())
    assert sorted(p.name for p in partial.iterdir()) == ["batch-00000.parquet", "plan.json"]
    (partial / ".batch-00001.parquet.abc.tmp").write_bytes(b"torn by a kill")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert main(["patch", str(spec), "-o", str(out)]) == 0  # resumes; the torn temporary is cleared away
    assert not (out / ".partial").exists() or not list((out / ".partial").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_cache_that_is_not_an_object_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fingerprints.json").write_text("[]")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"some weights")
    assert models._file_digest(weights) == hashlib.blake2b(b"some weights", digest_size=16).hexdigest()
    assert isinstance(json.loads((tmp_path / "cache" / "fingerprints.json").read_text()), dict)
