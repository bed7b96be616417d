"""``clap patch SPEC.yaml -o DIR``, ``clap sites MODEL [ADDRESS ...]`` and the run of ``clap trace`` (the command
itself is registered by :mod:`clap.app.trace`, which writes the trace's analyses after the run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clap import cli_args
from clap.contract import results_path


def add_execution_flags(parser: argparse.ArgumentParser) -> None:
    """The execution flags ``clap patch`` and ``clap trace`` share (applied by :func:`overridden_spec`)."""
    parser.add_argument("--remote", choices=["false", "true", "local"], help="override execution.remote")
    parser.add_argument("--max-rows", type=cli_args.max_rows,
                        help="override execution.max_rows (rows per forward pass)")
    parser.add_argument("--device", help="override execution.device (cpu, cuda, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="override execution.threads: torch CPU threads for the run (1 "
                        "on a shared or loaded machine; default: one per core)")


def register(subparsers: argparse._SubParsersAction) -> None:
    patch = subparsers.add_parser(
        "patch",
        help="run an activation-patching study spec",
        description="Compile a study spec into batched nnsight runs and write results.parquet + run.json. "
        "An interrupted run resumes from its finished batches when rerun with the same spec and -o.",
    )
    patch.add_argument("spec", type=Path, help="study spec (YAML)")
    patch.add_argument("-o", "--out", type=Path, required=True, help="results directory")
    add_execution_flags(patch)
    patch.add_argument("--source-model", metavar="SOURCE",
                       help="cross-model patching: take the source activations from this model (hub id, folder, "
                            ".gguf, built-in; overrides the spec's source_model)")
    patch.set_defaults(func=run_patch)

    sites = subparsers.add_parser(
        "sites",
        help="list the sites a model offers (or what addresses expand to)",
        description="Print the concrete sites that site addresses resolve to, in forward-execution order.",
    )
    sites.add_argument("model", help="hub id, local directory, .gguf file or built-in name (smollm2-135m)")
    sites.add_argument("addresses", nargs="*", default=["embed", "layers[*].resid_pre", "layers[*].attn_out",
                                                        "layers[*].mlp_out", "final_norm", "unembed"])
    sites.set_defaults(func=run_sites)


def add_trace_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``clap trace`` sub-command's parser with the flags of the trace run (:func:`run_trace_study`). The
    command is registered by ``clap.app.trace``: after the run it writes the analyses' token-group table and
    heatmaps, and an area does not import another."""
    trace = subparsers.add_parser(
        "trace",
        help="run a causal-tracing study (a spec with a `trace:` section) and draw its heatmaps",
        description="Causal tracing (Meng et al. 2022): noise on each probe's subject embeddings, then each clean "
        "hidden state / MLP / attention output restored per (layer, token). Writes results.parquet, run.json, "
        "samples.parquet, token_groups.csv and ROME-style heatmaps.",
    )
    trace.add_argument("spec", type=Path, help="study spec (YAML) with a `trace:` section")
    trace.add_argument("-o", "--out", type=Path, required=True, help="results directory")
    add_execution_flags(trace)
    trace.add_argument("--min-prob", type=float, default=None,
                       help="the model knows a fact when the answer is its top next token or p(answer | clean "
                            "prompt) is at least this (default 0.05); facts it does not know are refused")
    trace.add_argument("--allow-unknown", action="store_true",
                       help="trace facts the model does not know too (they are listed, not refused)")
    return trace


def run_trace_study(args: argparse.Namespace) -> tuple[Any, Any]:
    """Run the trace of ``args.spec`` into ``args.out`` (the facts the model does not know refused first, see
    :func:`check_known_facts`); returns the results frame and the :class:`~interventions.study.Study` (its
    ``samples_frame`` holds the per-draw rows)."""
    from clap.errors import ClapError
    from interventions.spec import StudySpec
    from interventions.study import Study

    spec = overridden_spec(StudySpec.from_yaml(args.spec), args)
    if spec.trace is None:
        raise ClapError(f"{args.spec}: `clap trace` needs a `trace:` section (e.g. `trace: {{samples: 10}}`); "
                        f"run other specs with `clap patch`")
    study = Study(spec)
    check_known_facts(study, args)
    return study.run(args.out), study


