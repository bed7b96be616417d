"""The edit kernel: each mode against a hand computation, the metric reduction against a direct one, every substrate
calling it, and the module travelling by value to a server without clap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from interventions import kernel
from interventions.kernel import Edits

from .conftest import small_study

ROOT = Path(__file__).resolve().parents[2]


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _loops(value: torch.Tensor, n_heads: int, stages) -> torch.Tensor:
    """The same edits, one entry at a time with Python loops (the definition in the kernel's docstring)."""
    out = value.clone()
    for full, heads in stages:
        for by_head, group in ((False, full), (True, heads)):
            view = out.view(out.shape[0], out.shape[1], n_heads, -1) if by_head else out
            for mode, edits in zip(kernel.MODES, group, strict=True):
                if edits is None:
                    continue
                for i in range(len(edits)):
                    t = (int(edits.t_row[i]), int(edits.t_col[i])) + ((int(edits.head[i]),) if by_head else ())
                    if edits.values is not None:
                        source = edits.values[i]
                    elif edits.s_row is not None:
                        s = (int(edits.s_row[i]), int(edits.s_col[i])) + ((int(edits.head[i]),) if by_head else ())
                        source = view[s].clone()
                    if mode in ("copy", "set"):
                        view[t] = source
                    elif mode == "add":
                        view[t] = view[t] + source
                    else:
                        view[t] = view[t] + edits.alpha[i].to(view.dtype) * (source - view[t])
    return out


def _stages():
    g = torch.Generator().manual_seed(0)
    full = (
        Edits(t_row=_t(2, 3), t_col=_t(1, 0), head=_t(-1, -1), s_row=_t(0, 1), s_col=_t(1, 2)),  # copy from rows
        Edits(t_row=_t(2), t_col=_t(2), head=_t(-1), values=torch.randn(1, 8, generator=g)),  # set
        Edits(t_row=_t(3, 3), t_col=_t(1, 2), head=_t(-1, -1), values=torch.randn(2, 8, generator=g)),  # add
        Edits(t_row=_t(2), t_col=_t(0), head=_t(-1), s_row=_t(1), s_col=_t(0),
              alpha=torch.tensor([[0.25]], dtype=torch.float64)),  # mix towards a row
    )
    heads = (
        Edits(t_row=_t(2), t_col=_t(2), head=_t(1), values=torch.randn(1, 4, generator=g)),  # copy from values
        None,
        Edits(t_row=_t(3), t_col=_t(0), head=_t(0), values=torch.randn(1, 4, generator=g)),
        Edits(t_row=_t(3), t_col=_t(2), head=_t(1), values=torch.randn(1, 4, generator=g),
              alpha=torch.tensor([[0.5]], dtype=torch.float64)),  # mix towards values (another model)
    )
    noise = (None, None, Edits(t_row=_t(2), t_col=_t(1), head=_t(-1), values=torch.randn(1, 8, generator=g)), None)
    return [(noise, (None,) * 4), (full, heads)]  # a baseline stage (noise), then the cells' own edits


def test_every_mode_equals_a_hand_computation():
    value = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    stages = _stages()
    got = kernel.apply_edits(value.clone(), 2, stages)
    want = _loops(value, 2, stages)
    assert torch.equal(got, want)
    assert not torch.equal(got, value)  # the edits did something
    # the later stage's copy at (2, 1) overwrote the earlier stage's noise there
    assert torch.equal(got[2, 1], value[0, 1])


def test_edit_access_keeps_a_tuples_other_members_and_leaves_the_live_tensor_alone():
    value = torch.randn(4, 3, 8)
    extra = object()
    out = kernel.edit_access((value, extra), 2, _stages())
    assert out[1] is extra and not torch.equal(out[0], value)
    assert torch.equal(value, value.clone())  # no write into the module's own tensor
    before = value.clone()
    kernel.edit_access(value, 2, _stages())
    assert torch.equal(value, before)


def test_select_and_renumbering():
    edits = Edits(t_row=_t(0, 1, 2), t_col=_t(3, 4, 5), head=_t(-1, -1, -1), values=torch.arange(6.0).reshape(3, 2))
    kept = edits.select(torch.tensor([True, False, True]))
    assert kept.t_row.tolist() == [0, 2] and kept.values.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert edits.select(torch.tensor([False, False, False])) is None
    assert edits.select(torch.tensor([True, True, True])) is edits


def test_metric_reduction_equals_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=g, dtype=torch.float32) * 4
    answers, wrongs = [[5], [7, 9], [11]], [[1], [2], [3, 4, 6]]
    a_index, a_mask = kernel.token_sets(answers)
    w_index, w_mask = kernel.token_sets(wrongs)
    metrics, logprobs = kernel.reduce_metrics(logits, a_index, a_mask, w_index, w_mask,
                                              clean_row=torch.tensor([0, 0, 0]))
    x = logits.double()
    for row in range(3):
        answer = x[row, answers[row]].mean()
        wrong = x[row, wrongs[row]].mean()
        lp = torch.log_softmax(x[row], -1)
        lp_set = torch.log(torch.exp(lp[answers[row]]).sum())
        clean = torch.log_softmax(x[0], -1)
        kl = (clean.exp() * (clean - lp)).sum()
        want = torch.stack([answer - wrong, answer, lp_set.exp(), lp_set, kl])
        assert torch.allclose(metrics[row], want, rtol=0, atol=1e-12)
    assert metrics.dtype == torch.float64 and logprobs.shape == (3, 50)
    assert float(metrics[0, 4]) == 0.0  # KL of the clean row to itself
    no_clean, _ = kernel.reduce_metrics(logits, a_index, a_mask, w_index, w_mask)
    assert torch.isnan(no_clean[:, 4]).all() and torch.equal(no_clean[:, :4], metrics[:, :4])


