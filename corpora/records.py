"""The one record type every corpus source is parsed into, and its column schema.

All parsers (NLM XML, legacy MEDLINE XML, MEDLINE tagged text, tables, the fetch store, Hugging Face datasets)
yield :class:`PubmedRecord`, so filtering, de-duplication, splitting and saving are written once. Update files
can also retract citations; parsers report that as :class:`Deletion` events in stream order so the builder can
apply "latest wins" exactly as PubMed's baseline + update files intend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Columns of the built dataset and of its JSONL files, in order. ``text`` is what a language model is
#: fine-tuned on (title, blank line, abstract); ``matched_terms`` names the filter terms the record mentions.
COLUMNS: tuple[str, ...] = (
    "pmid",
    "title",
    "abstract",
    "journal",
    "year",
    "mesh_terms",
    "keywords",
    "url",
    "source_file",
    "matched_terms",
    "text",
)

PUBMED_URL = "https://pubmed.ncbi.nlm.nih.gov/{pmid}/"


def pubmed_url(pmid: str) -> str:
    """The canonical PubMed page of a citation (the seed spreadsheet's URL column)."""
    return PUBMED_URL.format(pmid=pmid)


def join_text(title: str, abstract: str) -> str:
    """The fine-tuning text: title and abstract separated by a blank line (either may be empty)."""
    return "\n\n".join(part for part in (title.strip(), abstract.strip()) if part)


@dataclass
class PubmedRecord:
    """One citation, as parsed from any source.

    ``pmid`` is kept as a string of digits (PMIDs are identifiers, not numbers to add). ``version`` is the
    ``<PMID Version=...>`` attribute (1 for sources that do not carry it); de-duplication keeps the highest
    version and, among equal versions, the one read last.
    """

    pmid: str
    title: str = ""
    abstract: str = ""
    journal: str = ""
    year: int | None = None
    mesh_terms: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    source_file: str = ""
    version: int = 1
    url: str = ""

    def __post_init__(self) -> None:
        if not self.url:
            self.url = pubmed_url(self.pmid)

    @property
    def text(self) -> str:
        return join_text(self.title, self.abstract)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the store's line format)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PubmedRecord:
        """Inverse of :meth:`to_dict`; unknown keys (e.g. ``text`` of a built corpus) are ignored."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["pmid"] = str(known["pmid"])
        known["mesh_terms"] = list(known.get("mesh_terms") or [])
        known["keywords"] = list(known.get("keywords") or [])
        year = known.get("year")
        known["year"] = int(year) if year not in (None, "") else None
        known["version"] = int(known.get("version") or 1)
        return cls(**known)

    def to_row(self, matched_terms: list[str] | None = None) -> dict[str, Any]:
        """The dataset row (see :data:`COLUMNS`)."""
        return {
            "pmid": self.pmid,
            "title": self.title,
            "abstract": self.abstract,
            "journal": self.journal,
            "year": self.year,
            "mesh_terms": list(self.mesh_terms),
            "keywords": list(self.keywords),
            "url": self.url,
            "source_file": self.source_file,
            "matched_terms": list(matched_terms or []),
            "text": self.text,
        }


@dataclass(frozen=True)
class Deletion:
    """A ``<DeleteCitation>`` entry: this PMID is withdrawn from everything read before it."""

    pmid: str
    source_file: str = ""


Event = PubmedRecord | Deletion


def dataset_features():
    """Explicit Hugging Face ``datasets`` features, so empty lists and missing years keep their types."""
    from datasets import Features, Sequence, Value

    string_list = Sequence(Value("string"))
    return Features(
        {
            "pmid": Value("string"),
            "title": Value("string"),
            "abstract": Value("string"),
            "journal": Value("string"),
            "year": Value("int32"),
            "mesh_terms": string_list,
            "keywords": string_list,
            "url": Value("string"),
            "source_file": Value("string"),
            "matched_terms": string_list,
            "text": Value("string"),
        }
    )
