"""How a probe's rows in one layer (several token positions, several heads) become the one value a test uses.

The choice decides what the test answers, so it is explicit and named (:func:`reduction_label`) in every table.
Two facts of activation patching drive the defaults:

* Recovery is roughly *conserved across positions*: patching the residual stream at each position of a layer in
  turn, the recoveries share about 1 between them (information sits at some position of each layer). The mean
  over positions is therefore about 1 / prompt length at every layer, whatever the layer does, and a layer test on
  it finds nothing. The last token (where the answer is read out) is the default; ``max``, ``sum``, the subject's
  tokens (``subject``: their sum, the subject's share) or its last token (``subject_last``) and a fixed token index
  are the alternatives (see :mod:`clap.analysis_options`).
* Heads of one layer add up to the layer's attention output: their *sum* is the layer's total; their mean divides
  a single important head by the number of heads. Heads are summed per probe, layer and position *before* the
  position rule (the layer's total at the chosen token), or analysed one by one (``each``, the per-head table).

A slice that patched one position per probe (``positions: [last]``) needs no position rule: its rows are used as
patched, and the label says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from clap.errors import ClapError

POSITION_LABELS = {
    "last": "last position",
    "max": "max over positions",
    "sum": "sum over positions",
    "subject": "subject tokens (sum)",
    "subject_last": "last subject token",
}


def position_label(rule: str | int) -> str:
    """Readable name of a position rule: ``"last position"``, ``"position 3"``."""
    if isinstance(rule, (int, np.integer)):
        return "last position" if rule == -1 else f"position {int(rule)}"
    return POSITION_LABELS.get(rule, str(rule))


def reduction_label(position_rule: str | int | None, head_rule: str | None) -> str:
    """The text of the ``reduction`` column: position rule, then the head rule where heads were reduced."""
    parts = [position_label(position_rule) if position_rule is not None else "single position (as patched)"]
    if head_rule:
        parts.append("heads summed per layer" if head_rule == "sum" else f"heads: {head_rule}")
    return "; ".join(parts)


def reduce_cells(
    rows: pd.DataFrame,
    dv: str,
    keys: Sequence[str],
    *,
    position_reduction: str | int = "last",
    head_reduction: str = "sum",
    subject_field: str = "subject",
    where: str = "",
) -> tuple[pd.DataFrame, str]:
    """One value of ``dv`` per combination of ``keys`` (which include ``probe_id``); returns it and its label.

    Heads (rows with a ``head``, when ``keys`` do not name ``head`` or ``site``) are summed first, per probe, layer
    and position; a cell lacking some of the layer's heads is left out rather than summed short. Then the position
    rule picks or combines positions. Refuses with a :class:`~clap.errors.ClapError` naming what is missing when
    the results cannot support the rule (no ``position`` column, no subject label, a subject not found among the
    patched tokens).
    """
    keys = list(keys)
    rows = rows.copy()
    head_rule: str | None = None
    if "head" in rows.columns and rows["head"].notna().any() and not {"head", "site"} & set(keys):
        if head_reduction == "each":
            raise ClapError(
                f"head_reduction='each'{where}: heads are analysed one by one (the per-head table), not pooled into a "
                "test across layers; use head_reduction='sum' for a layer test on each layer's total"
            )
        if head_reduction != "sum":
            raise ClapError(f"head_reduction={head_reduction!r} is not known; "
                            "expected 'sum' or 'each' (never the mean)")
        rows = _sum_heads(rows, dv, keys)
        head_rule = "sum"
    pos = "position" if "position" in rows.columns else None
    per_cell = rows.groupby(keys, observed=True, sort=False)[dv].size()
    if per_cell.max() <= 1:
        cells = rows[keys + [dv]].reset_index(drop=True)
        return cells, reduction_label(None, head_rule)
    if pos is None or rows[pos].isna().any():
        raise ClapError(
            f"several rows per {' x '.join(keys)}{where} but no token position recorded for them (column 'position' "
            "missing or NA): cannot apply a position rule; select one position selection (positions=...)"
        )
    rows[pos] = rows[pos].astype(np.int64)
    rule = position_reduction
    if rule in ("max", "sum"):
        cells = rows.groupby(keys, observed=True, sort=True)[dv].agg(rule).reset_index()
        return cells, reduction_label(rule, head_rule)
    last = rows.groupby("probe_id", observed=True)[pos].transform("max")
    if rule == "last":
        keep = rows[pos] == last
    elif isinstance(rule, (int, np.integer)):
        target = last + 1 + int(rule) if rule < 0 else pd.Series(int(rule), index=rows.index)
        keep = rows[pos] == target
        if not keep.any():
            raise ClapError(f"no probe has a token at position {int(rule)}{where} (positions patched: "
                            f"{', '.join(map(str, sorted(rows[pos].unique())))})")
    elif rule in ("subject", "subject_last"):
        spans = subject_positions(rows, subject_field, where=where)
        if rule == "subject_last":
            spans = {p: [max(s)] for p, s in spans.items()}
        wanted = pd.Series([(p, t) for p, t in zip(rows["probe_id"], rows[pos], strict=True)], index=rows.index)
        allowed = {(p, t) for p, s in spans.items() for t in s}
        keep = wanted.isin(allowed)
    else:
        raise ClapError(f"position_reduction={rule!r} is not known; expected last, max, sum, subject, subject_last or "
                        "a token index")
    agg = "sum" if rule == "subject" else "mean"  # after the filter other rules keep one row per cell
    cells = rows[keep].groupby(keys, observed=True, sort=True)[dv].agg(agg).reset_index()
    return cells, reduction_label(rule, head_rule)


def _sum_heads(rows: pd.DataFrame, dv: str, keys: list[str]) -> pd.DataFrame:
    """Per probe, layer and position: the sum over heads, only where every head of the layer has a value."""
    by = [k for k in keys] + (["position"] if "position" in rows.columns else [])
    by = [c for c in dict.fromkeys(by + ["layer"]) if c in rows.columns]
    n_heads = rows.groupby("layer", observed=True)["head"].nunique()
    agg = rows.groupby(by, observed=True, dropna=False, sort=False).agg(**{dv: (dv, "sum"), "_n": ("head", "nunique")})
    agg = agg.reset_index()
    complete = agg["_n"].to_numpy() == n_heads.reindex(agg["layer"]).to_numpy()
    per_head = {dv, "head", "site", "module", "patched", "recovery", "recovery_defined"}
    carry = [c for c in rows.columns if c not in by and c not in per_head]
    out = agg[complete].drop(columns="_n")
    if carry:  # tokens and labels are the same for every head of a probe and position
        first = rows.drop_duplicates(by)[by + carry]
        out = out.merge(first, on=by, how="left")
    return out


def subject_positions(rows: pd.DataFrame, subject_field: str, where: str = "") -> dict[Any, list[int]]:
    """Token positions of each probe's subject: the label ``subject_field`` matched in the patched prompt's tokens
    (``token``), else in the source prompt's (``source_token``), by character span."""
    if subject_field not in rows.columns:
        raise ClapError(
            f"position_reduction 'subject' needs the probe label {subject_field!r} (the subject string of each probe) "
            f"as a column of the results{where}; the results have: {', '.join(map(str, rows.columns))}. Add a "
            f"'{subject_field}' field to the probes or set subject_field to the label that holds the subject"
        )
    token_cols = [c for c in ("token", "source_token") if c in rows.columns]
    if not token_cols:
        raise ClapError(f"position_reduction 'subject' needs the patched tokens (column 'token'){where}; "
                        "the results have none")
    out: dict[Any, list[int]] = {}
    for probe, part in rows.groupby("probe_id", observed=True, sort=False):
        subject = str(part[subject_field].iloc[0])
        ordered = part.drop_duplicates("position").sort_values("position")
        positions = ordered["position"].astype(int).tolist()
        found = None
        for col in token_cols:
            found = _match_span([str(t) for t in ordered[col]], positions, subject)
            if found:
                break
        if not found:
            text = "".join(map(str, ordered[token_cols[0]]))
            raise ClapError(
                f"probe {probe!r}: subject {subject!r} not found in its patched tokens {text!r}{where}; "
                "the subject rule needs every position of the prompt patched (positions: [each]) and the subject "
                "spelled as in the prompt"
            )
        out[probe] = found
    return out


def _match_span(tokens: list[str], positions: list[int], subject: str) -> list[int] | None:
    """Positions whose characters overlap the first occurrence of ``subject`` in the concatenated tokens."""
    if positions != list(range(positions[0], positions[0] + len(positions))):
        return None  # not a contiguous prompt: no character spans
    text = "".join(tokens)
    start = text.find(subject)
    if start < 0:
        start = text.find(subject.strip())
        subject = subject.strip()
    if start < 0 or not subject:
        return None
    end = start + len(subject)
    found, offset = [], 0
    for pos, tok in zip(positions, tokens, strict=True):
        if offset < end and offset + len(tok) > start:
            found.append(pos)
        offset += len(tok)
    return found or None
