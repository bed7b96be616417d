"""Benchmark: fine-tuning throughput and the wall time of one epoch of each preset on the shared epilepsy corpus.

For each model (a tiny random GPT-2 with the real GPT-2 tokenizer, and SmolLM2-135M, the built-in ``smollm2-135m``)
and each preset (``config-i``: whole abstracts padded to 512 tokens; ``config-ii``: 512-token chunks), runs
``finetuning.train.finetune`` for a few optimiser steps on the corpus that ``clap corpus build`` makes from the two
large shared PubMed files, and times every training step and the validation pass. A full epoch would take tens of
minutes for SmolLM2 on two CPU cores, so the epoch time is extrapolated from the measured per-row rates:

    epoch = train rows / train rows per s + validation rows / validation rows per s

(checkpoint saving, ~1-3 s per epoch, is not included). Rates exclude the first step (allocator warm-up). For the
tiny model one real epoch of each preset is also run (``--full-epoch``), which checks the extrapolation.

    python bench/finetune_throughput.py [--models tiny smollm2-135m] [--steps 4] [--full-epoch tiny] \
        [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FILES = ("pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz")


def build_epilepsy_corpus(out: Path) -> dict:
    from corpora.build import BuildConfig, build_corpus

    report = build_corpus(BuildConfig(inputs=[SHARED / "pubmed" / f for f in FILES], out=out, figure=False))
    return {"abstracts": report.kept, "train": report.train, "validation": report.validation}


def tiny_gpt2(out: Path) -> Path:
    """Two layers, 64 wide, GPT-2's real 50,257-token vocabulary (most of its compute is the unembedding)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok_dir = SHARED / "gpt2-tokenizer"
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = GPT2Tokenizer(vocab=json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")),
                              merges=[tuple(line.split(" ")) for line in merges[1:] if line])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def full_rows(corpus: Path, model: str, preset: str) -> dict:
    """Rows and real tokens of one full epoch (the whole train and validation splits) under ``preset``."""
    from clap.models import load_hf_model
    from finetuning.config import from_preset
    from finetuning.data import load_corpus, prepare_datasets, training_tokenizer

    _, tok, _ = load_hf_model(model)
    _, _, stats = prepare_datasets(load_corpus(corpus), training_tokenizer(tok), from_preset(preset))
    return {split: {"rows": s.rows, "tokens": s.tokens} for split, s in stats.items()}


