"""The spread over noise draws (analyses/samples.py, samples.parquet) against numpy and scipy by hand, and what
``clap analyze`` makes of a results folder that has draws."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyses.samples import sample_spread
from analyses.synthetic import write_synthetic
from clap.contract import SAMPLES_FILE, read_samples


def with_draws(data: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """Every row repeated per draw, its effect moved by seeded noise of a known size per layer."""
    rng = np.random.default_rng(seed)
    draws = []
    for sample in range(n):
        part = data.copy()
        part["sample"] = sample
        part["effect"] = part["recovery"].fillna(0) + rng.normal(0, 0.1, len(part)) * (1 + part["layer"].fillna(0))
        part["window"] = 1
        draws.append(part)
    out = pd.concat(draws, ignore_index=True)
    out["sample"] = out["sample"].astype("Int64")
    out["window"] = out["window"].astype("Int64")
    return out


def test_sample_spread_equals_numpy(tmp_path):
    folder = write_synthetic(tmp_path / "run", n_probes=4, n_layers=3, site_kinds=("mlp_out",), metrics=("prob",))
    data = pd.read_parquet(folder / "results.parquet")
    samples = with_draws(data[data.site_kind == "mlp_out"], 4)
    table = sample_spread(samples)
    assert len(table) == 3  # one metric, one site kind, one window, three layers
    for row in table.itertuples(index=False):
        part = samples[samples.layer == row.layer]
        means, sds, halves = [], [], []
        for _, cell in part.groupby(["probe_id", "site", "positions", "position"], dropna=False):
            values = cell.effect.to_numpy()
            assert len(values) == 4
            means.append(values.mean())
            sds.append(values.std(ddof=1))
            halves.append(stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2)
        assert row.n_cells == len(means) and row.n_samples == 4
        assert row.mean == pytest.approx(np.mean(means), abs=1e-12)
        assert row.median_sd == pytest.approx(np.median(sds), abs=1e-12)
        assert row.max_sd == pytest.approx(np.max(sds), abs=1e-12)
        assert row.mean_half_width == pytest.approx(np.mean(halves), abs=1e-12)
    assert table.sort_values("layer").median_sd.is_monotonic_increasing  # the planted spread grows with the layer


def test_analyze_reports_the_draws(tmp_path):
    from analyses.pipeline import analyze

    folder = write_synthetic(tmp_path / "run", n_probes=6, n_layers=3, site_kinds=("mlp_out",), metrics=("prob",))
    data = pd.read_parquet(folder / "results.parquet")
    with_draws(data, 3).to_parquet(folder / SAMPLES_FILE, index=False)
    meta = json.loads((folder / "run.json").read_text())
    meta["noise"] = {"samples": 3}
    (folder / "run.json").write_text(json.dumps(meta))
    assert read_samples(folder)["sample"].tolist()[:1] == [0]
    result = analyze(folder, figures=False, n_boot=200)
    table = pd.read_csv(result.out_dir / "noise_samples.csv")
    assert set(table.site_kind) >= {"mlp_out"} and (table.n_samples == 3).all()
    assert any("average over 3 seeded noise draws" in m for m in result.methods)
    plain = write_synthetic(tmp_path / "plain", n_probes=6, n_layers=3, site_kinds=("mlp_out",), metrics=("prob",))
    assert read_samples(plain) is None
    assert not any("noise draws" in m for m in analyze(plain, figures=False, n_boot=200).methods)
