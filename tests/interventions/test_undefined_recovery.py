"""A study that cannot produce a single defined recovery is refused with the reason, not run to report NaN; a study
where only some probes are undefined runs and says how many."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from clap.app.cli import main
from clap.errors import ClapError
from clap.models import wrap
from interventions import resolved as resolved_module
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES


def _same(probe):
    return dict(probe, corrupted=probe["clean"])


def _spec(probes, **execution):
    return StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": probes}, "sites": ["layers[*].resid_pre"],
        "positions": ["last"], "metrics": ["logit_diff", "prob"], "execution": {"progress": False, **execution},
    })


def test_identical_clean_and_corrupted_prompts_everywhere_are_refused_before_loading(tmp_path, tiny_gpt2,
                                                                                      monkeypatch, capsys):
    folder = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(resolved_module, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    spec = tmp_path / "study.yaml"
    spec.write_text(f"model:\n  source: {folder}\nprobes:\n  inline: {json.dumps([_same(p) for p in PROBES])}\n"
                    f"sites: [embed]\n")
    assert main(["patch", str(spec), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no probe can have a defined recovery" in err and "(fr, ep, vpa)" in err


def test_some_identical_probes_run_with_a_warning(tiny_gpt2, caplog):
    probes = [PROBES[0], _same(PROBES[1]), PROBES[2]]
    with caplog.at_level(logging.WARNING, logger="interventions.study"):
        frame = Study(_spec(probes), model=tiny_gpt2).run()
    assert "1 of 3 probes have identical clean and corrupted prompts (ep)" in caplog.text
    assert "1 of 3 probes have undefined recovery for every metric" in caplog.text
    assert not frame[frame.probe_id == "ep"].recovery_defined.any()
    # random tiny weights: probabilities ~1/V differ by less than recovery_epsilon, logit differences do not
    assert frame[(frame.probe_id != "ep") & (frame.metric == "logit_diff")].recovery_defined.all()


def test_answer_scores_that_no_prompt_moves_stop_the_study_after_its_baselines(tmp_path, tiny_gpt2, tokenizer,
                                                                                batches):
    hf = copy.deepcopy(tiny_gpt2.hf)
    with torch.no_grad():
        hf.lm_head.weight.zero_()  # tied to the embedding: every logit is 0 whatever the prompt
    model = wrap(hf, tokenizer)
    ids = [tokenizer(p["clean"], return_tensors="pt").input_ids for p in PROBES]
    ids += [tokenizer(p["corrupted"], return_tensors="pt").input_ids for p in PROBES]
    with torch.no_grad():  # independently: the clean and corrupted runs give identical last-position logits
        assert all(torch.equal(hf(i).logits[0, -1], torch.zeros(hf.config.vocab_size)) for i in ids)
    with pytest.raises(ClapError,
                       match=r"recovery is undefined for every probe: .*\(logit_diff, prob\) in ep, fr, vpa"):
        Study(_spec(PROBES, max_rows=8), model=model).run(tmp_path / "out")
    assert not (tmp_path / "out" / "results.parquet").exists()
    stopped_after = len(batches.calls)
    batches.reset()
    Study(_spec(PROBES, max_rows=8), model=tiny_gpt2).run()  # the same plan on real weights runs every batch
    assert 0 < stopped_after < len(batches.calls)
