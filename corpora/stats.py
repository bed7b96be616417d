"""Corpus statistics as the seed study reports them: records and mentions per term, and per publication year.

Tables are pandas frames (written as CSV); the figure is a seaborn bar chart of abstracts per year, drawn with the
Agg backend so it works on headless machines. ``clap corpus stats`` accepts a built corpus folder (its terms are
read from ``manifest.json``), a saved dataset, a JSONL, or any raw input file (counted as is, without filtering).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clap.contract import atomic_write, atomic_write_frame
from corpora.errors import CorpusInputError, ProblemLog
from corpora.filtering import TermFilter
from corpora.records import PubmedRecord, join_text

UNKNOWN_YEAR = "unknown"


@dataclass
class CorpusStats:
    """One pass over a corpus: per-term and per-year record and mention counts."""

    terms: Mapping[str, str]
    records: int = 0
    mentions: Counter = field(default_factory=Counter)
    records_with: Counter = field(default_factory=Counter)
    year_records: Counter = field(default_factory=Counter)
    year_term: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # (year, term) -> [records, mentions]

    def add(self, year: int | None, found: Mapping[str, int]) -> None:
        key = year if year is not None else UNKNOWN_YEAR
        self.records += 1
        self.year_records[key] += 1
        for term, n in found.items():
            self.mentions[term] += n
            self.records_with[term] += 1
            cell = self.year_term[(key, term)]
            cell[0] += 1
            cell[1] += n

    def by_term(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{"term": t, "pattern": p, "records": self.records_with[t], "mentions": self.mentions[t]}
             for t, p in self.terms.items()],
            columns=["term", "pattern", "records", "mentions"],
        )

    def _years(self) -> list:
        known = sorted(y for y in self.year_records if y != UNKNOWN_YEAR)
        return known + ([UNKNOWN_YEAR] if UNKNOWN_YEAR in self.year_records else [])

    def by_year(self) -> pd.DataFrame:
        """One row per year: records, then records and mentions of each term."""
        rows = []
        for year in self._years():
            row: dict[str, Any] = {"year": year, "records": self.year_records[year]}
            for term in self.terms:
                records, mentions = self.year_term.get((year, term), (0, 0))
                row[f"{term}_records"] = records
                row[f"{term}_mentions"] = mentions
            rows.append(row)
        columns = ["year", "records"] + [f"{t}_{k}" for t in self.terms for k in ("records", "mentions")]
        return pd.DataFrame(rows, columns=columns)


def compute_stats(rows: Iterable[Mapping[str, Any]], terms: Mapping[str, str]) -> CorpusStats:
    """Count ``rows`` (dicts with title, abstract, year) against ``terms``."""
    term_filter = TermFilter(terms)
    stats = CorpusStats(terms=dict(terms))
    for row in rows:
        text = row.get("text") or join_text(row.get("title") or "", row.get("abstract") or "")
        year = row.get("year")
        stats.add(int(year) if year not in (None, "") else None, term_filter.matches(text))
    return stats


def plot_abstracts_per_year(stats: CorpusStats, path: str | Path, title: str = "Abstracts per year") -> Path:
    """A seaborn bar chart of records per publication year, saved to ``path`` (PNG/SVG/PDF by suffix)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # years are categories on purpose
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = pd.DataFrame([{"year": str(y), "abstracts": stats.year_records[y]} for y in stats._years()])
    width = min(24.0, max(6.0, 0.28 * len(frame)))
    fig, ax = plt.subplots(figsize=(width, 4.0))
    if len(frame):
        sns.barplot(data=frame, x="year", y="abstracts", color="#4C72B0", ax=ax)
        if len(frame) > 12:
            ax.tick_params(axis="x", labelrotation=90)
    ax.set(title=f"{title} (n = {stats.records})", xlabel="publication year", ylabel="abstracts")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_stats(stats: CorpusStats, directory: str | Path, figure: bool = True) -> dict[str, Path]:
    """``by_term.csv``, ``by_year.csv`` and (optionally) ``abstracts_per_year.png`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {"by_term": directory / "by_term.csv", "by_year": directory / "by_year.csv"}
    atomic_write_frame(written["by_term"], stats.by_term())
    atomic_write_frame(written["by_year"], stats.by_year())
    if figure:
        written["figure"] = plot_abstracts_per_year(stats, directory / "abstracts_per_year.png")
    return written


def corpus_terms(path: str | Path) -> dict[str, str] | None:
    """The terms a built corpus was filtered with (from its ``manifest.json``), if ``path`` is one."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        terms = data.get("terms") or {}
        if not isinstance(terms, dict) or not all(isinstance(v, str) for v in terms.values()):
            raise ValueError("'terms' is not a NAME -> REGEX mapping")
    except (ValueError, AttributeError) as exc:  # AttributeError: the JSON is not an object
        raise CorpusInputError(manifest, f"not a corpus manifest ({exc}); rebuild the corpus or pass --term") from exc
    return dict(terms) or None


def _corpus_rows(split: Path, problems: ProblemLog) -> Iterator[Mapping[str, Any]]:
    """The rows of one split file of a built corpus; a damaged line is reported with its number."""
    with open(split, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("expected a JSON object")
                year = row.get("year")
                if year not in (None, "") and not str(year).strip().isdigit():
                    raise ValueError(f"year {year!r} is not a number")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                problems.report(CorpusInputError(split, f"bad corpus row ({exc})", line=lineno))
                continue
            yield row


def iter_rows(path: str | Path, skip_bad: bool = False) -> Iterator[Mapping[str, Any]]:
    """Rows of a built corpus folder (its train + validation JSONL), or records of any input file/folder."""
    path = Path(path)
    splits = [path / f"{name}.jsonl" for name in ("train", "validation")]
    if (path / "manifest.json").is_file() and all(p.is_file() for p in splits):
        problems = ProblemLog(skip_bad=skip_bad)
        for split in splits:
            yield from _corpus_rows(split, problems)
        return
    from corpora.readers import iter_inputs

    problems = ProblemLog(skip_bad=skip_bad)
    for event in iter_inputs([path], problems):
        if isinstance(event, PubmedRecord):
            yield {"title": event.title, "abstract": event.abstract, "year": event.year}
