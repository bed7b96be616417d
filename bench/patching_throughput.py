"""Patching throughput: clap's batched single-pass engine vs one forward pass per cell, in one run.

Timings on shared machines are noisy, so the result that matters is the *ratio* measured in the same process:
the same study (same cells, same numbers) with ``max_rows`` large (many cells per forward pass) vs
``max_rows=3`` (clean + corrupted + one patched row per pass, i.e. what a per-cell loop costs), plus the overhead
of nnsight's local NDIF simulation. Writes ``bench/results/patching_throughput.json``.

    python bench/patching_throughput.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from interventions import Study, StudySpec, load_model

PROBES = [
    {"id": "ep-tachy", "clean": "Epilepsy is a disorder of the", "corrupted": "Tachycardia is a disorder of the",
     "answer": " brain", "wrong": " heart"},
    {"id": "eeg-ecg", "clean": "The EEG measures electrical activity in the",
     "corrupted": "The ECG measures electrical activity in the", "answer": " brain", "wrong": " heart"},
    {"id": "people-asthma", "clean": "People with epilepsy often have", "corrupted": "People with asthma often have",
     "answer": " seizures", "wrong": " asthma"},
    {"id": "symptom-gout", "clean": "The main symptom of epilepsy is recurrent",
     "corrupted": "The main symptom of gout is recurrent", "answer": " seizures", "wrong": " wheezing"},
]


def timed(model, max_rows: int, remote, repeats: int) -> tuple[float, int]:
    spec = StudySpec.from_dict({
        "model": {"source": "bench"}, "probes": {"inline": PROBES},
        "sites": ["layers[*].resid_pre", "layers[*].mlp_out"], "positions": ["last"],
        "metrics": ["logit_diff"], "execution": {"max_rows": max_rows, "remote": remote, "progress": False},
    })
    best = float("inf")
    frame = None
    for _ in range(repeats):
        start = time.perf_counter()
        frame = Study(spec, model=model).run()
        best = min(best, time.perf_counter() - start)
    return best, len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = load_model(args.model)
    batched, cells = timed(model, 128, False, args.repeats)
    per_cell, _ = timed(model, 3, False, args.repeats)
    simulated, _ = timed(model, 128, "local", args.repeats)
    result = {
        "model": args.model,
        "cells": cells,
        "batched_s": round(batched, 3),
        "one_cell_per_pass_s": round(per_cell, 3),
        "speedup_batched_vs_per_cell": round(per_cell / batched, 2),
        "remote_local_simulation_s": round(simulated, 3),
        "remote_local_overhead_ratio": round(simulated / batched, 2),
        "cells_per_s_batched": round(cells / batched, 1),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "patching_throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
