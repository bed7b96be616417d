"""Where a layer x position sweep's time goes: cProfile by stage and torch.profiler by operator.

Runs one sweep of the side-by-side benchmark (``bench/side_by_side.py``: random GPT-2-small, the real tokenizer,
workload ``e`` (pairs that differ at token ``--corrupt-at``) or ``a`` (shared prefix)) once to warm up, once timed
plainly, once under cProfile and once under torch.profiler, and writes a Markdown breakdown:

* by stage (cProfile cumulative seconds of the engine's own functions): plan compilation, the baseline pass (an
  nnsight trace), the per-row Python of the suffix strategy (``row_starts``, ``no_op_rows``, ``pass_edits``), the
  ragged passes and inside them the blocks (attention, MLP, layer norms), the prefix key/value assembly, the
  metric reduction, and the results' tidy rows;
* by operator (torch.profiler self CPU time): matmuls, elementwise ops, gathers/copies, concatenation.

cProfile counts the process's CPU time (a shared machine's load disturbs it less than wall time); its own overhead
inflates many small calls: read its column as shares, and the plain run as the time.

    python bench/profile_sweep.py [--workload e] [--pairs 4] [--sweep resid_pre] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import load_average, write_atomic
from side_by_side import DEFAULT_TOKENIZER, build_gpt2, clap_sweep, encode, load_tokenizer, make_early_pairs, make_pairs


def _key(function: Callable) -> tuple[str, int, str]:
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def stages() -> list[tuple[str, Any]]:
    """``(label, function)`` of the stages reported, in the order printed (indentation: part of the line above)."""
    from transformers.models.gpt2 import modeling_gpt2 as gpt2

    from interventions import kernel, ragged, study, suffix, tidy

    found = [
        ("Study.run (total)", study.Study.run),
        ("  plan compilation (incl. weights fingerprint)", study.Study.plan),
        ("  suffix.run_batch", suffix.run_batch),
        ("    baseline pass (nnsight trace)", suffix._baseline_pass),
        ("    row_starts", suffix.row_starts),
        ("    no_op_rows", suffix.no_op_rows),
        ("    pass_edits", suffix.pass_edits),
        ("    self_check (first batch)", ragged.self_check),
        ("    ragged passes (run_pass)", ragged.run_pass),
        ("      GPT-2 blocks", gpt2.GPT2Block.forward),
        ("        attention", gpt2.GPT2Attention.forward),
        ("        MLP", gpt2.GPT2MLP.forward),
        ("        layer norms", torch.nn.LayerNorm.forward),
        ("      prefix key/value cache (update)", ragged.PrefixCache.update),
        ("      block arguments (for_pass)", ragged.BlockInputs.for_pass),
        ("    reduce_metrics (all calls)", kernel.reduce_metrics),
        ("  tidy rows", tidy.TidyRows.rows),
    ]
    for name in ("column_groups", "pass_groups", "_rows_below"):
        if hasattr(ragged, name):
            found.insert(-3, (f"    ragged.{name}", getattr(ragged, name)))
    return found


def own_python(stats: pstats.Stats, roots: Sequence[str]) -> float:
    """Self time (tottime) of every function defined under ``roots`` (clap's packages): its Python and the tensor
    indexing it does inline."""
    return sum(row[2] for (filename, _, _), row in stats.stats.items() if any(r in filename for r in roots))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("a", "e"), default="e")
    parser.add_argument("--corrupt-at", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--sweep", default="resid_pre", choices=("resid_pre", "attn_out", "mlp_out"))
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--label", default="", help="a heading for the breakdown (e.g. before / after)")
    parser.add_argument("--out", default=None, help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    lm = build_gpt2(tokenizer, False, 0)
    pairs = (make_early_pairs(tokenizer, args.pairs, args.tokens, args.corrupt_at) if args.workload == "e"
             else make_pairs(tokenizer, args.pairs, args.tokens))
    inputs = encode(tokenizer, pairs)

    def go() -> Any:
        return clap_sweep(lm, inputs, args.sweep, args.max_rows)

    load_start = load_average()
    go()  # warm-up: the self-check, the architecture's execution order, allocator
    start, cpu = time.perf_counter(), time.process_time()
    go()
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - cpu
    profile = cProfile.Profile(time.process_time)  # CPU time: less disturbed by other processes than wall time
    start = time.perf_counter()
    profile.runcall(go)
    profiled = time.perf_counter() - start
    stats = pstats.Stats(profile)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        go()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)

    lines = [f"### {args.label or 'profile'}: workload {args.workload}, {args.pairs} pairs, {args.sweep}", "",
             f"torch threads {torch.get_num_threads()}; load average {load_start} -> {load_average()}; "
             f"plain run {plain:.2f} s wall, {plain_cpu:.2f} s CPU; under cProfile {profiled:.2f} s wall", "",
             "| stage (cProfile cumulative, CPU seconds) | s | share of total |", "|---|---|---|"]
    total = None
    for label, function in stages():
        row = stats.stats.get(_key(function))
        seconds = row[3] if row else 0.0
        total = total or seconds
        calls = row[1] if row else 0
        lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} ({calls} calls) | {seconds:.2f} | "
                     f"{seconds / total:.1%} |" if total else f"| {label} | {seconds:.2f} | |")
    python = own_python(stats, [os.sep + "interventions" + os.sep, os.sep + "clap" + os.sep])
    lines += [f"| clap's own Python (self time in interventions/ and clap/) | {python:.2f} | "
              f"{python / total:.1%} |" if total else "", "", "torch.profiler, by operator (self CPU time):", "",
              "```", ops, "```", ""]
    text = "\n".join(lines)
    if args.out:
        write_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
