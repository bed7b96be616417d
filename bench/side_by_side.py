"""Side-by-side patching benchmark: clap vs TransformerLens vs a naive nnsight loop vs the plain-forward floor.

All contenders run in one process on the same weights, so their *ratios* are meaningful even on a loaded machine
(absolute times are not; the load average at start and end is recorded with the results).

Workloads
  a  random-init GPT-2-small (GPT2Config defaults: 12 layers, d=768, fixed seed) with the real GPT-2 tokenizer,
     N prompt pairs of exactly 16 tokens that differ at their second-to-last token (the country in "... the capital
     of France is"): the *shared-prefix* case, where most restores write the value already there. Layer x position
     sweeps of resid_pre, attn_out and mlp_out. Contenders:
       clap   a ``Study`` of the sweep ``interventions.sweep`` runs (the public API, whatever the engine does inside)
       tl     TransformerLens ``run_with_cache`` + ``patching.get_act_patch_{resid_pre,attn_out,mlp_out}`` through a
              ``TransformerBridge`` on a copy of the same HF model (eager attention); its clean run is timed too
       naive  one nnsight trace per cell (pair x layer x position), as a tutorial would write it, plus one clean
              trace per pair to cache the clean activations
       floor  plain HF forwards with full logits over as many rows as clap's cells + baselines, at the fastest of
              several rows per forward: what running every row without any patching machinery costs
     clap's grid (mean patched logit difference over pairs) must equal TransformerLens's to 1e-4 in the same run.
     Beside each ratio: the multiply-adds no exact method can skip (``mac_bound``) as a fraction of the floor's,
     and clap's time over that fraction of the floor's time.
  e  as a, with pairs that differ at token ``--corrupt-at`` (0-2, default 2): the shape of the shipped probes,
     which corrupt the subject at the start of the prompt; almost no restore is a no-op.
  b  causal trace (ROME): noise at the subject's embeddings, clean states and outputs restored per (layer, token),
     on the random GPT-2 or SmolLM2-135M (``--trace-model``): clap's strategies against one restore per pass.
  c  the demo study's patching of its first model (``clap/data/demo_study.yaml``, SmolLM2-135M) through
     ``interventions.Study``, and the floor over the same rows (timed on ``--floor-sample-rows`` of them, scaled).

Writes ``side_by_side.csv`` and ``side_by_side.md`` under ``--out`` (atomically, after every measurement, so an
interrupted run keeps what it measured). Exit status 1 if clap and TransformerLens disagree by more than 1e-4.

    python bench/side_by_side.py [--workloads a,e,c] [--pairs 4,16] [--repeats 1] [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import csv_text, load_average, machine, measure, write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_tokenizer() -> Path:
    """``../shared/data/gpt2-tokenizer`` beside the checkout, or beside the main checkout when this is a git
    worktree (whose ``.git`` file names the main repository's git folder)."""
    candidates = [REPO_ROOT.parent / "shared" / "data" / "gpt2-tokenizer"]
    git = REPO_ROOT / ".git"
    if git.is_file() and git.read_text().startswith("gitdir:"):
        common = Path(git.read_text().split(":", 1)[1].strip()).resolve()  # <main>/.git/worktrees/NAME
        candidates.append(common.parents[2].parent / "shared" / "data" / "gpt2-tokenizer")
    return next((c for c in candidates if c.is_dir()), candidates[0])


DEFAULT_TOKENIZER = _default_tokenizer()
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
TOLERANCE = 1e-4
SWEEPS = ("resid_pre", "attn_out", "mlp_out")
CONTENDERS = ("clap", "tl", "naive", "floor")
TL_FUNCTIONS = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
                "mlp_out": "get_act_patch_mlp_out"}

COLUMNS = [
    "workload", "sweep", "model", "pairs", "tokens", "layers", "d_model", "cells", "rows", "contender", "status",
    "repeats", "best_s", "times_s", "cpu_s", "cells_per_s", "time_vs_clap", "peak_rss_delta_mb", "peak_rss_mb",
    "max_abs_diff_vs_tl", "strategy", "corrupt_at", "bound_over_floor_macs", "tight_over_floor_macs", "note",
]

# Countries and capitals that are each one GPT-2 token (with the leading space): a pair swaps the country.
COUNTRIES = [
    (" France", " Paris"), (" Spain", " Madrid"), (" Italy", " Rome"), (" Germany", " Berlin"),
    (" Japan", " Tokyo"), (" China", " Beijing"), (" Egypt", " Cairo"), (" Canada", " Ottawa"),
    (" Russia", " Moscow"), (" India", " Delhi"), (" Greece", " Athens"), (" Sweden", " Stockholm"),
    (" Poland", " Warsaw"), (" Norway", " Oslo"), (" Cuba", " Havana"), (" Ireland", " Dublin"),
]
FILLER = ["In", "class", "today", "our", "old", "teacher", "told", "us", "again", "that", "everyone", "should", "know",
          "by", "heart", "that"]


class BenchError(RuntimeError):
    """A benchmark precondition is not met (missing tokenizer, impossible prompt length)."""


# -- inputs ---------------------------------------------------------------------------------------------------------
def load_tokenizer(folder: Path) -> Any:
    """The real GPT-2 tokenizer from vocab.json + merges.txt (no hub access)."""
    from transformers import GPT2Tokenizer

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise BenchError(f"the GPT-2 tokenizer is not at {folder} (vocab.json + merges.txt needed); "
                         f"pass --tokenizer DIR")
    lines = merges.read_text().split("\n")[1:]
    return GPT2Tokenizer(vocab=json.loads(vocab.read_text()),
                         merges=[tuple(line.split(" ")) for line in lines if line])