def measure(corpus: Path, model: str, preset: str, steps: int, batch: int, eval_records: int, work: Path) -> dict:
    """Run ``steps`` optimiser steps of ``preset`` (accumulation 1, micro-batch ``batch``) and time them."""
    from transformers import TrainerCallback

    from finetuning.config import from_preset
    from finetuning.train import finetune

    marks: list[tuple[int, float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((state.global_step, time.perf_counter() - self.started, state.num_input_tokens_seen))

    config = from_preset(preset, max_steps=steps, batch_size=batch, eval_batch_size=batch, grad_accumulation=1,
                         subset=batch * steps, eval_subset=eval_records, eval_strategy="steps", eval_steps=10**6,
                         logging_steps=1, save_total_limit=1)
    result = finetune(corpus, model, work / f"{Path(model).name}-{preset}", config, progress=False,
                      callbacks=[Clock()], overwrite=True)
    timed = marks[1:] if len(marks) > 1 else marks
    seconds = sum(m[1] for m in timed)
    tokens = marks[-1][2] - (marks[0][2] if len(marks) > 1 else 0)
    rows = batch * len(timed)
    positions = rows * config.max_length  # config I pads every row to max_length; config II rows are full chunks
    log = json.loads((result.output_dir / "finetune.json").read_text())
    summary_rows = log["data"]["validation"]["rows"]
    evals = [e for e in _history(result.output_dir) if "eval_runtime" in e]
    eval_s = min(e["eval_runtime"] for e in evals)
    return {
        "micro_batch": batch,
        "steps_timed": len(timed),
        "train_seconds_per_step": seconds / len(timed),
        "train_rows_per_s": rows / seconds,
        "train_tokens_per_s": tokens / seconds,  # real (non-padding) tokens
        "train_positions_per_s": positions / seconds,  # padded positions: what the compute scales with
        "eval_rows": summary_rows,
        "eval_rows_per_s": summary_rows / eval_s,
    }


def full_epoch(corpus: Path, model: str, preset: str, work: Path) -> dict:
    """One real epoch of ``preset`` as configured (batch 8, accumulation 4, evaluation and checkpoint at the end)."""
    from finetuning.config import from_preset
    from finetuning.train import finetune

    started = time.perf_counter()
    result = finetune(corpus, model, work / f"epoch-{Path(model).name}-{preset}", from_preset(preset, epochs=1),
                      progress=False, overwrite=True)
    wall = time.perf_counter() - started
    s = result.summary
    return {"wall_s": round(wall, 1), "train_runtime_s": round(s["train_runtime_s"], 1),
            "optimizer_steps": s["global_step"], "validation_loss": [s["initial_eval_loss"], s["final_eval_loss"]]}


def _history(out: Path) -> list[dict]:
    state = sorted((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    return json.loads(state[-1].read_text())["log_history"] if state else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--presets", nargs="+", default=["config-i", "config-ii"])
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps timed per run (first one excluded)")
    parser.add_argument("--smollm-batch", type=int, default=2, help="micro-batch for SmolLM2 (tiny uses 8)")
    parser.add_argument("--full-epoch", nargs="*", default=["tiny"], metavar="MODEL",
                        help="models for which one real epoch of each preset is also run (default: tiny)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--merge", action="store_true",
                        help="keep earlier results for models not measured now (e.g. re-measure one model)")
    args = parser.parse_args(argv)
    if not (SHARED / "pubmed" / FILES[0]).is_file():
        print(f"skipped: shared data not found under {SHARED}", file=sys.stderr)
        return 0
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    results: dict = {
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()},
        "method": "per-step timings of a few optimiser steps (accumulation 1), first step excluded; one epoch "
                  "extrapolated from the per-row train and validation rates; checkpoint saving not included",
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        results["corpus"] = build_epilepsy_corpus(work / "corpus")
        results["corpus"]["build_wall_s"] = round(time.perf_counter() - started, 1)
        for name in args.models:
            model = str(tiny_gpt2(work / "tiny-gpt2")) if name == "tiny" else name
            batch = 8 if name == "tiny" else args.smollm_batch
            for preset in args.presets:
                print(f"[bench] {name} {preset} ...", file=sys.stderr, flush=True)
                epoch = full_rows(work / "corpus", model, preset)
                rates = measure(work / "corpus", model, preset, args.steps, batch, eval_records=8, work=work)
                train_s = epoch["train"]["rows"] / rates["train_rows_per_s"]
                eval_s = epoch["validation"]["rows"] / rates["eval_rows_per_s"]
                run = {"model": name, "preset": preset, **rates, "epoch": epoch,
                       "epoch_optimizer_steps": -(-epoch["train"]["rows"] // 32),
                       "epoch_train_s": round(train_s, 1), "epoch_eval_s": round(eval_s, 1),
                       "epoch_wall_s_extrapolated": round(train_s + eval_s, 1),
                       "load_average_1m_after": round(os.getloadavg()[0], 2)}
                if name in args.full_epoch:
                    print(f"[bench] {name} {preset}: one full epoch ...", file=sys.stderr, flush=True)
                    run["epoch_measured"] = full_epoch(work / "corpus", model, preset, work)
                results["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "finetune_throughput.json"
    if args.merge and previous.is_file():
        kept = [r for r in json.loads(previous.read_text())["runs"] if r["model"] not in args.models]
        results["runs"] = kept + results["runs"]
    (args.out / "finetune_throughput.json").write_text(json.dumps(results, indent=2))
    (args.out / "finetune_throughput.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    c = results["corpus"]
    lines = [
        "# Fine-tuning throughput (CPU)",
        "",
        f"Corpus: {c['abstracts']} epilepsy-related abstracts from the two large shared PubMed files "
        f"({c['train']} train / {c['validation']} validation), built by `clap corpus build` in {c['build_wall_s']} s.",
        f"Machine: {results['machine']['cpu_cores']} CPU cores, torch {results['machine']['torch']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in results['machine']['load_average_at_start'])}.",
        f"Method: {results['method']}.",
        "",
        "The machine is shared: the 1-minute load average after each measurement is given (this benchmark alone "
        "accounts for about 2 on 2 cores; more means other work competed for the cores and steps ran slower).",
        "",
        "| model | preset | micro-batch | s/step | train tokens/s (real) | positions/s | train rows (epoch) "
        "| optimiser steps (epoch, batch 8 x accum 4) | one epoch (extrapolated) | one epoch (measured) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['micro_batch']} | {r['train_seconds_per_step']:.2f} | "
            f"{r['train_tokens_per_s']:.0f} | {r['train_positions_per_s']:.0f} | {r['epoch']['train']['rows']} | "
            f"{r['epoch_optimizer_steps']} | {r['epoch_wall_s_extrapolated'] / 60:.1f} min "
            f"({r['epoch_train_s']:.0f} s train + {r['epoch_eval_s']:.0f} s validation) | "
            + (f"{r['epoch_measured']['wall_s'] / 60:.1f} min | " if "epoch_measured" in r else "not run | ")
            + f"{r.get('load_average_1m_after', 'n/a')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
