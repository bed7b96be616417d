"""Loading a results directory: round trip, dtypes, and errors that name the file and what is wrong."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses import REQUIRED_COLUMNS, load_results, save_results
from analyses.synthetic import make_meta, make_results
from clap.errors import ClapError


@pytest.fixture()
def written(tmp_path):
    data = make_results(n_probes=4, n_layers=3, metrics=("logit_diff",), site_kinds=("mlp_out",), tokens=("a", "b"))
    save_results(data, make_meta(data, seed=9), tmp_path)
    return tmp_path, data


def test_round_trip_keeps_values_and_normalises_dtypes(written):
    root, original = written
    data, meta = load_results(root)
    assert len(data) == len(original)
    for col in ("layer", "head", "position"):
        assert str(data[col].dtype) == "Int64"
    assert data["layer"].isna().sum() == original["layer"].isna().sum() > 0  # lm_head / final_norm rows
    assert data["recovery_defined"].dtype == bool and data["trivial"].dtype == bool
    pd.testing.assert_series_equal(data["recovery"], original["recovery"], check_names=True)
    assert meta["seed"] == 9 and meta["group_columns"] == ["knowledge_type"] and meta["n_probes"] == 4
    assert set(REQUIRED_COLUMNS) | {"knowledge_type"} <= set(data.columns)


def test_missing_columns_are_named_with_the_file(written):
    root, original = written
    original.drop(columns=["recovery", "site_kind"]).to_parquet(root / "results.parquet")
    with pytest.raises(ClapError) as err:
        load_results(root)
    msg = str(err.value)
    assert str(root / "results.parquet") in msg and "missing column(s) site_kind, recovery" in msg


def test_missing_group_column_named_in_sidecar_is_reported(written):
    root, original = written
    original.drop(columns=["knowledge_type"]).to_parquet(root / "results.parquet")
    with pytest.raises(ClapError, match=r"results\.parquet: missing column\(s\) knowledge_type"):
        load_results(root)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"run\.json: sidecar not found"),
        ("{not json", r"run\.json: line 1: not valid JSON"),
        ("[1, 2]", r"run\.json: expected a JSON object"),
        (json.dumps({"spec": {}, "model": {}}),
         r"run\.json: missing key\(s\) versions, seed, group_columns, created, n_probes"),
    ],
)
def test_bad_sidecar(written, content, message):
    root, _ = written
    if content is None:
        (root / "run.json").unlink()
    else:
        (root / "run.json").write_text(content)
    with pytest.raises(ClapError, match=message):
        load_results(root)


def test_missing_directory_and_parquet(tmp_path, written):
    with pytest.raises(ClapError, match="results directory not found"):
        load_results(tmp_path / "nope")
    root, _ = written
    (root / "results.parquet").unlink()
    with pytest.raises(ClapError, match=r"results\.parquet: results file not found"):
        load_results(root)
    (root / "results.parquet").write_text("garbage")
    with pytest.raises(ClapError, match="not a readable Parquet file"):
        load_results(root)


def test_bad_values_are_refused(written):
    root, original = written
    bad = original.copy()
    bad["layer"] = bad["layer"].astype("float") + 0.5
    bad.to_parquet(root / "results.parquet")
    with pytest.raises(ClapError, match="column 'layer' must hold integers"):
        load_results(root)
    bad = original.copy()
    bad.loc[0, "site_kind"] = "mlp"
    bad.to_parquet(root / "results.parquet")
    with pytest.raises(ClapError, match="unknown value\\(s\\) mlp; expected one of embed, resid_pre"):
        load_results(root)
