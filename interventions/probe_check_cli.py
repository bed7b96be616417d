"""``clap probes check`` on the command line: the stand-alone form (a probe file and ``--model``), the ``--study`` form
(each model a study runs, through :class:`StudyRun`), the outputs (``-o`` CSV, ``--write-valid``) and the tokenizer
alone for ``--structural-only``. What is checked is :mod:`interventions.probe_check`; how it is printed,
:mod:`interventions.probe_table`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clap.contract import atomic_write_text
from clap.errors import ClapError
from clap.outputs import prepare_output_file
from clap.yamlio import load_jsonl
from interventions import probe_check
from interventions.probe_check import (
    TRACE_MIN_PROB,
    check_probes,
    check_study,
    check_study_structure,
    read_specs,
)
from interventions.probe_table import print_report, summary_line
from interventions.probes import ProbeError, read_probe_specs
from interventions.spec import ProbeSpec, StudySpec

if TYPE_CHECKING:  # imported where a model runs or a table is built: `clap --help` stays fast
    import pandas as pd


#: what ``--study`` takes from the study instead: the option, its default, and the spec's field
STUDY_SETS = (("file", None, "probes"), ("model", None, "model / models"),
              ("multi_token", None, "probes.multi_token"), ("alignment", None, "alignment"),
              ("trace", False, "trace"), ("subject", None, "trace.subject"), ("dtype", None, "execution.dtype"))


@dataclass
class StudyRun:
    """One model's run of a study as the probe check sees it: the ``clap patch`` spec that model runs, and the
    probe records with the origins a user can open (a study file's ``probes.files`` are read file by file; its spec
    then holds them inline, ``probes.inline[i]`` being ``records[i]``)."""

    label: str  #: the model's name in a study with several; "" for one
    spec: StudySpec
    records: list[tuple[str, ProbeSpec]]


#: reads ``--study FILE`` into the runs to check and notes on what is left out (e.g. a model the run trains)
StudyLoader = Callable[[Path], tuple[list[StudyRun], list[str]]]


def patch_spec_runs(path: Path) -> tuple[list[StudyRun], list[str]]:
    """A ``clap patch`` spec: one run (``clap run`` study files are read by the command line's own loader)."""
    spec = StudySpec.from_yaml(path)
    return [StudyRun("", spec, read_probe_specs(spec.probes, spec.base_dir))], []


def run_check(args: argparse.Namespace, load_study: StudyLoader = patch_spec_runs) -> int:
    if args.min_logit_diff < 0 or not math.isfinite(args.min_logit_diff):
        raise ProbeError(f"--min-logit-diff must be a finite number >= 0, got {args.min_logit_diff}")
    if args.min_prob is not None and not 0 <= args.min_prob <= 1:
        raise ProbeError(f"--min-prob must be a probability in [0, 1], got {args.min_prob}")
    if args.study:
        return run_study_check(args, load_study)
    if not args.file or not args.model:
        raise ProbeError("give a probe file and --model (`clap probes check PROBES.jsonl --model MODEL`), or a study "
                         "whose probes, settings and model are checked (`clap probes check --study STUDY.yaml`)")
    path = Path(args.file)
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    specs = read_specs(path)  # bad probe files fail here, before any model is loaded
    prepare_outputs(args)
    model = None
    if args.structural_only:
        tokenizer = load_tokenizer(args.model)
    else:
        from clap.models import load_model

        model = load_model(args.model, dtype=args.dtype or "float32", device=args.device or "cpu")
        tokenizer = model.tokenizer
    frame = check_probes(path, tokenizer, model, args.min_logit_diff, args.batch_size,
                         multi_token=args.multi_token or "error", alignment=args.alignment or "strict",
                         trace=args.trace, subject=args.subject or "subject", min_prob=args.min_prob,
                         suggest=args.suggest)
    show(frame, model is not None)
    write_outputs(args, frame, specs, model is not None)
    return 0


def run_study_check(args: argparse.Namespace, load_study: StudyLoader) -> int:
    """``--study``: the study's probes under its own settings, on each model it runs (``--device`` overrides
    ``execution.device`` as in ``clap patch``). With several models, the CSV carries a ``model`` column and a probe
    is valid when it is valid on every model checked."""
    import pandas as pd

    from clap.devices import resolve_device

    given = [(f"--{name.replace('_', '-')}" if name != "file" else "a probe file", field)
             for name, default, field in STUDY_SETS if getattr(args, name) != default]
    if given:
        raise ProbeError(f"--study takes {', '.join(g for g, _ in given)} from the study "
                         f"({', '.join(f for _, f in given)}); drop {'it' if len(given) == 1 else 'them'} or check a "
                         f"probe file without --study")
    runs, notes = load_study(Path(args.study))  # bad specs and probe files fail here, before any model is loaded
    if args.device:
        resolve_device(args.device, where="--device")
        for run in runs:
            run.spec.execution.device = args.device
    prepare_outputs(args)
    frames = []
    for run in runs:
        if len(runs) > 1:
            print(f"\n== model {run.label} ({run.spec.model.source}) ==")
        frame = check_study_run(run, args)
        show(frame, not args.structural_only)
        frames.append(frame.assign(model=run.label) if len(runs) > 1 else frame)
    for note in notes:
        print(f"note: {note}")
    if not frames:
        raise ProbeError(f"{args.study}: no model of the study can be checked here ({'; '.join(notes)})")
    combined = pd.concat(frames) if len(frames) > 1 else frames[0]  # the index stays each probe's position
    written = write_outputs(args, combined, runs[0].records, not args.structural_only)
    if written:
        print(f"point the study's `probes: {{file: ...}}` at {args.write_valid} to run them")
    return 0


def check_study_run(run: StudyRun, args: argparse.Namespace) -> pd.DataFrame:
    """One model's check: structural with the tokenizer alone (``--structural-only``), else on the loaded model(s)
    through the study's resolution."""
    from clap.devices import torch_threads
    from interventions.full_traces import check_remote
    from interventions.resolved import ResolvedStudy, located
    from interventions.study import Study

    spec = run.spec
    if not run.records:
        raise ProbeError(f"{spec.where(('probes',))}: the probe set is empty")
    if args.structural_only:
        tokenizer = load_tokenizer(located(spec, spec.model.tokenizer or spec.model.source) or spec.model.source)
        return check_study_structure(spec, tokenizer, run.records, args.suggest)
    study = Study(spec)
    for model in (spec.model, spec.source_model):  # NDIF: the key and the hosted model, before anything loads
        if model is not None:
            check_remote(spec.execution.remote, model.source)
    with torch_threads(spec.execution.threads):
        resolved = ResolvedStudy.for_probe_check(spec, study.model, study.source_model)
        return check_study(resolved, args.min_logit_diff, min_prob=args.min_prob, batch_size=args.batch_size,
                           suggest=args.suggest, records=run.records)


def prepare_outputs(args: argparse.Namespace) -> None:
    """The CSV and valid-probe targets checked before a model loads, not after the check has run."""
    for option, target in (("-o", args.output), ("--write-valid", args.write_valid)):
        if target:
            prepare_output_file(target, what=option)


def show(frame: pd.DataFrame, ran_model: bool) -> None:
    """The table, the summary line and the problems of the whole probe set."""
    print_report(frame, ran_model)
    print(summary_line(frame, ran_model))
    for problem in frame.attrs.get("study_problems", []):
        print(f"study problem: {problem}")


def write_outputs(args: argparse.Namespace, frame: pd.DataFrame, records: Sequence[tuple[str, ProbeSpec]],
                  ran_model: bool) -> int:
    """The CSV (``-o``) and the valid probes (``--write-valid``; the structurally sound ones without a model);
    returns how many valid probes were written (0 under ``--structural-only``, whose probes are not known valid)."""
    if args.output:
        atomic_write_text(Path(args.output), frame.to_csv(index=False))
        print(f"wrote {args.output} (every column, problems in full)")
    if not args.write_valid:
        return 0
    if not ran_model:
        n = write_valid(records, frame, Path(args.write_valid), column="structural_ok")
        print(f"wrote {n} probes that pass the structural checks to {args.write_valid} (not checked on the model: "
              f"whether it knows and flips them is unknown)")
        return 0
    n = write_valid(records, frame, Path(args.write_valid))
    print(f"wrote {n} valid probes to {args.write_valid}" + ("" if n else " (none: a study needs at least one)"))
    return n


def register_probes(subparsers: Any, load_study: StudyLoader = patch_spec_runs) -> None:
    """``clap probes check``; registered on its own so it grows without editing interventions/cli.py.
    ``load_study`` reads ``--study FILE``: the command line passes one that reads ``clap run`` study files too."""
    probes = subparsers.add_parser("probes", help="check probe files against a model's tokenizer and knowledge")
    actions = probes.add_subparsers(dest="probes_action", metavar="ACTION")
    probes.set_defaults(func=lambda args: probes.print_help() or 2)
    check = actions.add_parser(
        "check",
        help="token lengths, answer tokens, clean/corrupted logit differences and validity per probe",
        description=probe_check.__doc__.split("\n\n")[1],
    )
    check.add_argument("file", nargs="?", help="probe file (.jsonl or .yaml); or --study")
    check.add_argument("--study", metavar="STUDY.yaml",
                       help="check a study's probes under its own settings (multi_token, alignment, corrupted "
                            "prompt, trace subject, metrics, context length) on the model(s) it runs; a probe "
                            "called valid is one the study runs")
    check.add_argument("--model", help="hub id, model folder, .gguf file, built-in name, or (with "
                       "--structural-only) a folder of GPT-2 vocab.json + merges.txt")
    check.add_argument("-o", "--output", help="write the per-probe table as CSV")
    check.add_argument("--write-valid", metavar="VALID.jsonl", help="write the valid probes (source records) here")
    check.add_argument("--min-logit-diff", type=float, default=0.0,
                       help="the model knows a fact when its clean logit difference exceeds this (default 0)")
    check.add_argument("--multi-token", choices=["error", "first", "set"],
                       help="an answer string of several tokens, as the study's probes.multi_token: a problem "
                            "(error, default), its first token (first), or the mean over its tokens (set)")
    check.add_argument("--alignment", choices=["strict", "right"],
                       help="as the study's alignment: strict (default) needs clean and corrupted prompts of one "
                            "token length; right aligns them at the end")
    check.add_argument("--trace", action="store_true",
                       help="causal-tracing probes: a subject in the clean prompt, no corrupted prompt or wrong "
                            "answer needed; the model knows the fact when the answer is its top next token or "
                            "likely enough (--min-prob)")
    check.add_argument("--subject", metavar="FIELD",
                       help="the probe field naming the subject (the study's trace.subject; default subject)")
    check.add_argument("--min-prob", type=float, default=None,
                       help=f"with --trace: the model knows the fact when the answer is its top next token or "
                            f"p(answer) is at least this (default {TRACE_MIN_PROB})")
    check.add_argument("--suggest", action="store_true",
                       help="for each length mismatch, list corrupted prompts with the differing words replaced "
                            "so the token counts match (from the file's words and the vocabulary)")
    check.add_argument("--structural-only", action="store_true",
                       help="tokenizer checks only; no weights are loaded or converted (validity is then unknown)")
    check.add_argument("--device", help="cpu (default), cuda, ...; with --study, overrides execution.device")
    check.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default float32")
    check.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    check.set_defaults(func=lambda args: run_check(args, load_study))


def write_valid(records: Sequence[tuple[str, ProbeSpec]], frame: pd.DataFrame, target: Path,
                column: str = "valid") -> int:
    """The probes whose ``column`` is True in every row of theirs (the valid ones, on every model checked;
    ``structural_ok`` under ``--structural-only``), as JSONL in file order, atomically: a JSONL probe as its source
    record (all fields, PMIDs included), a YAML or inline probe as the validated probe with its labels as top-level
    keys. ``frame``'s index is the record's position in ``records`` (each model's frame repeats it)."""
    verdicts = frame[column].astype("boolean").fillna(False).groupby(level=0).all()
    files: dict[str, dict[int, Any]] = {}
    lines = []
    for index, (origin, spec) in enumerate(records):
        if not verdicts.get(index, False):
            continue
        path, _, number = origin.rpartition(":")
        if Path(path).suffix in (".jsonl", ".json") and number.isdigit():  # origins are "<path>:<line>"
            if path not in files:
                files[path] = dict(load_jsonl(Path(path)))
            lines.append(json.dumps(files[path][int(number)]))
        else:
            record = spec.model_dump(exclude_none=True, exclude={"labels"})
            lines.append(json.dumps({**record, **spec.labels}))
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return len(lines)


def load_tokenizer(source: str) -> Any:
    """The model's tokenizer alone: no weights are read or converted.

    A built-in model or a ``.gguf`` file gives its tokenizer from the GGUF's metadata (transformers reads the
    vocabulary and merges without dequantising a tensor), so ``--structural-only`` never waits for the one-off
    conversion that patching needs. A folder holding only ``vocab.json`` + ``merges.txt`` (GPT-2 BPE files) is read
    with ``GPT2Tokenizer``, because the fast class silently builds an empty tokenizer from those two files.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer

    from clap.models import prepare_tokenizer, resolve_source

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vocab.json").is_file():
        if not (path / "merges.txt").is_file():
            raise ClapError(f"{path}: vocab.json without merges.txt; a GPT-2 tokenizer needs both")
        return prepare_tokenizer(GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")))
    gguf = gguf_file_of(source)
    if gguf is not None:
        try:
            return prepare_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        except (OSError, ValueError) as exc:
            raise ClapError(f"could not read a tokenizer from the GGUF file {gguf}: {exc}") from exc
    location, _ = resolve_source(source)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(location))
    except OSError as exc:
        raise ClapError(f"could not load a tokenizer from {location!r}: {exc}") from exc


def gguf_file_of(source: str) -> Path | None:
    """The GGUF file whose metadata holds ``source``'s tokenizer: a built-in model's packaged file (a built-in
    fine-tuned model shares its base model's tokenizer), a ``.gguf`` path; None for other sources."""
    from clap.builtin_adapters import BUILTIN_ADAPTERS
    from clap.models import BUILTIN_GGUF, ModelLoadError, builtin_gguf_path

    base = BUILTIN_ADAPTERS[source][0] if source in BUILTIN_ADAPTERS else source
    if base in BUILTIN_GGUF:
        return builtin_gguf_path(base)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path
    return None



register = register_probes
