"""Corpora: PubMed acquisition, parsing, filtering and corpus statistics (``clap corpus fetch | build | stats``).

Pipeline::

    clap corpus fetch -q "epilepsy OR seizure OR EEG" -o STORE     E-utilities -> append-only store (resumable)
    clap corpus build STORE [FILES...] -o OUT                      parse -> latest wins -> filter -> split -> save
    clap corpus stats OUT                                          records/mentions per term and year + figure

Modules, one job each:

- ``records``       the :class:`~corpora.records.PubmedRecord` every source is parsed into; dataset columns
- ``sources``       opening files (gzip by magic bytes, truncation-tolerant) and telling formats apart
- ``parse_xml``     NLM ``PubmedArticleSet`` and legacy ``MedlineCitationSet`` XML (lxml iterparse, DeleteCitation)
- ``parse_medline`` MEDLINE/NBIB tagged text
- ``parse_table``   CSV/TSV/XLSX with the seed spreadsheet's columns (PMID, Title, Abstract, Journal, Keywords, URL)
- ``hub``           Hugging Face datasets (``nubahador/Retrieved_Data_from_PubMed`` or save_to_disk folders)
- ``readers``       one ordered stream of records/deletions over all inputs; ``--skip-bad`` handling
- ``eutils``        esearch/efetch client: NCBI rate limits, tool/email/api_key, retries with backoff, timeout
- ``redaction``     the API key masked in every body received (any escape mixture; UTF-8 or UTF-16), again in
                    every value parsed from it, and in every error, log record and file written
- ``store``         append-only JSONL store keyed by PMID with an atomic checkpoint
- ``fetch``         query -> store, batch by batch, resumable
- ``filtering``     named, case-insensitive term regexes over title + abstract
- ``splitting``     seeded train/validation split grouped by PMID
- ``build``         the whole build and its output folder
- ``stats``         per-term and per-year tables, seaborn figure

Output of ``clap corpus build -o OUT`` (what fine-tuning reads)::

    OUT/dataset/            datasets.DatasetDict, splits "train" and "validation":
                            datasets.load_from_disk("OUT/dataset")
    OUT/train.jsonl         the same rows as JSON lines
    OUT/validation.jsonl
    OUT/stats/by_term.csv   term, pattern, records, mentions
    OUT/stats/by_year.csv   year, records, <term>_records, <term>_mentions
    OUT/stats/abstracts_per_year.png
    OUT/manifest.json       inputs, terms, seed, fraction, counts at each step, problems, timing
    OUT/bad_records.jsonl   only with --skip-bad when something was skipped

A build is written into a hidden sibling folder and moved to OUT only once complete: a failed or interrupted
build (a full disk included: one line, no traceback) leaves the previous corpus as it was. A build holds a lock
beside OUT (a second build into it stops naming the first) and removes the hidden folders of killed builds.

Columns: ``pmid`` (str), ``title``, ``abstract``, ``journal``, ``year`` (int32 or null), ``mesh_terms`` (list of
str), ``keywords`` (list of str), ``url``, ``source_file``, ``matched_terms`` (list of str) and ``text`` (title,
blank line, abstract: the text a language model is fine-tuned on).
"""
