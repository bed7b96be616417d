"""``clap probes check``: is a probe file fit for patching on a given model, before any patching is run?

Why a separate check: a patching study only means something on probes whose clean and corrupted prompts have one
token length (positions line up), whose answers are single tokens or declared token sets, and -- on the model
studied -- whose fact the model knows (clean logit difference above a threshold) and whose corruption flips the
preference (corrupted logit difference below zero). A probe that fails any of these makes a recovery score of
noise. The structural part needs only the tokenizer (``--structural-only``); the behavioural part runs the clean
and corrupted prompts of every probe through the model in batched, left-padded forward passes.

The logit difference of a row is mean(logits[answer set]) - mean(logits[wrong set]) at the last position, the
same quantity ``execute.py`` computes for the ``logit_diff`` metric.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clap.contract import atomic_write_text
from clap.errors import ClapError
from clap.outputs import prepare_output_file
from clap.yamlio import SourceError, load_jsonl
from interventions.probes import ProbeError, _answer_ids, read_probe_specs
from interventions.spec import ProbeSetSpec, ProbeSpec

if TYPE_CHECKING:  # imported where a model runs or a table is built: `clap --help` stays fast
    import pandas as pd
    import torch


@dataclass
class AnswerTokens:
    """How one answer field tokenises: its ids, their pieces, and whether it is usable as given."""

    ids: list[int]
    pieces: list[str]
    kind: str  #: ``single`` (one token), ``set`` (a declared list of single tokens), ``multi`` (a string of several)
    problem: str = ""


@dataclass
class ProbeCheck:
    """One probe's structural and (optionally) behavioural verdict; one CSV row."""

    id: str
    origin: str
    clean: str
    corrupted: str
    labels: dict[str, str]
    n_clean: int
    n_corrupted: int
    answer: AnswerTokens
    wrong: AnswerTokens | None
    problems: list[str] = field(default_factory=list)
    clean_logit_diff: float = math.nan
    corrupted_logit_diff: float = math.nan

    @property
    def equal_length(self) -> bool:
        return self.n_clean == self.n_corrupted

    @property
    def structural_ok(self) -> bool:
        return not self.problems

    def row(self, threshold: float, ran_model: bool) -> dict[str, Any]:
        knows = bool(self.clean_logit_diff > threshold) if ran_model else None
        flips = bool(self.clean_logit_diff > 0 and self.corrupted_logit_diff < 0) if ran_model else None
        valid = self.structural_ok and (knows and flips if ran_model else True)
        wrong = self.wrong or AnswerTokens([], [], "none")
        return {
            "id": self.id,
            **self.labels,
            "n_clean": self.n_clean,
            "n_corrupted": self.n_corrupted,
            "equal_length": self.equal_length,
            "answer_ids": " ".join(map(str, self.answer.ids)),
            "answer_pieces": json.dumps(self.answer.pieces),
            "answer_kind": self.answer.kind,
            "wrong_ids": " ".join(map(str, wrong.ids)),
            "wrong_pieces": json.dumps(wrong.pieces),
            "wrong_kind": wrong.kind,
            "structural_ok": self.structural_ok,
            "problems": "; ".join(self.problems),
            "clean_logit_diff": self.clean_logit_diff,
            "corrupted_logit_diff": self.corrupted_logit_diff,
            "knows": knows,
            "flips": flips,
            "valid": valid,
            "origin": self.origin,
        }


def _tokenise_answer(value: Any, tokenizer: Any, origin: str, what: str) -> AnswerTokens:
    """Tokenise an answer without refusing multi-token strings: the check reports them instead of stopping."""
    ids = _answer_ids(value, tokenizer, "set", origin, what)
    pieces = [tokenizer.decode([i]) for i in ids]
    if isinstance(value, list):
        several = [v for v in value
                   if isinstance(v, str) and len(tokenizer(v, add_special_tokens=False)["input_ids"]) > 1]
        if several:
            return AnswerTokens(ids, pieces, "set", f"{what} set member(s) {several} are several tokens each")
        return AnswerTokens(ids, pieces, "set" if len(ids) > 1 else "single")
    if len(ids) > 1:
        return AnswerTokens(
            ids, pieces, "multi", f"{what} {value!r} is {len(ids)} tokens {pieces}; give one token or a list of tokens"
        )
    return AnswerTokens(ids, pieces, "single")


