"""Peak memory under two ``execution.memory_budget_mb`` settings, and the same numbers under both.

Why a separate script: peak RSS is a process's high-water mark, so each budget runs in a fresh subprocess (the
parent reads the child's ``ru_maxrss``); the sweep is the side-by-side workload (a) (random GPT-2-small, real GPT-2
tokenizer, ``resid_pre`` at every layer x position). Writes ``bench/results/memory_budget.md`` and exits 1 if the
results differ by more than 1e-6 between budgets.

    python bench/memory_budget.py [--budgets 250,2000] [--pairs 2] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def child(budget: float, pairs: int, tokens: int, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    import side_by_side as sbs

    from interventions import sweep, to_grid

    tokenizer = sbs.load_tokenizer(sbs.DEFAULT_TOKENIZER)
    lm = sbs.build_gpt2(tokenizer, quick=False, seed=0)
    inputs = sbs.encode(tokenizer, sbs.make_pairs(tokenizer, pairs, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    frame = sweep(lm, inputs.pairs, ["layers[*].resid_pre"], positions=["each"], metrics=["logit_diff"],
                  memory_budget_mb=budget)
    np.save(out, to_grid(frame).to_numpy(dtype="float64"))
    print(json.dumps({"rss_before_sweep_mb": before / 1024}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="250,2000")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--npy", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.pairs, args.tokens, Path(args.npy))
        return 0
    rows, grids = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in [float(b) for b in args.budgets.split(",")]:
            npy = Path(tmp) / f"{budget}.npy"
            done = subprocess.run([sys.executable, __file__, "--child", str(budget), "--pairs", str(args.pairs),
                                   "--tokens", str(args.tokens), "--npy", str(npy)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(HERE.parent)}, check=True)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
            info = json.loads(done.stdout.strip().splitlines()[-1])
            grids.append(np.load(npy))
            rows.append((budget, info["rss_before_sweep_mb"], peak))
    diff = max(float(np.nanmax(np.abs(g - grids[0]))) for g in grids)
    lines = ["# Peak memory under two memory budgets", "",
             f"random GPT-2-small, {args.pairs} pairs x {args.tokens} tokens, resid_pre at every layer x position; "
             f"the default execution strategy (suffix, locally); load average {os.getloadavg()[0]:.2f}", "",
             "| memory_budget_mb | RSS before the sweep (MB) | peak RSS of the run (MB) | peak - before (MB) |",
             "|---|---|---|---|"]
    lines += [f"| {b:g} | {before:.0f} | {peak:.0f} | {peak - before:.0f} |" for b, before, peak in rows]
    lines += ["", f"max |difference| between the budgets' results: {diff:.1e}", "",
              "(peak RSS is read as the largest child so far, so budgets are listed smallest first)"]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory_budget.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