def make_pairs(tokenizer: Any, n: int, tokens: int) -> list[dict[str, str]]:
    """``n`` deterministic prompt pairs of exactly ``tokens`` tokens each, differing only in the country token:
    "<filler> the capital of France is" vs "... of Spain is", answer " Paris", wrong " Madrid" (the shared-prefix
    case: the prompts differ at their second-to-last token)."""
    k = len(COUNTRIES)
    if n > k * (k - 1):
        raise BenchError(f"at most {k * (k - 1)} distinct pairs, asked for {n}")
    core = 5  # "the capital of X is"
    if not core <= tokens <= core + len(FILLER):
        raise BenchError(f"prompts must be {core}-{core + len(FILLER)} tokens, asked for {tokens}")
    words = FILLER[: tokens - core]
    lead = " ".join(words) + " the" if words else "The"
    return _checked(tokenizer, tokens, [
        _pair(i, COUNTRIES[a], COUNTRIES[b], lambda country: f"{lead} capital of{country} is")
        for i, (a, b) in enumerate(_country_pairs(n, range(k)))])


#: words before the country when the corruption is at token 1 or 2 (the shipped probes corrupt the subject, at the
#: start of the prompt)
LEAD = ["Today", " in"]
#: words after it, cut to the prompt length; the prompt ends with " the capital is"
TAIL = [" is", " where", " our", " old", " teacher", " told", " us", " again", " that", " everyone", " should",
        " know", " by", " heart", " that", " today"]


def make_early_pairs(tokenizer: Any, n: int, tokens: int, at: int) -> list[dict[str, str]]:
    """``n`` pairs of exactly ``tokens`` tokens that differ only at token ``at`` (0-2), the country: "France is
    where our old teacher ... the capital is" vs "Spain is where ...". At token 0 the country has no leading space,
    and only countries that are one token so written are used."""
    if not 0 <= at <= len(LEAD):
        raise BenchError(f"--corrupt-at must be 0-{len(LEAD)}, got {at}")
    tail_words = tokens - at - 1 - 3  # " the capital is"
    if not 0 <= tail_words <= len(TAIL):
        raise BenchError(f"prompts must be {at + 4}-{at + 4 + len(TAIL)} tokens, asked for {tokens}")
    usable = [i for i, (country, _) in enumerate(COUNTRIES)
              if at > 0 or len(tokenizer(country.strip())["input_ids"]) == 1]
    if n > len(usable) * (len(usable) - 1):
        raise BenchError(f"at most {len(usable) * (len(usable) - 1)} distinct pairs, asked for {n}")
    lead, tail = "".join(LEAD[:at]), "".join(TAIL[:tail_words])

    def prompt(country: str) -> str:
        return f"{lead}{country if at else country.strip()}{tail} the capital is"

    return _checked(tokenizer, tokens, [_pair(i, COUNTRIES[a], COUNTRIES[b], prompt)
                                        for i, (a, b) in enumerate(_country_pairs(n, usable))])


