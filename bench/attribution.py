"""Attribution patching vs exact activation patching on SmolLM2-135M: speed and agreement, in one run.

The same study (shipped epilepsy probes; residual stream entering every layer at every position; attention and MLP
outputs of every layer and every head at the last position; denoising, logit difference) runs once through clap's
exact engine (one patched row per cell, batched) and through ``interventions.attribution`` (one forward and one
backward pass per chunk of probes) at each ``--steps``: 1 is attribution patching proper (the gradient at the
corrupted run), k >= 2 the gradient integrated along the input path over k points (EAP-IG, k rows per probe
instead of 2). Agreement is measured on the effect ``patched - corrupted`` per cell (probe x site x position), per site
kind, and on the probe means per (layer, position/head) that the heatmaps show.
Timings are noisy on a shared machine: the ratio within one run is the number that matters, and the load average
is recorded. Writes ``bench/results/attribution.csv`` and ``bench/results/attribution.md``.

    python bench/attribution.py [--model smollm2-135m] [--probes 20] [--steps 1,2,3] [--max-rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch
from scipy import stats

from clap.contract import atomic_write_frame, atomic_write_text
from interventions import Study, StudySpec, load_model
from interventions.attribution import attribution_from_spec

DATA = Path(__file__).resolve().parent.parent / "clap" / "data" / "probes"
KINDS = ("resid_pre", "attn_out", "mlp_out", "head")


def probes(n: int) -> list[dict]:
    """The first n/2 definitional and n/2 associative probes (the probe files' own order)."""
    out = []
    for name in ("definitional", "associative"):
        lines = (DATA / f"{name}.jsonl").read_text().splitlines()
        for line in [line for line in lines if line.strip()][: n // 2]:
            record = json.loads(line)
            out.append({key: record[key] for key in ("id", "clean", "corrupted", "answer", "wrong")}
                       | {"labels": {"knowledge_type": record["knowledge_type"]}})
    return out


def spec(probe_list: list[dict], max_rows: int | None) -> StudySpec:
    return StudySpec.from_dict({
        "name": "attribution-bench", "model": {"source": "bench"},
        "probes": {"inline": probe_list, "multi_token": "first"},
        "patches": [
            {"sites": ["layers[*].resid_pre"], "positions": ["each"]},
            {"sites": ["layers[*].attn_out", "layers[*].mlp_out", "layers[*].heads[*]"], "positions": ["last"]},
        ],
        "metrics": ["logit_diff"], "execution": {"progress": False, **({"max_rows": max_rows} if max_rows else {})},
    })


def correlations(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def agreement(merged: pd.DataFrame) -> pd.DataFrame:
    rows = []
    slices = [(kind, merged[merged["site_kind"] == kind]) for kind in KINDS]
    resid = merged[merged["site_kind"] == "resid_pre"]
    last = resid["position"] == resid.groupby("probe_id")["position"].transform("max")
    n_layers = int(merged["layer"].max()) + 1
    slices += [
        ("resid_pre, last position", resid[last]),
        ("resid_pre, other positions", resid[~last]),
        (f"resid_pre, layers 0-{n_layers // 2 - 1}", resid[resid["layer"] < n_layers // 2]),
        (f"resid_pre, layers {n_layers // 2}-{n_layers - 1}", resid[resid["layer"] >= n_layers // 2]),
    ]
    for name, part in slices:
        cell_r, cell_rho = correlations(part["effect_exact"], part["effect_approx"])
        index = ["layer", "head"] if name == "head" else ["layer", "position"]
        if name.startswith("resid_pre"):
            # probes differ in length: the heatmap's columns are positions counted from the end
            part = part.assign(position=part["position"] - part.groupby("probe_id")["position"].transform("max"))
        grid = part.groupby(index)[["effect_exact", "effect_approx"]].mean()
        grid_r, grid_rho = correlations(grid["effect_exact"], grid["effect_approx"])
        rows.append({
            "slice": name, "cells": len(part), "pearson_cells": cell_r, "spearman_cells": cell_rho,
            "grid_cells": len(grid), "pearson_probe_means": grid_r, "spearman_probe_means": grid_rho,
            "mean_abs_error": float((part["effect_exact"] - part["effect_approx"]).abs().mean()),
            "mean_abs_exact_effect": float(part["effect_exact"].abs().mean()),
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--steps", default="1,2,3", help="comma-separated integration points to compare")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per batch of the exact engine (default: its own, by execution strategy)")
    parser.add_argument("--repeats", type=int, default=3, help="attribution runs per steps (the exact sweep runs once)")
    args = parser.parse_args()
    step_list = [int(x) for x in args.steps.split(",")]
    model = load_model(args.model)
    study = spec(probes(args.probes), args.max_rows)
    load_before = os.getloadavg()

    start = time.perf_counter()
    exact = Study(study, model=model).run()
    exact_s = time.perf_counter() - start
    exact = exact.assign(effect=exact["patched"] - exact["corrupted"])
    keys = ["probe_id", "site", "positions", "position"]
    tables, timings = [], {}
    for steps in step_list:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            approx = attribution_from_spec(study, model=model, steps=steps)
            seconds.append(time.perf_counter() - start)
        timings[steps] = seconds
        merged = exact.merge(approx[keys + ["effect", "recovery"]], on=keys, suffixes=("_exact", "_approx"))
        assert len(merged) == len(exact) == len(approx), (len(merged), len(exact), len(approx))
        table = agreement(merged)
        table.insert(0, "steps", steps)
        table.insert(0, "model", args.model)
        table["probes"] = args.probes
        table["exact_s"] = round(exact_s, 2)
        table["attribution_s_first"] = round(seconds[0], 2)
        table["attribution_s_best"] = round(min(seconds), 2)
        table["speedup_best"] = round(exact_s / min(seconds), 1)
        table["speedup_first"] = round(exact_s / seconds[0], 1)
        tables.append(table)
    load_after = os.getloadavg()
    table = pd.concat(tables, ignore_index=True)
    out = Path(__file__).parent / "results"
    atomic_write_frame(out / "attribution.csv", table.round(4))

    def name(steps: int) -> str:
        return "attribution" if steps == 1 else f"attribution(ig{steps})"

    lines = [
        "# Attribution patching vs exact patching (approximate results)", "",
        f"Model {args.model}, {args.probes} shipped probes ({args.probes // 2} definitional, {args.probes // 2} "
        f"associative), denoising, logit difference; {len(exact)} cells: residual stream entering every layer at "
        "every position, attention and MLP outputs of every layer and every head at the last position.", "",
        f"- exact engine (`Study.run`, default strategy (suffix locally), max_rows {args.max_rows or 'default'}): "
        f"{exact_s:.1f} s",
        *[f"- `{name(steps)}` (`attribution_from_spec(steps={steps})`): first run {seconds[0]:.2f} s, best of "
          f"{args.repeats} {min(seconds):.2f} s: **{exact_s / min(seconds):.0f}x** faster than exact (best), "
          f"{exact_s / seconds[0]:.0f}x (first run)" for steps, seconds in timings.items()],
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average (1/5/15 min) before {', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in load_after)}", "",
        "Agreement of the effect (patched - corrupted logit difference) with exact patching, per cell and on the probe "
        "means per (layer, position from the end) or (layer, head):", "",
    ]
    columns = ["slice", "cells", "pearson_cells", "spearman_cells", "grid_cells", "pearson_probe_means",
               "spearman_probe_means", "mean_abs_error", "mean_abs_exact_effect"]
    for steps, part in table.groupby("steps", sort=False):
        shown = part[columns].round(3)
        lines += [f"## `{name(int(steps))}`", "",
                  "| " + " | ".join(shown.columns) + " |",
                  "|" + "---|" * len(shown.columns),
                  *["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)], ""]
    atomic_write_text(out / "attribution.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
