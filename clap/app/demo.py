"""``clap demo``: the whole study on the embedded default, with no network.

It copies the embedded study file and probes into the output directory (so the run is reproducible from there) and
runs them with the Python API of ``clap run`` (:func:`clap.app.pipeline.run_study`): patching of the base and the
fine-tuned SmolLM2-135M-Instruct, statistics, figures and a report per model, their comparison, and the study's
report. A rerun skips every stage that is up to date.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

from clap import cli_args

DEMO_FILES = ("demo_study.yaml", "demo_probes.jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the embedded default study end to end (patching, statistics, comparison, report)",
        description="Definitional vs associative epilepsy knowledge in SmolLM2-135M-Instruct before and after "
        "fine-tuning on epilepsy abstracts (the shipped LoRA adapter): residual, attention, MLP and head patching "
        "across all 30 layers, ANOVA across layers, base vs fine-tuned comparison, figures and HTML reports.",
    )
    demo.add_argument("-o", "--out", type=Path, default=Path("demo-output"), help="output directory")
    demo.add_argument("--max-rows", type=cli_args.max_rows, help="rows per forward pass (default: the spec's)")
    demo.set_defaults(func=run_demo)


def copy_demo_spec(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    package = resources.files("clap") / "data"
    for name in DEMO_FILES:
        with resources.as_file(package / name) as source:
            shutil.copyfile(source, out / name)
    return out / DEMO_FILES[0]


def run_demo(args: argparse.Namespace) -> int:
    """Run the embedded study through the Python API of ``clap run`` (no argv round trip through ``main``)."""
    from clap.app.pipeline import run_study

    result = run_study(copy_demo_spec(args.out), args.out, max_rows=args.max_rows)
    print(f"demo finished: open {result.report}")
    return 0
