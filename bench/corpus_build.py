"""Benchmark: ``clap corpus build`` on the two large shared PubMed files (~50,800 citations).

Reports wall and CPU time, peak resident memory, records read and the epilepsy-related abstracts kept, per term.
The issue's target: under a minute on a 2-core machine.

    python bench/corpus_build.py [--repeat 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pubmed"
FILES = ("pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder holding the two files")
    args = parser.parse_args(argv)
    inputs = [args.data / name for name in FILES]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        print(f"skipped: shared data not found ({', '.join(missing)})", file=sys.stderr)
        return 0

    sys.path.insert(0, str(ROOT))
    from corpora.build import BuildConfig, build_corpus

    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = time.perf_counter(), time.process_time()
            report = build_corpus(BuildConfig(inputs=inputs, out=Path(tmp) / "corpus"))
            runs.append({"wall_s": round(time.perf_counter() - wall, 2),
                         "cpu_s": round(time.process_time() - cpu, 2)})
    result = {
        "inputs": list(FILES),
        "records_read": report.read,
        "distinct_pmids": report.unique,
        "without_abstract": report.without_abstract,
        "kept": report.kept,
        "train": report.train,
        "validation": report.validation,
        "by_term": report.by_term,
        "runs": runs,
        "best_wall_s": min(r["wall_s"] for r in runs),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