@pytest.mark.parametrize("strategy", ["full", "suffix"])
def test_every_substrate_applies_edits_and_reduces_metrics_through_the_kernel(tiny_gpt2, monkeypatch, strategy):
    """Counting wrappers around the kernel's two functions: each strategy (and the ragged path the suffix strategy
    takes locally) must call them, so an operation has one definition whatever runs it."""
    calls = {"apply_edits": 0, "reduce_metrics": 0}
    for name in calls:
        real = getattr(kernel, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, name, counted)
    study = small_study(tiny_gpt2, execution={"progress": False, "strategy": strategy},
                        patches=[{"sites": ["layers[*].resid_pre"], "positions": ["each"]}])
    frame = study.run()
    assert len(frame) and calls["apply_edits"] > 0 and calls["reduce_metrics"] > 0
    if strategy == "suffix":
        assert study.executor.suffix_stats.get("ragged_batches", 0) > 0  # the ragged path ran, through the kernel


def test_the_kernel_travels_by_value_to_a_process_without_clap(tmp_path):
    """What NDIF receives: after registration, the pickled kernel function loads and runs where neither clap nor its
    source tree can be imported."""
    import cloudpickle

    kernel.register_for_remote()
    blob = cloudpickle.dumps((kernel.apply_edits, _stages()))
    (tmp_path / "payload.pkl").write_bytes(blob)
    script = textwrap.dedent(f"""
        import importlib.abc, pickle, sys, torch
        class NoClap(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("clap", "interventions", "analyses", "corpora", "finetuning", "tests"):
                    raise ModuleNotFoundError(name)
                return None
        sys.meta_path.insert(0, NoClap())
        sys.path = [p for p in sys.path if p not in ("", {str(tmp_path)!r}, {str(ROOT)!r})]
        apply_edits, stages = pickle.loads(open({str(tmp_path / "payload.pkl")!r}, "rb").read())
        value = torch.zeros(4, 3, 8)
        out = apply_edits(value.clone(), 2, stages)
        print(float(out.abs().sum()) > 0, apply_edits.__module__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "True"


def test_metrics_come_out_in_the_dtype_asked_for():
    """Devices without float64 (Apple's MPS) reduce in float32: the masks must not promote the result."""
    logits = torch.randn(2, 20)
    a_index, a_mask = kernel.token_sets([[1], [2, 3]])
    w_index, w_mask = kernel.token_sets([[4], [5]])
    assert a_mask.dtype == torch.float32
    metrics, logprobs = kernel.reduce_metrics(logits, a_index, a_mask, w_index, w_mask, dtype=torch.float32)
    assert metrics.dtype == torch.float32 and logprobs.dtype == torch.float32
    half = kernel.logit_difference(logits.half(), a_index, a_mask, w_index, w_mask)
    assert half.dtype == torch.float16