def check_known_facts(study: Any, args: argparse.Namespace) -> None:
    """Refuse (or, with ``--allow-unknown``, list) the facts the model does not know before tracing them: ROME traces
    known facts, and a trace of an unknown one (often an answer written without its leading space) restores a
    probability near zero. The checks that need no weights run first, so a bad spec fails before the model loads."""
    import logging

    from clap.devices import torch_threads
    from clap.errors import ClapError
    from interventions.probe_check import TRACE_MIN_PROB, trace_knowledge

    min_prob = TRACE_MIN_PROB if args.min_prob is None else args.min_prob
    if not 0 <= min_prob <= 1:
        raise ClapError(f"--min-prob must be a probability in [0, 1], got {min_prob}")
    with torch_threads(study.spec.execution.threads):
        study.check()
        model = study.model
        unknown = trace_knowledge(study.probes(warn=False), model, min_prob, remote=study.spec.execution.remote)
    if not unknown:
        return
    listing = "\n  ".join(unknown)
    given_min_prob = f" --min-prob {args.min_prob:g}" if args.min_prob is not None else ""
    if args.allow_unknown:
        logging.getLogger(__name__).warning("tracing %d fact(s) the model does not know (--allow-unknown):\n  %s",
                                            len(unknown), listing)
        return
    raise ClapError(f"the model does not know {len(unknown)} of the facts to trace (ROME traces known facts):\n  "
                    f"{listing}\nfix their answers (mind the leading space), keep the known ones (`clap probes "
                    f"check --study {args.spec}{given_min_prob} --write-valid KNOWN.jsonl`), lower --min-prob, or pass "
                    f"--allow-unknown to trace them anyway")


def overridden_spec(spec: Any, args: argparse.Namespace) -> Any:
    """The spec with the command line's execution flags applied (``clap patch`` and ``clap trace`` share them)."""
    from clap.devices import resolve_device
    from clap.errors import ClapError

    execution = spec.execution
    if args.remote is not None:
        execution.remote = {"false": False, "true": True, "local": "local"}[args.remote]
    if args.max_rows is not None:
        execution.max_rows = args.max_rows
    if args.device:
        resolve_device(args.device, where="--device")  # before the spec's own setting is replaced and checked
        execution.device = args.device
    if args.no_progress:
        execution.progress = False
    if args.threads is not None:
        if args.threads < 1:
            raise ClapError(f"--threads must be at least 1, got {args.threads}")
        execution.threads = args.threads
    return spec


def run_patch(args: argparse.Namespace) -> int:
    from interventions.spec import StudySpec
    from interventions.study import Study

    spec = overridden_spec(StudySpec.from_yaml(args.spec), args)
    if args.source_model:  # validated like the spec's own section (operations that can read another model)
        data = spec.to_dict()
        data["source_model"] = {"source": args.source_model}
        overridden = StudySpec.from_dict(data, source=f"{args.spec} with --source-model")
        overridden._base_dir, overridden._source, overridden._lines = spec._base_dir, spec._source, spec._lines
        spec = overridden
    frame = Study(spec).run(args.out)
    n_undefined = int((~frame.recovery_defined).sum())
    print(
        f"{len(frame)} result rows ({frame.probe_id.nunique()} probes x {frame.site.nunique()} sites) "
        f"written to {results_path(args.out)}"
        + (f"; {n_undefined} rows have undefined recovery ("
           + ("kl has no cross-model recovery; otherwise source model ~= target model" if spec.source_model
              else "clean ~= corrupted") + ")" if n_undefined else "")
    )
    return 0


def run_sites(args: argparse.Namespace) -> int:
    from clap.models import load_model
    from interventions.sites import SiteResolver

    model = load_model(args.model)
    resolver = SiteResolver(model.hf)
    for site in resolver.resolve(args.addresses):
        layer = "" if site.layer is None else site.layer
        sys.stdout.write(f"{site.name:32s} {site.kind:11s} {site.module}:{site.access}  {layer}\n")
    return 0
