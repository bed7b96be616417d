"""``clap corpus build``: inputs -> de-duplicated, filtered, split fine-tuning corpus.

Output folder layout (what fine-tuning and ``clap corpus stats`` read)::

    <out>/dataset/             datasets.DatasetDict (save_to_disk) with splits "train" and "validation";
                               load with datasets.load_from_disk("<out>/dataset")
    <out>/train.jsonl          the same rows as JSON lines (one object per record, columns below)
    <out>/validation.jsonl
    <out>/stats/by_term.csv    term, pattern, records, mentions (over the whole corpus)
    <out>/stats/by_year.csv    year, records, <term>_records, <term>_mentions
    <out>/stats/abstracts_per_year.png
    <out>/manifest.json        inputs, terms, seed, fraction, counts at each step, bad input, timing
    <out>/bad_records.jsonl    only with --skip-bad and when something was skipped

Columns (see :data:`corpora.records.COLUMNS`): ``pmid`` (string), ``title``, ``abstract``, ``journal``,
``year`` (int or null), ``mesh_terms`` (list of strings), ``keywords`` (list of strings), ``url``,
``source_file``, ``matched_terms`` (filter terms the record mentions) and ``text`` (title, blank line, abstract:
the fine-tuning text). Rows are sorted by PMID within each split.

Semantics, in stream order: a ``<DeleteCitation>`` drops the PMID from everything read before it; a PMID read
again replaces the earlier copy unless its ``Version`` is lower ("latest wins", so update files revise the
baseline). Only the final copy is filtered: records without an abstract and records that mention no term are
left out.

Nothing is lost to a failed build: the corpus is written into a hidden sibling folder (``.<out>.building-*``) and
moved into place only once it is complete, so a bad input, a filter that keeps nothing, a full disk or Ctrl-C leaves
the previous corpus at ``<out>`` exactly as it was. Files in ``<out>`` that a build does not write are carried over.
A build holds a lock beside ``<out>`` (``.<out>.lock``: a second build into the same folder stops at once, naming
the first) and, holding it, removes hidden folders of builds that were killed (their process is gone).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clap.locks import exclusive_lock
from clap.outputs import os_error_text
from corpora.errors import CorpusError, ProblemLog
from corpora.filtering import DEFAULT_TERMS, TermFilter
from corpora.readers import iter_inputs
from corpora.records import COLUMNS, Deletion, PubmedRecord, dataset_features
from corpora.splitting import split_groups
from corpora.stats import compute_stats, write_stats

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
#: What a build writes in its output folder (a rebuild replaces exactly these; other files are kept).
OUTPUTS = ("dataset", "stats", "train.jsonl", "validation.jsonl", "bad_records.jsonl", "manifest.json")


@dataclass
class BuildConfig:
    """Everything a build depends on (stored in ``manifest.json`` for reproducibility)."""

    inputs: Sequence[str | Path]
    out: str | Path
    terms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TERMS))
    filter_terms: bool = True
    require_abstract: bool = True
    validation_fraction: float = 0.2
    seed: int = 42
    skip_bad: bool = False
    hf_dataset: str | None = None
    hf_split: str | None = None
    figure: bool = True
    overwrite: bool = False


@dataclass
class BuildReport:
    """Counts at each step of a build."""

    read: int = 0                 # records read, all inputs
    deletions_listed: int = 0     # PMIDs listed in DeleteCitation blocks
    deletions: int = 0            # of those, PMIDs that removed a record read earlier
    replaced: int = 0             # records that replaced an earlier copy of their PMID
    superseded: int = 0           # records ignored because a higher version was already read
    unique: int = 0               # distinct PMIDs alive after deletions
    without_abstract: int = 0     # of those, without an abstract
    kept: int = 0                 # in the corpus
    train: int = 0
    validation: int = 0
    bad: int = 0                  # problems skipped under --skip-bad
    seconds: float = 0.0
    by_term: list[dict[str, Any]] = field(default_factory=list)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder before reading any input: a file, or a non-empty folder that is not a built corpus
    (unless ``overwrite``). A built corpus is always rebuilt in place; that is what rerunning a build means."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a folder; choose another --out")
    try:
        occupied = out.is_dir() and any(out.iterdir())
    except OSError as exc:
        raise CorpusError(f"{out}: cannot read the output folder ({exc.strerror or exc})") from exc
    if occupied and not (out / "manifest.json").is_file() and not overwrite:
        raise CorpusError(f"{out}: folder exists and is not a built corpus; choose another --out or --overwrite")


def _sibling(out: Path, kind: str) -> Path:
    """A hidden folder beside ``out`` that names its kind and the process making it (``.NAME.building-PID-XXXX``)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_killed_builds(out: Path) -> list[Path]:
    """Remove ``.NAME.building-*`` folders beside ``out`` left by builds that were killed (no clean-up ran).

    Called under the build lock, so no other build of ``out`` is running; a folder is still kept when the process
    its name records is alive (a build from before the lock existed). Returns the folders removed."""
    removed = []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.building-*")):
        owner = folder.name.rsplit(".building-", 1)[1].split("-")[0]
        if owner.isdigit() and _alive(int(owner)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d folder(s) of killed builds: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh hidden folder next to ``out`` (same file system, so moving it in is a rename); removed on failure."""
    staging = _sibling(out, "building")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise CorpusError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from exc
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished build at ``out``. The previous folder stays whole until the new one is in place, then
    the files it held that a build does not write are moved across and the rest removed."""
    if not out.exists():
        os.rename(staging, out)
        return
    previous = _sibling(out, "previous")
    os.rename(out, previous)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(previous, out)
        raise
    for entry in previous.iterdir():
        if entry.name not in OUTPUTS:
            os.rename(entry, out / entry.name)
    shutil.rmtree(previous)


def collect(config: BuildConfig, problems: ProblemLog, report: BuildReport
            ) -> dict[str, tuple[PubmedRecord, list[str]]]:
    """Read all inputs, apply deletions and latest-wins, and keep the records that pass the filter.

    Only PMID -> version is remembered for records that do not pass, so memory grows with the corpus, not with
    the inputs.
    """
    term_filter = TermFilter(config.terms)
    versions: dict[str, int] = {}
    kept: dict[str, tuple[PubmedRecord, list[str]]] = {}
    no_abstract: set[str] = set()
    for event in iter_inputs(config.inputs, problems, config.hf_dataset, config.hf_split):
        if isinstance(event, Deletion):
            report.deletions_listed += 1
            if versions.pop(event.pmid, None) is not None:
                report.deletions += 1
            kept.pop(event.pmid, None)
            no_abstract.discard(event.pmid)
            continue
        record = event
        report.read += 1
        previous = versions.get(record.pmid)
        if previous is not None:
            if record.version < previous:
                report.superseded += 1
                continue
            report.replaced += 1
            kept.pop(record.pmid, None)
            no_abstract.discard(record.pmid)
        versions[record.pmid] = record.version
        if config.require_abstract and not record.abstract.strip():
            no_abstract.add(record.pmid)
            continue
        if config.filter_terms:
            matched = list(term_filter.matches(record.text))
            if not matched:
                continue
        else:
            matched = list(term_filter.matches(record.text))
        kept[record.pmid] = (record, matched)
    report.unique = len(versions)
    report.without_abstract = len(no_abstract)
    return kept


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_corpus(config: BuildConfig) -> BuildReport:
    """Run the whole build; returns its counts (also written to ``manifest.json``).

    Inputs are parsed into one ordered stream (deletions applied, the latest version of a PMID wins), filtered by
    the term regexes, split into train and validation by PMID with a fixed seed, and written. The build goes into a
    hidden sibling folder and replaces ``config.out`` only once complete, so a failed or interrupted build leaves
    the previous corpus as it was (the output layout is in the :mod:`corpora` docstring).

    Parameters
    ----------
    config : BuildConfig
        Inputs (files or folders: PubMed XML, MEDLINE, CSV/TSV/XLSX; or ``hf_dataset``), output folder, terms,
        ``validation_fraction``, ``seed``, ``skip_bad``, ``figure``, ``overwrite``.

    Returns
    -------
    BuildReport
        Counts at each step: ``read``, ``deletions``, ``replaced``, ``unique``, ``kept``, ``train``, ``validation``,
        ``bad``, per-term counts and the time taken.

    Raises
    ------
    corpora.errors.CorpusError
        No inputs, an output path in the way, or a bad record without ``skip_bad``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from corpora.build import BuildConfig, build_corpus
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     seed = Path(tmp) / "seed.csv"
    ...     _ = seed.write_text("PMID,Title,Abstract,Journal,Keywords,URL\\n" + "".join(
    ...         f"{i},Seizure study {i},EEG findings in epilepsy cohort {i}.,Epilepsia,EEG,\\n" for i in range(1, 11)))
    ...     report = build_corpus(BuildConfig(inputs=[seed], out=Path(tmp) / "corpus", figure=False))
    ...     written = sorted(p.name for p in (Path(tmp) / "corpus").iterdir())
    >>> report.read, report.kept, report.train, report.validation
    (10, 10, 8, 2)
    >>> written
    ['dataset', 'manifest.json', 'stats', 'train.jsonl', 'validation.jsonl']
    """
    started = time.perf_counter()
    out = Path(config.out)
    if out.is_symlink():  # replace the folder it points to, not the link
        out = out.resolve()
    if not config.inputs and not config.hf_dataset:
        raise CorpusError("no inputs given: pass files/folders or --hf-dataset")
    _check_out(out, config.overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from exc
    with exclusive_lock(out.parent / f".{out.name}.lock", wait=False, what=f"corpus folder {out}"):
        _remove_killed_builds(out)
        try:
            with _staging(out) as staging:
                report = _build_into(config, staging, started)
                _swap_in(staging, out)
        except OSError as exc:  # a full disk mid-build: the staging folder is gone, the previous corpus untouched
            raise CorpusError(f"{out}: the build failed ({os_error_text(exc)}); the partial build was removed and "
                              f"{out} is unchanged") from None
    log.info("corpus: %d records (%d train, %d validation) in %.1f s -> %s", report.kept, report.train,
             report.validation, report.seconds, out)
    return report


def _build_into(config: BuildConfig, out: Path, started: float) -> BuildReport:
    """Every output of the build, written into the (empty, staging) folder ``out``."""
    import datasets

    problems = ProblemLog(skip_bad=config.skip_bad)
    report = BuildReport()
    kept = collect(config, problems, report)
    report.kept = len(kept)
    if not kept:
        raise CorpusError(
            f"no record left after filtering ({report.read} read, {report.without_abstract} without abstract); "
            "check the inputs and --term patterns")

    train_ids, validation_ids = split_groups(kept, config.validation_fraction, config.seed)
    split_rows: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for pmid in sorted(kept, key=int):
        record, matched = kept[pmid]
        split_rows["validation" if pmid in validation_ids else "train"].append(record.to_row(matched))
    report.train, report.validation = len(split_rows["train"]), len(split_rows["validation"])

    features = dataset_features()
    dataset = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in COLUMNS}, features=features)
        for name, rows in split_rows.items()
    })
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a few hundred rows: the shard bar is noise in logs
    try:
        dataset.save_to_disk(str(out / "dataset"))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    for name, rows in split_rows.items():
        _write_jsonl(out / f"{name}.jsonl", rows)

    stats = compute_stats((row for rows in split_rows.values() for row in rows), config.terms)
    write_stats(stats, out / "stats", figure=config.figure)
    report.by_term = stats.by_term().drop(columns="pattern").to_dict("records")

    report.bad = len(problems)
    if problems.problems:
        problems.write_jsonl(out / "bad_records.jsonl")
    report.seconds = round(time.perf_counter() - started, 3)
    manifest = {
        "inputs": [str(p) for p in config.inputs],
        "hf_dataset": config.hf_dataset,
        "hf_split": config.hf_split,
        "terms": config.terms,
        "filter_terms": config.filter_terms,
        "require_abstract": config.require_abstract,
        "validation_fraction": config.validation_fraction,
        "seed": config.seed,
        "columns": list(COLUMNS),
        "splits": {name: len(rows) for name, rows in split_rows.items()},
        "report": asdict(report),
        "problems": [str(p) for p in problems.problems[:100]],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return report
