"""`bench/side_by_side.py --quick` runs end to end on a 2-layer GPT-2 and writes the table the README quotes.

The default test runs clap and the plain-forward floor only (seconds); the TransformerLens and naive-nnsight
contenders (bridge boot plus one forward per cell) and the agreement check are slow-marked.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(shared_data):
    if not (shared_data / "gpt2-tokenizer" / "vocab.json").is_file():
        pytest.skip("the GPT-2 tokenizer is not in the shared data folder")
    spec = importlib.util.spec_from_file_location("side_by_side", REPO_ROOT / "bench" / "side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["side_by_side"] = module
    spec.loader.exec_module(module)
    return module


def _run(bench, tmp_path, shared_data, *extra):
    args = ["--quick", "--out", str(tmp_path), "--tokenizer", str(shared_data / "gpt2-tokenizer"), *extra]
    code = bench.main(args)
    with open(tmp_path / "side_by_side.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return code, reader.fieldnames, list(reader)


def test_quick_run_writes_the_expected_table(bench, tmp_path, shared_data):
    code, columns, rows = _run(bench, tmp_path, shared_data, "--contenders", "clap,floor", "--sweeps", "resid_pre")
    assert code == 0
    assert columns == bench.COLUMNS
    assert [(r["contender"], r["sweep"]) for r in rows] == [("floor", "any"), ("clap", "resid_pre")]
    clap = rows[1]
    # 1 pair x 2 layers x 6 tokens; the floor runs the cells plus the pair's two baselines
    assert (clap["pairs"], clap["layers"], clap["tokens"], clap["cells"], clap["rows"]) == ("1", "2", "6", "12", "14")
    assert float(clap["best_s"]) > 0 and float(clap["time_vs_clap"]) == 1.0
    assert float(clap["cells_per_s"]) == pytest.approx(12 / float(clap["best_s"]), rel=0.01)
    assert clap["max_abs_diff_vs_tl"] == ""  # TransformerLens did not run: no agreement is claimed
    markdown = (tmp_path / "side_by_side.md").read_text()
    assert "load_average_start" in markdown and "load_average_end" in markdown and "| resid_pre | 1 |" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_pairs_have_exactly_the_asked_length_and_differ_in_one_token(bench, shared_data):
    tokenizer = bench.load_tokenizer(shared_data / "gpt2-tokenizer")
    pairs = bench.make_pairs(tokenizer, 16, 16)
    assert len({p["clean"] for p in pairs}) == 16
    for pair in pairs:
        clean, corrupted = (tokenizer(pair[k])["input_ids"] for k in ("clean", "corrupted"))
        assert len(clean) == len(corrupted) == 16
        assert sum(a != b for a, b in zip(clean, corrupted, strict=True)) == 1
        # clap's probes refuse multi-token answers unless told otherwise (a 16-pair run once stopped on " Nairobi")
        assert [len(tokenizer(pair[k], add_special_tokens=False)["input_ids"]) for k in ("answer", "wrong")] == [1, 1]
    with pytest.raises(bench.BenchError, match="prompts must be"):
        bench.make_pairs(tokenizer, 1, 40)


def test_missing_tokenizer_is_a_clear_error(bench, tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path), "--tokenizer", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_quick_run_agrees_with_transformerlens(bench, tmp_path, shared_data):
    pytest.importorskip("transformer_lens.patching")
    code, _, rows = _run(bench, tmp_path, shared_data)
    assert code == 0
    by = {(r["contender"], r["sweep"]): r for r in rows}
    for sweep in bench.SWEEPS:
        assert by[("tl", sweep)]["status"] == "ok"
        assert float(by[("clap", sweep)]["max_abs_diff_vs_tl"]) <= 1e-4
        assert float(by[("naive", sweep)]["max_abs_diff_vs_tl"]) <= 1e-4


@pytest.mark.slow
def test_a_disagreement_with_transformerlens_fails_the_run(bench, tmp_path, shared_data, monkeypatch):
    pytest.importorskip("transformer_lens.patching")
    real = bench.clap_sweep
    monkeypatch.setattr(bench, "clap_sweep", lambda *a, **k: real(*a, **k) + 1e-3)
    code, _, rows = _run(bench, tmp_path, shared_data, "--contenders", "clap,tl", "--sweeps", "mlp_out")
    assert code == 1
    clap = next(r for r in rows if r["contender"] == "clap")
    assert float(clap["max_abs_diff_vs_tl"]) == pytest.approx(1e-3, rel=1e-3)
    assert "DISAGREEMENT" in (tmp_path / "side_by_side.md").read_text()


def test_multiply_add_bounds_on_a_case_counted_by_hand(bench):
    """``mac_bound`` on 1 pair of 3 tokens differing at token 1, 2 layers, d = d_mlp = 1, a vocabulary of 10: a
    block on token p costs 4 + 2 + 2 (p + 1) = 8 + 2p (tokens 0..2: 8, 10, 12; on tokens p..: 30, 22, 12).

    bound: baselines 2 x (2 x 30 + 10) = 140; ``resid_pre`` at layer 0: token 1 runs 2 blocks on tokens 1.. (44)
    plus logits (10), token 2 is equal at the first block (a no-op); at layer 1: token 1 (22 + 10), token 2
    (12 + 10): 248. tight: the last block on tokens p.. reads keys/values only on the non-last tokens
    (2 x (2 - p) + 12: 16, 14, 12) and logits of 2 tokens (2): baselines 2 x (30 + 16 + 2) = 96, then
    22 + 14 + 2, 14 + 2, 12 + 2: 164. floor: 8 rows x (2 x 30 + 3 x 10) = 720."""
    import torch

    clean, corrupted = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 9, 7]])
    macs = bench.mac_bound("resid_pre", 2, 1, 1, 10, clean, corrupted)
    assert macs == {"bound": 248, "tight": 164, "floor": 720}
    # the MLP output at (l, p) needs blocks l+1.. only; at the last layer, the logits alone
    macs = bench.mac_bound("mlp_out", 2, 1, 1, 10, clean, corrupted)
    assert macs["bound"] == 140 + (22 + 10) + (12 + 10) + 10 + 10
    assert macs["tight"] == 96 + (14 + 2) + (12 + 2) + 2 + 2