def _country_pairs(n: int, usable: Sequence[int]) -> list[tuple[int, int]]:
    k = len(usable)
    return [(usable[i % k], usable[(i % k + 1 + i // k) % k]) for i in range(n)]


def _pair(i: int, clean: tuple[str, str], corrupted: tuple[str, str], prompt: Any) -> dict[str, str]:
    return {"id": f"pair{i:02d}", "clean": prompt(clean[0]), "corrupted": prompt(corrupted[0]), "answer": clean[1],
            "wrong": corrupted[1]}


def _checked(tokenizer: Any, tokens: int, pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    for pair in pairs:
        for side in ("clean", "corrupted"):
            got = len(tokenizer(pair[side])["input_ids"])
            if got != tokens:
                raise BenchError(f"prompt {pair[side]!r} is {got} tokens, not {tokens}")
    return pairs


@dataclass
class Inputs:
    pairs: list[dict[str, str]]
    clean: torch.Tensor  #: [N, T] token ids
    corrupted: torch.Tensor
    answer: torch.Tensor  #: [N]
    wrong: torch.Tensor


def encode(tokenizer: Any, pairs: list[dict[str, str]]) -> Inputs:
    def first(text: str) -> int:
        return tokenizer(text, add_special_tokens=False)["input_ids"][0]

    return Inputs(
        pairs=pairs,
        clean=torch.tensor([tokenizer(p["clean"])["input_ids"] for p in pairs]),
        corrupted=torch.tensor([tokenizer(p["corrupted"])["input_ids"] for p in pairs]),
        answer=torch.tensor([first(p["answer"]) for p in pairs]),
        wrong=torch.tensor([first(p["wrong"]) for p in pairs]),
    )


def build_gpt2(tokenizer: Any, quick: bool, seed: int) -> Any:
    """GPT-2-small geometry (or a 2-layer toy with --quick), random weights from a fixed seed, eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from interventions import wrap

    torch.manual_seed(seed)
    sizes = {"n_layer": 2, "n_embd": 64, "n_head": 4} if quick else {}
    config = GPT2Config(vocab_size=len(tokenizer), **sizes)
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config).eval()
    return wrap(hf, tokenizer, {"source": "gpt2-small-random" if not quick else "gpt2-2layer-random"})


def boot_bridge(lm: Any) -> Any:
    """TransformerLens 4.x bridge over a deep copy of the same HF weights (the bridge rewires what it wraps)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        lm.hf.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)  # the bridge needs a tokenizer that knows its path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(folder, hf_model=copy.deepcopy(lm.hf), tokenizer=tokenizer)
    bridge.eval()
    return bridge


# -- what cannot be skipped ------------------------------------------------------------------------------------------
def block_macs(d: int, d_mlp: int, position: int) -> int:
    """Multiply-adds of one GPT-2 block on the token at ``position`` (0-based, no padding): the q/k/v and output
    projections (4 d^2), the MLP (2 d d_mlp), and attention over the ``position + 1`` keys it sees (scores and the
    weighted sum of values, 2 d (position + 1)). Layer norms, biases and softmax are left out (a lower bound)."""
    return 4 * d * d + 2 * d * d_mlp + 2 * d * (position + 1)


def mac_bound(kind: str, n_layers: int, d: int, d_mlp: int, vocab: int, clean: torch.Tensor,
              corrupted: torch.Tensor, answer_tokens: int = 2) -> dict[str, int]:
    """Multiply-adds a layer x position sweep of ``kind`` (denoising: clean into corrupted) cannot avoid, with
    every saving that keeps it exact: each pair's clean and corrupted baselines run once (every block, every token;
    logits at the last token only); a patched row reuses its baseline on the blocks below the patch and on the
    positions before it, and computes logits at the last token only; a cell whose patch writes the value already
    there (before the first differing token; ``resid_pre`` of block 0 at an equal token) costs nothing. A
    ``resid_pre`` patch at (l, p) runs blocks l.. on tokens p..; ``attn_out`` runs block l's MLP at token p, then
    blocks l+1.. on tokens p..; ``mlp_out`` runs blocks l+1.. on tokens p... Also returns the plain forward's
    multiply-adds over the same rows with full logits (the floor contender's work).

    ``tight`` also counts what the logit difference alone needs: logits of the ``answer_tokens`` answer and wrong
    tokens only (not the vocabulary), and in the last block, on every token but the last, only the keys and values
    the last token attends to (2 d^2 each; their queries, attention, output projection and MLP reach nothing). The
    issue's targets are stated against ``bound``; ``tight`` is the smaller work the metric itself allows."""
    n, t = clean.shape
    per_token = [block_macs(d, d_mlp, p) for p in range(t)]
    suffix = [sum(per_token[p:]) for p in range(t)]  # one block on tokens p..t-1
    # the last block on tokens p..t-1 when only the last token's output is read
    last_block = [2 * d * d * (t - 1 - p) + per_token[t - 1] for p in range(t)]
    unembed, answers = d * vocab, d * answer_tokens
    bound = 2 * n * (n_layers * suffix[0] + unembed)
    tight = 2 * n * ((n_layers - 1) * suffix[0] + last_block[0] + answers)

    def blocks(first: int, p: int) -> tuple[int, int]:  # blocks first..n_layers-1 on tokens p..: (bound, tight)
        if first >= n_layers:
            return 0, 0
        return (n_layers - first) * suffix[p], (n_layers - first - 1) * suffix[p] + last_block[p]

    for pair in range(n):
        differs = (clean[pair] != corrupted[pair]).nonzero()
        first = int(differs[0]) if len(differs) else t
        for layer in range(n_layers):
            for p in range(first, t):
                if kind == "resid_pre":
                    if layer == 0 and bool(clean[pair, p] == corrupted[pair, p]):
                        continue
                    full, least = blocks(layer, p)
                elif kind == "attn_out":
                    full, least = blocks(layer + 1, p)
                    full, least = full + 2 * d * d_mlp, least + 2 * d * d_mlp
                else:
                    full, least = blocks(layer + 1, p)
                bound += full + unembed
                tight += least + answers
    rows = 2 * n + n * n_layers * t
    return {"bound": bound, "tight": tight, "floor": rows * (n_layers * suffix[0] + t * unembed)}


# -- contenders -----------------------------------------------------------------------------------------------------
#: --strategies: execution.strategy values, plus "ragged": the suffix strategy running its no-op rows too (the
#: ``skip_no_ops`` argument of ``interventions.executor.Executor``), to measure what skipping them saves
STRATEGY_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "auto": ("auto", {}), "full": ("full", {}), "suffix": ("suffix", {}),
    "ragged": ("suffix", {"skip_no_ops": False})}


def strategy_settings(strategy: str) -> tuple[str, dict[str, Any]]:
    """``(execution.strategy, Executor keyword arguments)`` of a ``--strategies`` entry."""
    return STRATEGY_OPTIONS[strategy]


def clap_sweep(lm: Any, inputs: Inputs, kind: str, max_rows: int | None, strategy: str = "auto") -> np.ndarray:
    """The layer x position sweep through ``interventions.Study`` (what ``interventions.sweep`` runs), with the
    strategy's executor settings; the no-op rows it found are appended to :data:`NO_OP_ROWS`."""
    from interventions import Study, StudySpec, to_grid

    name, options = strategy_settings(strategy)
    execution = {"progress": False, "strategy": name, **({"max_rows": max_rows} if max_rows else {})}
    spec = StudySpec.from_dict({"model": {"source": lm.identity.get("source", "in-memory")},
                                "probes": {"inline": list(inputs.pairs)}, "sites": [f"layers[*].{kind}"],
                                "positions": ["each"], "operations": ["replace"], "metrics": ["logit_diff"],
                                "execution": execution})
    study = Study(spec, model=lm, **({"executor_options": options} if options else {}))
    frame = study.run()
    NO_OP_ROWS.append(study.executor.suffix_stats["no_op_rows"])
    return to_grid(frame).to_numpy(dtype="float64")


#: rows the suffix strategy found to be no-ops, one entry per clap_sweep call (appended to, read by the report)
NO_OP_ROWS: list[int] = []


def tl_sweep(bridge: Any, inputs: Inputs, kind: str) -> np.ndarray:
    from transformer_lens import patching

    rows = torch.arange(len(inputs.pairs))

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # the same metric as clap's grid: mean over pairs
        return (logits[rows, -1, inputs.answer] - logits[rows, -1, inputs.wrong]).mean()

    with torch.no_grad():
        _, cache = bridge.run_with_cache(inputs.clean)
        grid = getattr(patching, TL_FUNCTIONS[kind])(bridge, inputs.corrupted, cache, logit_diff)
    return grid.double().cpu().numpy()


def _site(block: Any, kind: str) -> Any:
    """The activation a sweep patches, as an nnsight envoy value (GPT-2 module names)."""
    if kind == "resid_pre":
        return block.input
    if kind == "attn_out":
        return block.attn.output[0]
    return block.mlp.output


def naive_sweep(lm: Any, inputs: Inputs, kind: str) -> np.ndarray:
    """One nnsight trace per (pair, layer, position): what a straightforward loop over cells costs."""
    model = lm.nn
    blocks = model.transformer.h
    n_layers, (n, t) = len(lm.hf.transformer.h), inputs.clean.shape
    grid = np.zeros((n_layers, t))
    with torch.no_grad():
        for i in range(n):
            cached: list[torch.Tensor] = []
            with model.trace(input_ids=inputs.clean[i: i + 1]):
                for layer in range(n_layers):
                    cached.append(_site(blocks[layer], kind).clone().save())
            for layer in range(n_layers):
                for position in range(t):
                    with model.trace(input_ids=inputs.corrupted[i: i + 1]):
                        _site(blocks[layer], kind)[:, position] = cached[layer][:, position]
                        logits = model.lm_head.output
                        value = (logits[0, -1, inputs.answer[i]] - logits[0, -1, inputs.wrong[i]]).save()
                    grid[layer, position] += float(value) / n
    return grid


def floor_forwards(lm: Any, inputs: Inputs, rows: int, batch: int) -> None:
    """Plain HF forwards with full logits over ``rows`` rows (corrupted prompts, plus each pair's clean and
    corrupted baselines), ``batch`` rows at a time."""
    n = len(inputs.pairs)
    order = torch.arange(rows - 2 * n) % n
    ids = torch.cat([inputs.clean, inputs.corrupted, inputs.corrupted[order]])
    with torch.no_grad():
        for start in range(0, rows, batch):
            _ = lm.hf(input_ids=ids[start: start + batch]).logits


# -- runner ---------------------------------------------------------------------------------------------------------
class Report:
    """Rows measured so far; rewritten to CSV and Markdown after each one."""

    def __init__(self, out: Path, info: dict[str, Any], args: argparse.Namespace):
        self.out, self.info, self.args, self.rows = out, info, args, []
        self.notes: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()

    def write(self, final: bool = False) -> None:
        info = dict(self.info)
        info["load_average_now" if not final else "load_average_end"] = load_average()
        write_atomic(self.out / "side_by_side.csv", csv_text(self.rows, COLUMNS))
        write_atomic(self.out / "side_by_side.md", markdown(self.rows, info, self.notes))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"
    return str(value)


def _best(rows: list[dict[str, Any]], workload: str, contender: str, sweep: str, pairs: int) -> dict | None:
    for r in rows:
        if r["workload"] == workload and r["pairs"] == pairs and r["contender"] == contender and \
                r["sweep"] in (sweep, "any") and r["status"] == "ok":
            return r
    return None


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (sweep workload, sweep, pairs): the ratios the issue's targets are stated in, and the
    multiply-add lower bound beside them (as a fraction of the floor's multiply-adds; in seconds at the floor's
    rate: ``floor_s x bound / floor multiply-adds``)."""
    out = []
    keys = sorted({(r["workload"], r["sweep"], r["pairs"]) for r in rows
                   if r["workload"] in SWEEP_WORKLOADS and r["sweep"] != "any"},
                  key=lambda k: (SWEEP_WORKLOADS.index(k[0]), k[2], SWEEPS.index(k[1])))
    for workload, sweep, pairs in keys:
        found = {c: _best(rows, workload, c, sweep, pairs) for c in CONTENDERS}
        clap, tl, naive, floor = (found[c]["best_s"] if found[c] else None for c in CONTENDERS)
        cpu = {c: found[c].get("cpu_s") or None if found[c] else None for c in CONTENDERS}
        clap_row = found["clap"] or {}
        bound = clap_row.get("bound_over_floor_macs")
        bound_s = floor * bound if floor and bound else None
        tight = clap_row.get("tight_over_floor_macs")
        tight_s = floor * tight if floor and tight else None
        out.append({"workload": workload, "sweep": sweep, "pairs": pairs, "clap_s": clap, "tl_s": tl,
                    "naive_s": naive, "floor_s": floor, "tl_over_clap": tl / clap if tl and clap else None,
                    "clap_over_floor": clap / floor if clap and floor else None,
                    "tl_over_clap_cpu": cpu["tl"] / cpu["clap"] if cpu["tl"] and cpu["clap"] else None,
                    "clap_over_floor_cpu": cpu["clap"] / cpu["floor"] if cpu["clap"] and cpu["floor"] else None,
                    "bound_over_floor": bound,
                    "clap_over_bound": clap / bound_s if clap and bound_s else None,
                    "tight_over_floor": tight,
                    "clap_over_tight": clap / tight_s if clap and tight_s else None,
                    "naive_over_clap": naive / clap if naive and clap else None,
                    "max_abs_diff": clap_row.get("max_abs_diff_vs_tl")})
    return out


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], notes: list[str]) -> str:
    lines = ["# Side-by-side patching benchmark", "",
             "Generated by `bench/side_by_side.py`; wall times are the best of the repeats, in one process. "
             "Peak memory: " + next((r["memory_method"] for r in rows if r.get("memory_method")), "not measured") +
             "; the figure is peak RSS during the call minus RSS before it.", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    table = summary(rows)
    if table:
        lines += ["", "## Sweeps: ratios (targets on the early-corruption workload e: TL/clap >= 8, clap/floor <= 0.2)",
                  "", "Workload a: the shared-prefix case (prompts differ at their second-to-last token); e: the "
                  "corruption at token " + ", ".join(sorted({str(r["corrupt_at"]) for r in rows
                                                             if r.get("corrupt_at") not in (None, "")})) +
                  " (the shipped probes' shape). `bound/floor`: the multiply-adds that cannot be skipped "
                  "(`mac_bound`) over the floor's; `clap/bound`: clap's time over the bound's share of the floor's "
                  "time; `tight/floor`, `clap/tight`: the same with the smaller work the logit difference alone "
                  "allows (the answer tokens' logits only; the last block's non-last tokens need only keys and "
                  "values). Ratios of wall times; (CPU): of the process's CPU times in the same calls (less "
                  "disturbed by other processes on a shared machine).", "",
                  ("| workload | sweep | pairs | clap s | TransformerLens s | naive nnsight s | floor s | TL/clap | "
                   "clap/floor | TL/clap (CPU) | clap/floor (CPU) | bound/floor | clap/bound | tight/floor | "
                   "clap/tight | naive/clap | max abs diff clap-TL |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        three = ("clap_over_floor", "clap_over_floor_cpu", "bound_over_floor", "tight_over_floor")
        for s in table:
            lines.append("| " + " | ".join(_fmt(s[k], 3 if k in three else 2)
                                           if k != "max_abs_diff" else _fmt(s[k], 6) for k in
                                           ("workload", "sweep", "pairs", "clap_s", "tl_s", "naive_s", "floor_s",
                                            "tl_over_clap", "clap_over_floor", "tl_over_clap_cpu",
                                            "clap_over_floor_cpu", "bound_over_floor", "clap_over_bound",
                                            "tight_over_floor", "clap_over_tight", "naive_over_clap",
                                            "max_abs_diff")) + " |")
    lines += ["", "## All measurements", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, ""), 6 if c == "max_abs_diff_vs_tl" else 2) for c in COLUMNS)
                     + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _row(base: dict[str, Any], contender: str, m: Any, cells: int, clap_best: float | None,
         repeats: int, **extra: Any) -> dict[str, Any]:
    best = m.best
    return {**base, "contender": contender, "status": "ok", "repeats": repeats, "best_s": round(best, 4),
            "cpu_s": round(m.best_cpu, 4) if m.cpu_times else "",
            "times_s": ";".join(f"{t:.3f}" for t in m.times), "cells_per_s": round(cells / best, 1),
            "time_vs_clap": round(best / clap_best, 3) if clap_best else "",
            "peak_rss_delta_mb": round(m.peak_rss_delta_mb, 1), "peak_rss_mb": round(m.peak_rss_mb, 1),
            "memory_method": m.memory_method, **extra}


#: the layer x position sweep workloads: a (shared prefix), e (early corruption)
SWEEP_WORKLOADS = ("a", "e")
#: rows per forward the floor tries; it is reported at its fastest
FLOOR_BATCHES = (32, 64, 128, 256)
#: rows each candidate is timed on before the floor runs at the fastest (--floor-probe-rows)
FLOOR_PROBE_ROWS = 256


def workload_a(report: Report, args: argparse.Namespace, contenders: Sequence[str], workload: str = "a"
               ) -> list[str]:
    """Layer x position sweeps; ``workload`` "a": the shared-prefix pairs (:func:`make_pairs`), "e": pairs that
    differ at token ``--corrupt-at`` (:func:`make_early_pairs`). Returns the failures (sweeps where clap and
    TransformerLens disagree beyond the tolerance)."""
    tokenizer = load_tokenizer(Path(args.tokenizer))
    lm = build_gpt2(tokenizer, args.quick, args.seed)
    config = lm.hf.config
    bridge = _tl_bridge(report, lm, tokenizer) if "tl" in contenders else None

    failures = []
    for n_pairs in args.pairs:
        pairs = (make_pairs(tokenizer, n_pairs, args.tokens) if workload == "a"
                 else make_early_pairs(tokenizer, n_pairs, args.tokens, args.corrupt_at))
        inputs = encode(tokenizer, pairs)
        n_layers, t = config.n_layer, args.tokens
        cells = n_pairs * n_layers * t
        rows = cells + 2 * n_pairs
        base = {"workload": workload, "model": lm.identity["source"], "pairs": n_pairs, "tokens": t,
                "layers": n_layers, "d_model": config.n_embd, "cells": cells, "rows": rows,
                "corrupt_at": args.corrupt_at if workload == "e" else ""}
        floor_best = None
        if "floor" in contenders:
            floor_best = _floor(report, args, lm, inputs, {**base, "sweep": "any"}, cells, rows)
        for kind in args.sweeps:
            macs = mac_bound(kind, n_layers, config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size,
                             inputs.clean, inputs.corrupted)
            _sweep_a(report, args, contenders, lm, bridge, inputs, kind,
                     {**base, "sweep": kind, "bound_over_floor_macs": round(macs["bound"] / macs["floor"], 4),
                      "tight_over_floor_macs": round(macs["tight"] / macs["floor"], 4)},
                     cells, n_pairs, floor_best, failures)
    return failures


def _floor(report: Report, args: argparse.Namespace, lm: Any, inputs: Inputs, base: dict[str, Any], cells: int,
           rows: int) -> float:
    """The floor at its best batch size: each of :data:`FLOOR_BATCHES` up to ``--floor-probe-rows`` (or
    ``--max-rows`` alone) timed on that many rows, then all rows at the fastest; returns its best time."""
    probe_rows = min(rows, args.floor_probe_rows)
    fixed = args.floor_batch or args.max_rows
    candidates = [fixed] if fixed else [b for b in FLOOR_BATCHES if b <= probe_rows] or [probe_rows]
    rates = {}
    if len(candidates) > 1:
        for batch in candidates:
            rates[batch] = measure(partial(floor_forwards, lm, inputs, probe_rows, batch), 1).best
    batch = min(rates, key=rates.__getitem__) if rates else candidates[0]
    m = measure(partial(floor_forwards, lm, inputs, rows, batch), args.repeats)
    tried = "; ".join(f"{b}: {s:.2f} s" for b, s in rates.items())
    report.add(_row(base, "floor", m, cells, None, args.repeats,
                    note=f"{rows} rows, {batch} per forward (fastest of {tried} on {probe_rows} rows), full logits"
                    if rates else f"{rows} rows, {batch} per forward, full logits"))
    return m.best


def _tl_bridge(report: Report, lm: Any, tokenizer: Any) -> Any:
    """The TransformerLens bridge on the same weights, checked against HF once (None when TL is not installed)."""
    try:
        bridge = boot_bridge(lm)
    except ImportError as exc:
        report.notes.append(f"TransformerLens not available ({exc}); its column is empty")
        return None
    with torch.no_grad():
        ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
        gap = float((lm.hf(ids).logits - bridge(ids)).abs().max())
    report.notes.append(f"TransformerLens bridge vs HF logits on the same weights: max abs diff {gap:.2e}")
    return bridge


def _sweep_a(report: Report, args: argparse.Namespace, contenders: Sequence[str], lm: Any, bridge: Any, inputs: Any,
             kind: str, row_base: dict[str, Any], cells: int, n_pairs: int, floor_best: float | None,
             failures: list[str]) -> None:
    """One sweep kind at one pair count: clap, TL and naive rows, clap checked against TL (failures appended)."""
    clap_grid = tl_grid = None
    clap_best = None
    variants = []
    if "clap" in contenders:
        for strategy in args.strategies:
            m = measure(partial(clap_sweep, lm, inputs, kind, args.max_rows, strategy), args.repeats)
            if clap_grid is None:
                clap_best, clap_grid = m.best, m.result
                clap_row = _row(row_base, "clap", m, cells, clap_best, args.repeats, strategy=strategy,
                                note=(f"clap/floor {clap_best / floor_best:.3f}; " if floor_best else "")
                                + f"{NO_OP_ROWS[-1]} no-op rows not run")
                continue
            diff = float(np.abs(m.result - clap_grid).max())
            if not diff <= TOLERANCE:
                failures.append(f"{kind} x {n_pairs} pairs: strategy {strategy} differs from "
                                f"{args.strategies[0]} by {diff:.3g}")
            variants.append(_row(row_base, f"clap[{strategy}]", m, cells, clap_best, args.repeats, strategy=strategy,
                                 note=(f"clap/floor {m.best / floor_best:.3f}; " if floor_best else "")
                                 + f"max abs diff vs clap[{args.strategies[0]}] {diff:.1e}; "
                                 + f"{NO_OP_ROWS[-1]} no-op rows not run"))
    if bridge is not None:
        m = measure(partial(tl_sweep, bridge, inputs, kind), args.repeats)
        tl_grid = m.result
        if clap_grid is not None:
            diff = float(np.abs(clap_grid - tl_grid).max())
            clap_row["max_abs_diff_vs_tl"] = diff
            if not diff <= TOLERANCE:
                failures.append(f"{kind} x {n_pairs} pairs: max |clap - TL| = {diff:.3g} > {TOLERANCE}")
            report.add(clap_row)
        report.add(_row(row_base, "tl", m, cells, clap_best, args.repeats,
                        note="run_with_cache + " + TL_FUNCTIONS[kind]))
    elif clap_grid is not None:
        report.add(clap_row)
    for row in variants:
        report.add(row)
    if "naive" in contenders:
        m = measure(partial(naive_sweep, lm, inputs, kind), args.repeats)
        extra = {"note": f"{cells + n_pairs} nnsight traces"}
        if tl_grid is not None:
            extra["max_abs_diff_vs_tl"] = float(np.abs(m.result - tl_grid).max())
        report.add(_row(row_base, "naive", m, cells, clap_best, args.repeats, **extra))


TRACE_SUBJECTS = [("The Eiffel Tower", " Paris", " Rome"), ("The Colosseum", " Rome", " Paris"),
                  ("The Brandenburg Gate", " Berlin", " Madrid"), ("The Kremlin", " Moscow", " Tokyo")]


def workload_b(report: Report, args: argparse.Namespace) -> list[str]:
    """Causal trace (ROME): noise on the subject's embeddings at baseline (``--trace-samples`` draws), then each
    clean hidden state (single layers) and MLP / attention output (windows of 10) restored per (layer, token), on
    the random GPT-2 (``--quick``: the 2-layer toy) and the real tokenizer. clap with each strategy, and "one row per
    restore": the full strategy with one restored row per forward pass (the baseline rows plus one), the cost of a
    loop that runs each restore as its own pass. Returns failures (strategies that disagree beyond 1e-4)."""
    import pandas as pd

    from interventions import Study, StudySpec

    if args.trace_model == "smollm2":
        from interventions import load_model

        lm = load_model("smollm2-135m")
        tokenizer = lm.tokenizer
        shipped = [json.loads(line) for line in (REPO_ROOT / "clap" / "data" / "probes" / "definitional.jsonl")
                   .read_text().splitlines() if line.strip()][: args.trace_facts]
        probes = [{"id": p["id"], "clean": p["clean"], "corrupted": p["clean"], "answer": p["answer"],
                   "wrong": p["wrong"], "labels": {"subject": p["subject"]}} for p in shipped]
    else:
        tokenizer = load_tokenizer(Path(args.tokenizer))
        lm = build_gpt2(tokenizer, args.quick, args.seed)
        probes = [{"id": f"t{i}", "clean": f"{subject} is located in the city of", "corrupted":
                   f"{subject} is located in the city of", "answer": answer, "wrong": wrong,
                   "labels": {"subject": subject}} for i, (subject, answer, wrong) in enumerate(TRACE_SUBJECTS)]
    samples = args.trace_samples
    config = lm.hf.config
    base = {"workload": "b", "sweep": "causal_trace", "model": lm.identity["source"], "pairs": len(probes),
            "layers": config.num_hidden_layers, "d_model": config.hidden_size}

    def trace(strategy: str, max_rows: int | None, probes: list[dict] = probes, samples: int = samples) -> pd.DataFrame:
        name, options = strategy_settings(strategy)
        execution = {"progress": False, "strategy": name}
        if max_rows:
            execution["max_rows"] = max_rows
        spec = StudySpec.from_dict({"model": {"source": "in-memory"}, "probes": {"inline": probes},
                                    "recovery_epsilon": 0, "execution": execution,
                                    "trace": {"samples": samples, "kinds": {"resid_post": 1, "mlp_out": 10,
                                                                            "attn_out": 10}}})
        return Study(spec, model=lm, executor_options=options).run()

    failures, reference, first = [], None, None
    runs = [(s, args.max_rows) for s in dict.fromkeys(["suffix", "full", *args.strategies]) if s != "auto"]
    runs.append(("one-row-per-restore", samples + 2))
    if args.trace_runs:
        runs = [run for run in runs if run[0] in args.trace_runs]
    for label, max_rows in runs:
        strategy = "full" if label == "one-row-per-restore" else label
        m = measure(partial(trace, strategy, max_rows), args.repeats)
        frame = m.result.sort_values(["probe_id", "site", "position", "metric"]).reset_index(drop=True)
        cells = len(frame) * samples // frame.metric.nunique()
        diff = None
        if reference is None:
            reference, first = frame, m.best
        else:
            diff = float((frame.patched - reference.patched).abs().max())
            if not diff <= TOLERANCE:
                failures.append(f"causal trace: {label} differs from suffix by {diff:.3g}")
        report.add(_row({**base, "tokens": len(tokenizer(probes[0]["clean"])["input_ids"]), "cells": cells,
                         "rows": cells}, f"clap[{label}]", m, cells, first, args.repeats, strategy=strategy,
                        max_abs_diff_vs_tl=diff if diff is not None else "",
                        note=f"max_rows {max_rows or 'default'}; time_vs_clap is relative to clap[suffix]; "
                             f"max_abs_diff column: vs clap[suffix]"))
    if args.trace_baseline_facts:
        failures += _baseline_on_subset(report, args, trace, probes, samples, base, tokenizer)
    return failures


def _baseline_on_subset(report: Report, args: argparse.Namespace, trace: Any, probes: list[dict], samples: int,
                        base: dict[str, Any], tokenizer: Any) -> list[str]:
    """One row per restore costs about the same per restore at any number of facts (one forward pass per restore),
    so at full size it is measured on the first ``--trace-baseline-facts`` facts and ``--trace-baseline-samples``
    draws, checked there against clap[suffix] on the same subset, and its time per restore compared with the
    full-size clap[suffix] run's (the first row of this workload): an extrapolation, labelled as one. With fewer
    draws than the full run its passes are smaller (draws + 2 rows: the baseline rows plus one restore), so the
    extrapolated baseline is a lower bound on one-row-per-restore at full size; the ratio on the subset itself
    (both measured) is reported beside it."""
    facts, draws = probes[: args.trace_baseline_facts], args.trace_baseline_samples
    full = next((r for r in report.rows if r["workload"] == "b" and r["contender"] == "clap[suffix]"), None)
    if full is None:
        return ["--trace-baseline-facts compares with the full-size clap[suffix] run: keep `suffix` in --trace-runs"]
    full_per_restore = full["best_s"] / full["cells"]
    failures, reference = [], None
    for label, max_rows in (("suffix", args.max_rows), ("one-row-per-restore", draws + 2)):
        m = measure(partial(trace, "full" if label != "suffix" else "suffix", max_rows, facts, draws), 1)
        frame = m.result.sort_values(["probe_id", "site", "position", "metric"]).reset_index(drop=True)
        cells = len(frame) * draws // frame.metric.nunique()
        diff = None
        if reference is None:
            reference = frame
        else:
            diff = float((frame.patched - reference.patched).abs().max())
            if not diff <= TOLERANCE:
                failures.append(f"causal trace subset: {label} differs from suffix by {diff:.3g}")
        per_restore = m.best / cells
        report.add(_row({**base, "pairs": len(facts), "tokens": len(tokenizer(facts[0]["clean"])["input_ids"]),
                         "cells": cells, "rows": cells}, f"clap[{label}] subset", m, cells, None, 1,
                        strategy="full" if label != "suffix" else "suffix",
                        max_abs_diff_vs_tl=diff if diff is not None else "",
                        note=f"subset: {len(facts)} facts x {draws} draws; {per_restore * 1e3:.2f} ms per restore; "
                             f"x{per_restore / full_per_restore:.1f} the full-size clap[suffix] run's "
                             f"{full_per_restore * 1e3:.2f} ms per restore; max_abs_diff column: vs clap[suffix] on "
                             "the subset"))
        if label == "suffix":
            subset_suffix = m.best
        else:
            report.notes.append(
                f"On the subset itself ({len(facts)} facts x {draws} draws, {cells} restores, both measured): "
                f"clap[suffix] {subset_suffix:.1f} s, one row per restore {m.best:.1f} s, "
                f"**{m.best / subset_suffix:.1f}x**, agreeing to {diff:.1g}.")
            report.notes.append(
                f"Workload b at full size ({full['pairs']} facts x {samples} draws, {full['cells']} restores): "
                f"clap[suffix] {full['best_s']:.1f} s ({full_per_restore * 1e3:.2f} ms per restore). One row per "
                f"restore, measured on {len(facts)} facts x {draws} draws ({cells} restores, {m.best:.1f} s, "
                f"{per_restore * 1e3:.2f} ms per restore) and extrapolated per restore: "
                f"{per_restore * full['cells']:.0f} s, **{per_restore / full_per_restore:.1f}x** the full-size "
                f"clap[suffix] run (a lower bound when the subset has fewer draws: its passes hold {draws + 2} rows, "
                f"a full-size one-row-per-restore pass {samples + 2}).")
    return failures


def workload_c(report: Report, args: argparse.Namespace) -> None:
    """The demo study's patching of its first model (the base model) through ``interventions.Study``, as
    ``clap demo`` runs it (model load not timed), and the plain-forward floor over the same rows."""
    from clap.app.study_file import StudyFile
    from clap.errors import ClapError
    from interventions import Study, load_model
    from interventions.spec import ModelSpec

    study_file = StudyFile.from_yaml(REPO_ROOT / "clap" / "data" / "demo_study.yaml")
    name, entry = next(iter(study_file.model_entries().items()))
    spec = study_file.patch_spec(ModelSpec(source=entry.source, gguf_file=entry.gguf_file, tokenizer=entry.tokenizer,
                                           revision=entry.revision))
    spec.execution.progress = False
    base = {"workload": "c", "sweep": "demo_study", "model": f"{name}: {entry.source}", "contender": "clap"}
    try:
        model = load_model(spec.model.source)
    except (ClapError, OSError) as exc:
        reason = f"{entry.source} weights unavailable: {str(exc).splitlines()[0]}"
        report.add({**base, "status": "skipped", "note": reason})
        print(f"workload c skipped: {reason}", file=sys.stderr)
        return
    study = Study(spec, model=model)
    m = measure(study.run, args.repeats)
    cells = len(m.result) // len(study.spec.metrics)
    shape = {**base, "cells": cells, "layers": model.config.num_hidden_layers, "d_model": model.config.hidden_size}
    report.add(_row(shape, "clap", m, cells, None, args.repeats,
                    note=f"{len(study.spec.metrics)} metrics per cell; model load not timed"))
    prompts = sorted(demo_floor_prompts(study), key=len)
    step = max(1, len(prompts) // args.floor_sample_rows)
    sample = prompts[::step]  # every step-th by length: the sample keeps the lengths' distribution
    batch = args.floor_batch or args.max_rows or 128
    floor = measure(partial(prompt_forwards, model.hf, sample, batch, model.tokenizer.pad_token_id or 0),
                    args.repeats)
    scale = len(prompts) / len(sample)
    floor.times = [t * scale for t in floor.times]
    floor.cpu_times = [t * scale for t in floor.cpu_times]
    report.add(_row({**shape, "rows": len(prompts)}, "floor", floor, cells, m.best, args.repeats,
                    note=f"{len(prompts)} rows (a row per cell and each probe's two baselines), timed on every "
                         f"{step}th by length ({len(sample)} rows) and scaled by {scale:.1f}; {batch} per forward, "
                         f"full logits; clap/floor {m.best / floor.best:.3f}"))


def demo_floor_prompts(study: Any) -> list[list[int]]:
    """The rows a plain forward per patched row would run for a study: each cell's target prompt (the corrupted
    prompt when denoising), and each probe's clean and corrupted prompts once."""
    plan = study.plan(refresh_weights=False)
    target = "corrupted_ids" if plan.target == "corrupted" else "clean_ids"
    rows = [list(getattr(plan.probes[cell.probe], target)) for cell in plan.cells]
    for probe in plan.probes:
        rows += [list(probe.clean_ids), list(probe.corrupted_ids)]
    return rows


def prompt_forwards(hf: Any, prompts: list[list[int]], batch: int, pad_id: int) -> None:
    """Plain HF forwards with full logits over ``prompts``, ``batch`` at a time, sorted by length (least padding)
    and left-padded with position ids counted from each row's first token."""
    from interventions.alignment import left_pad

    ordered = sorted(prompts, key=len)
    with torch.no_grad():
        for start in range(0, len(ordered), batch):
            ids, mask = left_pad(ordered[start: start + batch], pad_id)
            _ = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=_csv_list, default=["a", "e", "b", "c"],
                        help="comma list of a (shared prefix), e (early corruption), b, c")
    parser.add_argument("--corrupt-at", type=int, default=2,
                        help="workload e: the token (0-2) at which the pair's prompts differ")
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in _csv_list(s)], default=None,
                        help="prompt pairs for workload a, comma list (default 4,16; --quick: 1)")
    parser.add_argument("--sweeps", type=_csv_list, default=list(SWEEPS), help="comma list of " + ",".join(SWEEPS))
    parser.add_argument("--contenders", type=_csv_list, default=list(CONTENDERS),
                        help="comma list of " + ",".join(CONTENDERS))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per prompt (default 16; --quick: 6)")
    parser.add_argument("--repeats", type=int, default=1, help="wall time is the best of this many calls")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per batch for clap and per forward for the floor (default: clap's own "
                             "default; the floor's fastest)")
    parser.add_argument("--floor-probe-rows", type=int, default=FLOOR_PROBE_ROWS,
                        help="the floor's batch sizes up to this many rows are each timed on this many rows; it is "
                             "reported at the fastest")
    parser.add_argument("--floor-batch", type=int, default=None,
                        help="the floor's rows per forward, not probed (default: the fastest of the probes)")
    parser.add_argument("--strategies", type=_csv_list, default=["auto"],
                        help="clap's execution strategies, comma list of " + ",".join(STRATEGY_OPTIONS) +
                             " (ragged: the suffix strategy without skipping no-op rows); the first is the `clap` "
                             "contender, the others are `clap[STRATEGY]` rows checked against it")
    parser.add_argument("--floor-sample-rows", type=int, default=512,
                        help="workload c: the floor is timed on about this many of the study's rows (every k-th "
                             "by length) and scaled to all of them (a forward per cell of the demo study takes "
                             "most of an hour here)")
    parser.add_argument("--trace-samples", type=int, default=3, help="workload b: noise samples")
    parser.add_argument("--trace-model", choices=("gpt2-random", "smollm2"), default="gpt2-random",
                        help="workload b: the random GPT-2 (--quick: the 2-layer toy) on city facts, or SmolLM2-135M "
                             "on the shipped definitional probes")
    parser.add_argument("--trace-facts", type=int, default=30, help="workload b with smollm2: how many facts")
    parser.add_argument("--trace-baseline-facts", type=int, default=0,
                        help="workload b: also measure one row per restore on this many facts (with "
                             "--trace-baseline-samples draws) and compare per restore with the full-size "
                             "clap[suffix] run (for sizes where the baseline itself would take hours)")
    parser.add_argument("--trace-baseline-samples", type=int, default=1,
                        help="workload b: noise draws of the --trace-baseline-facts subset")
    parser.add_argument("--trace-runs", type=_csv_list, default=None,
                        help="workload b: which runs (default: suffix, full, the --strategies, one-row-per-restore)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2-layer d=64 model, 1 pair of 6 tokens, workload a only by default")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="folder with vocab.json + merges.txt")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick and "--workloads" not in " ".join(argv or sys.argv):
        args.workloads = ["a"]
    args.pairs = args.pairs or ([1] if args.quick else [4, 16])
    args.tokens = args.tokens or (6 if args.quick else 16)
    for name, values, valid in (("workloads", args.workloads, "abce"), ("sweeps", args.sweeps, SWEEPS),
                                ("contenders", args.contenders, CONTENDERS),
                                ("strategies", args.strategies, tuple(STRATEGY_OPTIONS))):
        bad = [v for v in values if v not in valid]
        if bad:
            parser.error(f"--{name}: unknown {', '.join(bad)} (valid: {', '.join(valid)})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    info["load_average_start"] = info.pop("load_average")
    info["command"] = "python bench/side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(Path(args.out), info, args)
    failures: list[str] = []
    try:
        for workload in SWEEP_WORKLOADS:
            if workload in args.workloads:
                failures += workload_a(report, args, args.contenders, workload)
        if "b" in args.workloads:
            failures += workload_b(report, args)
        if "c" in args.workloads:
            workload_c(report, args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.notes += [f"DISAGREEMENT: {f}" for f in failures]
    report.write(final=True)
    print((Path(args.out) / "side_by_side.md").read_text())
    if failures:
        print("clap and TransformerLens disagree:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
