"""``clap demo``: the whole pipeline on the embedded default study, with no network.

It copies the embedded spec and probes into the output directory (so the run is reproducible from there), runs
the patching study on SmolLM2-135M-Instruct, then the statistics, figures and report.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

DEMO_FILES = ("demo_study.yaml", "demo_probes.jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the embedded default study end to end (patching, statistics, figures, report)",
        description="Definitional vs associative epilepsy knowledge in SmolLM2-135M-Instruct: residual, attention "
        "and MLP patching across all 30 layers, then ANOVA across layers, figures and an HTML report.",
    )
    demo.add_argument("-o", "--out", type=Path, default=Path("demo-output"), help="output directory")
    demo.add_argument("--max-rows", type=int, help="rows per forward pass (default: the spec's)")
    demo.set_defaults(func=run_demo)


def copy_demo_spec(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    package = resources.files("clap") / "data"
    for name in DEMO_FILES:
        with resources.as_file(package / name) as source:
            shutil.copyfile(source, out / name)
    return out / DEMO_FILES[0]


def run_demo(args: argparse.Namespace) -> int:
    """Patch, analyse and report the embedded study through the Python API (no argv round trip through ``main``)."""
    from analyses.report import write_report
    from interventions import Study, StudySpec

    spec = StudySpec.from_yaml(copy_demo_spec(args.out))
    if args.max_rows:
        spec.execution.max_rows = args.max_rows
    results = args.out / "results"
    Study(spec).run(results)
    # the report runs the whole analysis (tables, figures) and then writes the pages: one step, not two
    files = write_report(results)
    print(f"demo finished: open {files.html}")
    return 0
