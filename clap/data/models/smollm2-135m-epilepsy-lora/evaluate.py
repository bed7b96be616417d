"""Base vs fine-tuned: held-out loss and clean probe logit differences (the numbers in this folder's README).

Plain PyTorch, independent of the Trainer: the validation split is tokenised as ``clap finetune`` does in chunk mode
(each abstract with the tokenizer's special tokens, concatenated, cut into ``max_length`` blocks, the remainder
dropped) and the mean next-token NLL over every predicted token is computed with ``torch.nn.functional.cross_entropy``.
Probe logit differences are read at the last prompt position, one prompt at a time (no padding).

    PYTHONPATH=. python clap/data/models/smollm2-135m-epilepsy-lora/evaluate.py --corpus CORPUS \
        [--probes clap/data/probes/definitional.jsonl clap/data/probes/associative.jsonl] [--records N]

Writes ``evaluation.json`` and ``probe_logit_diffs.csv`` next to this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def validation_blocks(corpus: Path, tokenizer, block: int, records: int | None) -> tuple[list[list[int]], int]:
    rows = [json.loads(line) for line in (corpus / "validation.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()][:records]
    flat = [t for text in texts for t in tokenizer(text, add_special_tokens=True)["input_ids"]]
    usable = (len(flat) // block) * block
    return [flat[i: i + block] for i in range(0, usable, block)], len(texts)


@torch.no_grad()
def mean_nll(model, blocks: list[list[int]], batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = torch.tensor(blocks[i: i + batch])
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def logit_diff(model, tokenizer, prompt: str, answer: str, wrong: str) -> float:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    last = model(input_ids=ids).logits[0, -1]
    a, w = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (answer, wrong))
    if len(a) != 1 or len(w) != 1:
        raise ValueError(f"{answer!r} / {wrong!r} is not one token each")
    return float(last[a[0]] - last[w[0]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--probes", type=Path, nargs="*", default=[])
    parser.add_argument("--records", type=int, default=None, help="only the first N validation abstracts")
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()

    from clap.models import load_hf_model

    torch.manual_seed(0)
    models = {}
    for label, source in (("base", "smollm2-135m"), ("fine-tuned", "smollm2-135m-epilepsy")):
        models[label], tokenizer, _ = load_hf_model(source)
    blocks, n_records = validation_blocks(args.corpus, tokenizer, args.block, args.records)
    result: dict = {"validation_records": n_records, "validation_blocks": len(blocks), "block": args.block,
                    "validation_tokens": len(blocks) * args.block}
    for label, model in models.items():
        start = time.time()
        loss = mean_nll(model, blocks)
        result[label] = {"validation_loss": loss, "validation_perplexity": math.exp(loss),
                         "seconds": round(time.time() - start, 1)}
        print(label, result[label], flush=True)

    train_pmids = {json.loads(line)["pmid"] for line in (args.corpus / "train.jsonl").read_text().splitlines()
                   if line.strip()}
    rows = []
    for path in args.probes:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            probe = json.loads(line)
            diffs = {label: logit_diff(m, tokenizer, probe["clean"], probe["answer"], probe["wrong"])
                     for label, m in models.items()}
            rows.append({"set": path.stem, "id": probe["id"], "in_train": any(str(p) in train_pmids
                                                                              for p in probe.get("pmids", [])),
                         "base": diffs["base"], "fine_tuned": diffs["fine-tuned"],
                         "change": diffs["fine-tuned"] - diffs["base"]})
    if rows:
        with open(HERE / "probe_logit_diffs.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = {}
        for name in sorted({r["set"] for r in rows}):
            for subset, keep in (("all", lambda r: True), ("PMID in train split", lambda r: r["in_train"]),
                                 ("no PMID in train split", lambda r: not r["in_train"])):
                sel = [r for r in rows if r["set"] == name and keep(r)]
                if not sel:
                    continue
                summary[f"{name} | {subset}"] = {
                    "probes": len(sel),
                    "median_base": statistics.median(r["base"] for r in sel),
                    "median_fine_tuned": statistics.median(r["fine_tuned"] for r in sel),
                    "median_change": statistics.median(r["change"] for r in sel),
                    "mean_change": statistics.fmean(r["change"] for r in sel),
                    "increased": sum(r["change"] > 0 for r in sel),
                    "knows_base": sum(r["base"] > 0 for r in sel),
                    "knows_fine_tuned": sum(r["fine_tuned"] > 0 for r in sel),
                }
        result["probes"] = summary
    (HERE / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
