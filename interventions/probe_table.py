"""The terminal view of a probe check: the per-probe table fitted to the terminal's width, each probe's problems in
full below it, and the one-line summary.

Why apart from the checks: what fits a terminal (which columns to drop first, where to cut) changes for reasons of
its own; the checks' frame is the same whatever is printed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def summary_line(frame: pd.DataFrame, ran_model: bool) -> str:
    structural = f"structural ok {int(frame['structural_ok'].sum())}"
    if not ran_model:
        return (f"validity unknown: structural checks only ({structural} of {len(frame)}); without "
                f"--structural-only the model says which probes it knows and flips")
    parts = [f"{int(frame['valid'].fillna(False).astype(bool).sum())} valid / {len(frame)} total", structural,
             f"knows {int(frame['knows'].fillna(False).astype(bool).sum())}"]
    if frame["flips"].notna().any():
        parts.append(f"flips {int(frame['flips'].fillna(False).astype(bool).sum())}")
    return "; ".join(parts)


SHOWN = ["id", "n_clean", "n_corrupted", "answer_pieces", "wrong_pieces", "clean_logit_diff", "corrupted_logit_diff",
         "p_answer", "answer_rank", "top_token", "knows", "flips", "valid", "problems"]
#: the model's columns (left out under --structural-only)
MODEL_COLUMNS = ("clean_logit_diff", "corrupted_logit_diff", "p_answer", "answer_rank", "top_token", "knows", "flips",
                 "valid")
#: columns dropped, in this order, when the table is still too wide for the terminal with the problems cut short
DROPPABLE = ("top_token", "wrong_pieces", "answer_pieces", "n_corrupted", "corrupted_logit_diff", "flips",
             "answer_rank", "n_clean", "knows", "clean_logit_diff", "p_answer")
#: the narrowest the problems column is cut to before a column is dropped; the longest an id is shown
MIN_PROBLEMS, MAX_ID = 20, 24


def fit_table(frame: pd.DataFrame, columns: Sequence[str], width: int) -> str:
    """The table at most ``width`` characters wide: ids and the ``problems`` text cut short (with an ellipsis),
    then the least needed columns dropped (:data:`DROPPABLE`). The full text is printed below it and in the CSV."""
    import pandas as pd

    columns = list(columns)
    shown = frame[columns].copy()
    shown["id"] = shown["id"].map(lambda t: _cut(str(t), MAX_ID))
    for name in ("answer_pieces", "wrong_pieces", "top_token"):
        if name in shown:
            shown[name] = shown[name].map(lambda t: _cut(str(t), 18))
    formats = {"p_answer": "{:.3g}", "answer_rank": "{:.0f}"}  # probabilities span decades; ranks are counts
    for name, form in formats.items():
        if name in shown:
            shown[name] = shown[name].map(lambda x, form=form: "-" if pd.isna(x) else form.format(x))

    def render(table: pd.DataFrame) -> str:
        return table.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")

    droppable = [c for c in DROPPABLE if c in columns]
    while True:
        others = render(shown.drop(columns=["problems"])) if "problems" in shown else render(shown)
        room = width - len(others.splitlines()[0]) - 2
        if room >= MIN_PROBLEMS or not droppable:
            break
        shown = shown.drop(columns=[droppable.pop(0)])
    if "problems" in shown:
        longest = int(shown["problems"].map(len).max() or 0)
        shown["problems"] = shown["problems"].map(lambda t: _cut(t, max(room, MIN_PROBLEMS, len("problems"))))
        if longest <= room:
            shown["problems"] = frame["problems"]
    return render(shown)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "\u2026"


def print_report(frame: pd.DataFrame, ran_model: bool, width: int | None = None) -> None:
    """The per-probe table fitted to the terminal, then every probe's problems in full, wrapped to it."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    unused = {c for c in MODEL_COLUMNS if c in frame and frame[c].isna().all()}  # e.g. logit differences of traces
    if "p_answer" in frame and "corrupted_p_answer" not in frame and frame["corrupted_logit_diff"].isna().all():
        unused.add("n_corrupted")  # probability-checked probes whose corrupted prompt is the clean one (traces)
    if (frame["wrong_kind"] == "none").all():
        unused.add("wrong_pieces")
    columns = [c for c in SHOWN if c in frame.columns and (ran_model or c not in MODEL_COLUMNS) and c not in unused]
    print(fit_table(frame, columns, width))
    flawed = frame[frame["problems"].astype(str) != ""]
    if len(flawed):  # one problem a line, unwrapped: a wrap inside a token would hide its leading space
        print(f"\nproblems ({len(flawed)} probes):")
        for row in flawed.itertuples(index=False):
            print(f"  {row.id} ({row.origin}):")
            for problem in str(row.problems).split("; "):
                print(f"      {problem}")