def structural_checks(specs: Sequence[tuple[str, ProbeSpec]], tokenizer: Any) -> list[ProbeCheck]:
    """Token lengths, answer tokenisation, duplicate ids and duplicate clean prompts, per probe."""
    checks: list[ProbeCheck] = []
    first_id: dict[str, str] = {}
    first_clean: dict[str, str] = {}
    for index, (origin, spec) in enumerate(specs):
        probe_id = spec.id or f"p{index:04d}"
        answer = _tokenise_answer(spec.answer, tokenizer, origin, "answer")
        wrong = _tokenise_answer(spec.wrong, tokenizer, origin, "wrong") if spec.wrong is not None else None
        check = ProbeCheck(
            id=probe_id,
            origin=origin,
            clean=spec.clean,
            corrupted=spec.corrupted,
            labels=dict(spec.labels),
            n_clean=len(tokenizer(spec.clean)["input_ids"]),
            n_corrupted=len(tokenizer(spec.corrupted)["input_ids"]),
            answer=answer,
            wrong=wrong,
        )
        if not check.equal_length:
            check.problems.append(f"clean is {check.n_clean} tokens, corrupted {check.n_corrupted}")
        check.problems += [a.problem for a in (answer, wrong) if a is not None and a.problem]
        if wrong is None:
            check.problems.append("no `wrong` answer: the logit difference is undefined")
        elif set(answer.ids) & set(wrong.ids):
            check.problems.append(f"answer and wrong share token(s) {sorted(set(answer.ids) & set(wrong.ids))}")
        if probe_id in first_id:
            check.problems.append(f"duplicate id (first at {first_id[probe_id]})")
        first_id.setdefault(probe_id, origin)
        if spec.clean in first_clean:
            check.problems.append(f"duplicate clean prompt (first at {first_clean[spec.clean]})")
        first_clean.setdefault(spec.clean, origin)
        checks.append(check)
    return checks


def last_token_logits(hf_model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int,
                      batch_size: int = 64) -> torch.Tensor:
    """Last-position logits [n_prompts, vocab] from left-padded batched forward passes (in the model's dtype)."""
    import torch

    from interventions.alignment import left_pad

    device = next(hf_model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad_id)
        # left padding shifts absolute positions; count each row from its first real token (as nnsight does)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = hf_model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
            ).logits
        out.append(logits[:, -1, :].cpu())
    return torch.cat(out)


def logit_diffs(logits: torch.Tensor, answer_ids: Sequence[int], wrong_ids: Sequence[int]) -> torch.Tensor:
    """Mean over the answer set minus mean over the wrong set, per row, reduced in float64 by the edit kernel (the
    same reduction as patching's ``logit_diff``)."""
    import torch

    from interventions import kernel

    answer_index, answer_mask = kernel.token_sets([answer_ids] * len(logits))
    wrong_index, wrong_mask = kernel.token_sets([wrong_ids] * len(logits))
    return kernel.logit_difference(logits.to(torch.float64), answer_index, answer_mask, wrong_index, wrong_mask)


def behavioural_checks(checks: Sequence[ProbeCheck], hf_model: torch.nn.Module, tokenizer: Any,
                       batch_size: int = 64) -> None:
    """Fill in clean and corrupted logit differences of every probe that has an answer and a wrong answer."""
    runnable = [c for c in checks if c.wrong is not None and c.answer.ids and c.wrong.ids]
    if not runnable:
        return
    prompts = ([tokenizer(c.clean)["input_ids"] for c in runnable]
               + [tokenizer(c.corrupted)["input_ids"] for c in runnable])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = last_token_logits(hf_model, prompts, pad_id, batch_size)
    n = len(runnable)
    for i, check in enumerate(runnable):
        both = logit_diffs(logits[[i, n + i]], check.answer.ids, check.wrong.ids)
        check.clean_logit_diff, check.corrupted_logit_diff = float(both[0]), float(both[1])


