"""`{match: ...}` position selectors pick exactly the tokens whose bytes overlap the matched substring, also where
one character is several tokens (byte-level BPE pieces of a CJK character or an emoji, SentencePiece byte fallback);
position labels are canonical and unambiguous."""

from __future__ import annotations

import pytest

from interventions.probes import resolve_positions, tokenize_probes
from interventions.spec import MatchPosition, ProbeSpec

SENTENCE = "The city of Paris 癫痫 is in 北京 🎉, near Paris."


def sentencepiece_tokenizer():
    """A Llama-style tokenizer: BPE with byte fallback, Metaspace pre-tokenizer, BOS added, trained on a few
    sentences so that 癫痫 is one token while 北京, 🎉 and some ASCII letters fall back to byte tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False)
    corpus = ["The city of Paris is in France.", "Epilepsy is a chronic disorder of the brain.",
              "癫痫 is epilepsy in Chinese. 癫痫 癫痫", "Valproate treats seizures."] * 3
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shift)
            shift += 1
    return chars


def token_bytes(tokenizer, token_id: int, special: set[int], sentencepiece: bool) -> bytes:
    """The bytes one token stands for, read from its vocabulary string (independent of clap's decoding)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in special:
        return b""
    if sentencepiece:  # "▁" for a space, "<0xE5>" for a byte-fallback token
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE: one character per byte
    return bytes(byte_of[c] for c in piece)


def expected_indices(tokenizer, ids: list[int], text: str, occurrence: int = 0) -> tuple[int, ...]:
    """Tokens whose byte span overlaps the ``occurrence``-th byte match of ``text``."""
    special = set(tokenizer.all_special_ids)
    sentencepiece = tokenizer.convert_tokens_to_ids("<0x41>") not in (None, tokenizer.unk_token_id)
    pieces = [token_bytes(tokenizer, t, special, sentencepiece) for t in ids]
    spans, offset = [], 0
    for piece in pieces:
        spans.append((offset, offset + len(piece)))
        offset += len(piece)
    stream, needle = b"".join(pieces), text.encode("utf-8")
    starts = [i for i in range(len(stream)) if stream.startswith(needle, i)]
    begin = starts[occurrence]
    return tuple(i for i, (a, b) in enumerate(spans) if a < begin + len(needle) and b > begin)


def probe_for(tokenizer, clean: str = SENTENCE):
    spec = ProbeSpec.model_validate({"id": "p", "clean": clean, "corrupted": clean, "answer": 0})
    return tokenize_probes([("inline[0]", spec)], tokenizer)[0]


@pytest.fixture(scope="module")
def sentencepiece():
    return sentencepiece_tokenizer()


def byte_level(request, which: str):
    """The real GPT-2 tokenizer (skips without ``../shared/data``) or the tests' tiny byte-level BPE, which runs
    everywhere: both split a CJK character or an emoji into one token per byte."""
    return request.getfixturevalue("real_gpt2_tokenizer" if which == "gpt2" else "tokenizer")


@pytest.mark.parametrize("which", ["gpt2", "byte-level", "sentencepiece"])
@pytest.mark.parametrize("text,occurrence", [
    ("癫痫", 0), ("Paris 癫痫", 0), ("北京", 0), ("🎉", 0), ("京 🎉", 0), ("Paris", 1), ("Paris", -1), (" is", 0),
    ("The", 0), ("city", 0),
])
def test_match_selects_exactly_the_overlapping_tokens(which, text, occurrence, request, sentencepiece):
    tok = sentencepiece if which == "sentencepiece" else byte_level(request, which)
    probe = probe_for(tok)
    [cell] = resolve_positions(MatchPosition(match=text, occurrence=occurrence), probe, "clean", "corrupted", tok)
    expected = expected_indices(tok, probe.clean_ids, text, occurrence)
    assert cell.indices == expected
    assert cell.position == (expected[0] if len(expected) == 1 else None)


@pytest.mark.parametrize("which", ["gpt2", "byte-level"])
def test_multi_token_characters_are_really_exercised(which, request, sentencepiece):
    """The sentence must hold characters split over several tokens, or the test above proves nothing."""
    tokenizer = byte_level(request, which)
    byte_ids = tokenizer(SENTENCE)["input_ids"]
    assert len(expected_indices(tokenizer, byte_ids, "癫痫")) == 6  # the reported case: 3 bytes each
    if which == "gpt2":
        assert expected_indices(tokenizer, byte_ids, "癫痫") == (4, 5, 6, 7, 8, 9)
    assert len(expected_indices(tokenizer, byte_ids, "🎉")) > 1
    sp_ids = sentencepiece(SENTENCE)["input_ids"]
    pieces = sentencepiece.convert_ids_to_tokens(sp_ids)
    assert "▁癫痫" in pieces and pieces.count("<0xE5>") == 1  # 北 falls back to bytes, 癫痫 does not
    assert len(expected_indices(sentencepiece, sp_ids, "🎉")) == 4


@pytest.mark.parametrize("which", ["gpt2", "byte-level"])
def test_the_reported_sentence_patches_all_six_tokens(which, request):
    tokenizer = byte_level(request, which)
    probe = probe_for(tokenizer, "The city of Paris 癫痫 is in")
    [cell] = resolve_positions(MatchPosition(match="癫痫"), probe, "clean", "corrupted", tokenizer)
    # GPT-2 merges the space into the first byte's token; the tiny tokenizer keeps the space a token of its own
    expected = (4, 5, 6, 7, 8, 9) if which == "gpt2" else (5, 6, 7, 8, 9, 10)
    assert cell.indices == expected == expected_indices(tokenizer, probe.clean_ids, "癫痫")


@pytest.mark.slow
def test_match_on_the_smollm2_tokenizer():
    from clap.models import builtin_gguf_path, load_model

    try:
        builtin_gguf_path("smollm2-135m")
    except Exception as exc:
        pytest.skip(str(exc))
    tok = load_model("smollm2-135m").tokenizer
    probe = probe_for(tok)
    for text, occurrence in [("癫痫", 0), ("北京", 0), ("🎉", 0), ("Paris", 1)]:
        [cell] = resolve_positions(MatchPosition(match=text, occurrence=occurrence), probe, "clean", "corrupted", tok)
        assert cell.indices == expected_indices(tok, probe.clean_ids, text, occurrence), text


def test_match_labels_are_canonical_and_unambiguous(tokenizer):
    probe = probe_for(tokenizer, "Paris is Paris, said Paris #1 @corrupted")

    def label(**fields) -> str:
        [cell] = resolve_positions(MatchPosition(**fields), probe, "clean", "corrupted", tokenizer)
        return cell.label

    distinct = [
        dict(match="Paris"), dict(match="Paris", occurrence=1), dict(match="Paris", occurrence=-1),
        dict(match="Paris", prompt="corrupted"), dict(match="Paris", occurrence=1, prompt="corrupted"),
        dict(match="Paris #1"), dict(match="Paris", occurrence=2),
        dict(match="#1 @corrupted"), dict(match="@corrupted"),
    ]
    labels = [label(**fields) for fields in distinct]
    assert len(set(labels)) == len(distinct), labels
    assert labels[:5] == ["match:Paris", "match:Paris#1", "match:Paris#-1", "match:Paris@corrupted",
                          "match:Paris#1@corrupted"]
    # equal selectors (defaults spelt out or not) share one label
    assert label(match="Paris", occurrence=0, prompt="clean") == label(match="Paris") == "match:Paris"
    assert label(match="Paris", occurrence=1) == label(match="Paris", prompt="clean", occurrence=1)
