"""``clap trace SPEC.yaml -o DIR``: run a causal trace and write its token-group table and heatmaps beside it.

Why in the roof: the command joins two areas, the engine's trace run (:func:`interventions.cli.run_trace_study`:
the spec's execution flags, the known-facts check, the run) and the analyses of its results
(:func:`analyses.trace.write_trace_outputs`: ROME's token-group table with the spread over noise draws, the averaged
and per-probe heatmaps), and an area never imports another (``clap run``'s ``trace[NAME]`` stage joins them the same
way).
"""

from __future__ import annotations

import argparse

from clap.contract import results_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``trace``: the run's flags (:func:`interventions.cli.add_trace_parser`) and how many probes to draw."""
    from interventions.cli import add_trace_parser

    trace = add_trace_parser(subparsers)
    trace.add_argument("--probe-figures", type=int, default=3, help="per-probe heatmaps to draw (default 3)")
    trace.set_defaults(func=run_trace)


def run_trace(args: argparse.Namespace) -> int:
    """Run the trace, then write ``token_groups.csv`` and the heatmaps into the results folder."""
    from analyses.trace import write_trace_outputs
    from interventions.cli import run_trace_study

    frame, study = run_trace_study(args)
    written = write_trace_outputs(frame, args.out, args.probe_figures, samples=study.samples_frame)
    print(f"{len(frame)} result rows ({frame.probe_id.nunique()} probes) written to {results_path(args.out)}; "
          f"{', '.join(p.name for p in written)}")
    return 0