def load_tokenizer(source: str) -> Any:
    """The model's tokenizer alone: no weights are read (a GGUF source is converted once, as for patching).

    A folder holding only ``vocab.json`` + ``merges.txt`` (GPT-2 BPE files) is read with ``GPT2Tokenizer``,
    because the fast class silently builds an empty tokenizer from those two files.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer

    from clap.models import prepare_tokenizer, resolve_source

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vocab.json").is_file():
        if not (path / "merges.txt").is_file():
            raise ClapError(f"{path}: vocab.json without merges.txt; a GPT-2 tokenizer needs both")
        return prepare_tokenizer(GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")))
    location, _ = resolve_source(source)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(location))
    except OSError as exc:
        raise ClapError(f"could not load a tokenizer from {location!r}: {exc}") from exc


def read_specs(path: Path) -> list[tuple[str, ProbeSpec]]:
    try:
        return read_probe_specs(ProbeSetSpec(file=str(path)), Path.cwd())
    except SourceError as exc:
        raise ProbeError(str(exc)) from None


def check_probes(path: Path, tokenizer: Any, hf_model: torch.nn.Module | None = None,
                 min_logit_diff: float = 0.0, batch_size: int = 64) -> pd.DataFrame:
    """The whole check as a frame, one row per probe (the CLI prints and writes this)."""
    import pandas as pd

    checks = structural_checks(read_specs(path), tokenizer)
    if hf_model is not None:
        behavioural_checks(checks, hf_model, tokenizer, batch_size)
    return pd.DataFrame([c.row(min_logit_diff, hf_model is not None) for c in checks])


def summary_line(frame: pd.DataFrame, ran_model: bool) -> str:
    parts = [f"{int(frame['valid'].sum())} valid / {len(frame)} total",
             f"structural ok {int(frame['structural_ok'].sum())}"]
    if ran_model:
        parts += [f"knows {int(frame['knows'].sum())}", f"flips {int(frame['flips'].sum())}"]
    return "; ".join(parts)


def write_valid(source: Path, frame: pd.DataFrame, target: Path) -> int:
    """The valid probes, each as its source record (all fields, PMIDs included), in file order; atomically."""
    valid = set(frame.loc[frame["valid"].astype(bool), "origin"])
    if source.suffix in (".jsonl", ".json"):  # origins are "<path as resolved>:<line>"; match on the line
        lines = {int(origin.rsplit(":", 1)[1]) for origin in valid}
        records = [obj for number, obj in load_jsonl(source) if number in lines]
    else:  # YAML: the validated probe, labels flattened back to top-level keys
        records = []
        for origin, spec in read_specs(source):
            if origin in valid:
                record = spec.model_dump(exclude_none=True, exclude={"labels"})
                records.append({**record, **spec.labels})
    atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in records))
    return len(records)


SHOWN = ["id", "n_clean", "n_corrupted", "answer_pieces", "wrong_pieces", "clean_logit_diff", "corrupted_logit_diff",
         "knows", "flips", "valid", "problems"]


def run_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    if args.min_logit_diff < 0 or not math.isfinite(args.min_logit_diff):
        raise ProbeError(f"--min-logit-diff must be a finite number >= 0, got {args.min_logit_diff}")
    specs = read_specs(path)  # bad probe files fail here, before any model is loaded
    for option, target in (("-o", args.output), ("--write-valid", args.write_valid)):
        if target:  # before the model loads, not after the check has run
            prepare_output_file(target, what=option)
    del specs
    hf_model = None
    if args.structural_only:
        tokenizer = load_tokenizer(args.model)
    else:
        from clap.models import load_model

        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        tokenizer, hf_model = loaded.tokenizer, loaded.hf
    frame = check_probes(path, tokenizer, hf_model, args.min_logit_diff, args.batch_size)
    import pandas as pd

    shown = [c for c in SHOWN if c in frame.columns and not (hf_model is None and c in SHOWN[5:9])]
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(frame[shown].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    line = summary_line(frame, hf_model is not None)
    print(line)
    if args.output:
        atomic_write_text(Path(args.output), frame.to_csv(index=False))
        print(f"wrote {args.output}")
    if args.write_valid:
        n = write_valid(path, frame, Path(args.write_valid))
        print(f"wrote {n} valid probes to {args.write_valid}")
    return 0


def register_probes(subparsers: Any) -> None:
    """``clap probes check``; registered on its own so it grows without editing interventions/cli.py."""
    probes = subparsers.add_parser("probes", help="check probe files against a model's tokenizer and knowledge")
    actions = probes.add_subparsers(dest="probes_action", metavar="ACTION")
    probes.set_defaults(func=lambda args: probes.print_help() or 2)
    check = actions.add_parser(
        "check",
        help="token lengths, answer tokens, clean/corrupted logit differences and validity per probe",
        description=__doc__.split("\n\n")[1],
    )
    check.add_argument("file", help="probe file (.jsonl or .yaml)")
    check.add_argument("--model", required=True, help="hub id, model folder, .gguf file, built-in name, or (with "
                       "--structural-only) a folder of GPT-2 vocab.json + merges.txt")
    check.add_argument("-o", "--output", help="write the per-probe table as CSV")
    check.add_argument("--write-valid", metavar="VALID.jsonl", help="write the valid probes (source records) here")
    check.add_argument("--min-logit-diff", type=float, default=0.0,
                       help="the model knows a fact when its clean logit difference exceeds this (default 0)")
    check.add_argument("--structural-only", action="store_true", help="tokenizer checks only; no weights are loaded")
    check.add_argument("--device", default="cpu")
    check.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    check.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    check.set_defaults(func=run_check)


register = register_probes
