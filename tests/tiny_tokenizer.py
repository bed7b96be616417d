"""A small byte-level BPE tokenizer built inside the tests, so the engine tests run on a bare clone.

It works like GPT-2's (the same ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the vocabulary,
``<|endoftext|>`` as BOS/EOS, no BOS prepended) but is trained here, deterministically, on a fixed word list: every
word the engine tests' prompts and answers use plus a general-purpose English word list. The vocabulary is large
enough that each of those words is a single token, with and without a leading space; any other text (CJK, emoji,
unseen words) falls back to smaller pieces down to single bytes, as in GPT-2.
"""

from __future__ import annotations

from functools import lru_cache

EOS = "<|endoftext|>"

#: every word of the engine tests' prompts and answers (tests/interventions, tests/test_run.py); a test prompt that
#: uses a new word should add it here so each word stays one token
TEST_WORDS = """
Amlodipine Aspirin Atorvastatin Berlin Eczema Epilepsy Ethosuximide France Germany Insulin Italy Levetiracetam
Madrid Migraine Paris Rome Spain Tachycardia The Valproate a back brain capital central cholesterol chronic city
clean corrupted disorder drug epilepsy goes head heart history hypertension in is mind more near nervous of pain
said seizures skin sodium than the thousand to treat treats two used was what word years
""".split()

#: general-purpose English words, so that other short texts tokenize into whole words too
COMMON_WORDS = """
about above after again against all also always am an and another any are around as ask at away be because been
before being below between both but by call came can cause change child children come could country day did
different do does done down during each early earth end enough even every example eye face fact family far father
feel few find first follow food for form found four from get give go good great group hand has have he help her
here high him his home house how however if important into it its just keep kind know land large last later learn
leave left life light like line little live long look made make man many may me mean men might mother move much
must my name need never new next night no not now number off often old on once one only open or other our out
over own page part people place play point put question read right run same say school see seem sentence set
she should show side small so some something sometimes sound still story study such take tell that their them
then there these they thing think this those three through time together too tree try turn under until up us
very walk want water way we well went were when where which while white who why will with without work world
would write year you young your
answer cell disease doctor dose effect fever heart hospital infection medicine nerve patient protein risk symptom
therapy tissue virus blood bone liver lung muscle
""".split()

#: more merges than the word list can use: training stops once every word is a single token
VOCAB_CAP = 8192


def training_words() -> list[str]:
    """The fixed training text: each word alone (sentence-initial form) and after a space (GPT-2's ``Ġword``)."""
    words = sorted(set(TEST_WORDS) | set(COMMON_WORDS))
    return [form for word in words for form in (word, " " + word)]


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tokenizer, built once per test session and shared by every test that uses it."""
    return build_tiny_tokenizer()


def build_tiny_tokenizer():
    """A fresh build (a few tens of milliseconds of training); the same tokenizer every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_CAP, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_words(), trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
