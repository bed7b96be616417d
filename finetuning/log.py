"""The training log as a tidy CSV and a loss-curve figure.

Why rewrite the whole CSV from ``state.log_history`` at every log event instead of appending: after an
interruption the Trainer resumes from the last checkpoint, whose saved history ends at that checkpoint; a
rewrite then drops the steps that are about to be redone, so the log never shows a restarted stretch twice.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

LOG_COLUMNS = ("step", "epoch", "split", "loss", "perplexity", "learning_rate", "grad_norm")


def history_rows(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training loss and per validation loss, in log order.

    An evaluation repeated at the same step (the Trainer's scheduled one and the final one when training ends on
    an evaluation step) is one measurement of the same weights: it is kept once, its last value."""
    rows = []
    validation_at: dict[int, int] = {}
    for entry in history:
        if "loss" in entry:
            split, loss = "train", entry["loss"]
        elif "eval_loss" in entry:
            split, loss = "validation", entry["eval_loss"]
        else:  # the end-of-training summary (runtime, mean train loss) is reported elsewhere
            continue
        row = {
            "step": int(entry.get("step", 0)),
            "epoch": entry.get("epoch"),
            "split": split,
            "loss": float(loss),
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "learning_rate": entry.get("learning_rate"),
            "grad_norm": entry.get("grad_norm"),
        }
        if split == "validation" and row["step"] in validation_at:
            rows[validation_at[row["step"]]] = row
            continue
        if split == "validation":
            validation_at[row["step"]] = len(rows)
        rows.append(row)
    return rows


def write_log_csv(history: Iterable[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write the tidy log atomically (a reader never sees half a file); return its rows."""
    rows = history_rows(history)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in LOG_COLUMNS})
    partial.replace(path)
    return rows


class CsvLogCallback(TrainerCallback):
    """Keeps ``training_log.csv`` current while training runs."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        write_log_csv(state.log_history, self.path)

    def on_train_end(self, args, state, control, **kwargs):
        write_log_csv(state.log_history, self.path)


def write_loss_figure(csv_path: Path, png_path: Path, title: str = "", best_step: int | None = None) -> Path:
    """Train and validation loss against optimiser step (seaborn, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(frame):
        sns.lineplot(data=frame, x="step", y="loss", hue="split", style="split", markers=True, dashes=False,
                     hue_order=["train", "validation"], style_order=["train", "validation"], ax=ax)
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", linewidth=1)
        ax.annotate("best (reloaded)", xy=(best_step, 1), xycoords=("data", "axes fraction"),
                    xytext=(-3, -12), textcoords="offset points", ha="right", fontsize=8, color="grey")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (mean token NLL, nats)")
    ax.set_title(title or "fine-tuning loss")
    fig.tight_layout()
    partial = png_path.with_name(png_path.name + ".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(png_path)
    return png_path
