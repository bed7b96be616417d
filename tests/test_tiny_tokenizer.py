"""The tests' own byte-level BPE tokenizer (tests/tiny_tokenizer.py): every training word is one token, it is the
same on every build, and any other text still round-trips through byte tokens, as with GPT-2."""

from __future__ import annotations

import re

from tests.tiny_tokenizer import EOS, TEST_WORDS, build_tiny_tokenizer, tiny_tokenizer, training_words


def test_every_training_word_is_one_token_with_and_without_a_leading_space():
    tok = tiny_tokenizer()
    several = [form for form in training_words() if len(tok(form)["input_ids"]) != 1]
    assert several == []
    assert tok.convert_ids_to_tokens(tok(" Paris")["input_ids"]) == ["ĠParis"]  # GPT-2's byte-level alphabet


def test_the_engine_test_prompts_use_only_training_words():
    from tests.interventions.conftest import PROBES
    from tests.test_run import PROBES as RUN_PROBES

    texts = [text for p in PROBES + RUN_PROBES for k in ("clean", "corrupted", "answer", "wrong")
             for text in ([p[k]] if isinstance(p[k], str) else p[k])]
    words = {w for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    assert words <= set(TEST_WORDS), sorted(words - set(TEST_WORDS))
    tok = tiny_tokenizer()
    for text in texts:
        assert len(tok(text)["input_ids"]) == len(re.findall(r"[A-Za-z]+|[^A-Za-z\s]", text)), text


def test_a_fresh_build_is_identical_and_special_tokens_are_gpt2s():
    first, second = tiny_tokenizer(), build_tiny_tokenizer()
    assert tiny_tokenizer() is first and second is not first
    assert second.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert first.eos_token == first.bos_token == EOS and first.convert_tokens_to_ids(EOS) == first.eos_token_id
    assert first("The capital")["input_ids"][0] != first.eos_token_id  # no BOS prepended, as GPT-2
    assert len(first) == first.backend_tokenizer.get_vocab_size() < 2000


def test_unseen_text_falls_back_to_byte_tokens_and_round_trips():
    tok = tiny_tokenizer()
    text = "Paris 癫痫 🎉 Parisians"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok(" 癫痫")["input_ids"])
    assert pieces[0] == "Ġ" and len(pieces) == 1 + len("癫痫".encode())  # one token per UTF-8 byte
    assert len(tok(" Parisians")["input_ids"]) > 1
