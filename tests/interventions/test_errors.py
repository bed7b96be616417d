"""Bad input gets a clear, specific error: file, line, field, nearest valid names; never a deep traceback."""

from __future__ import annotations

import json
import textwrap

import pytest

from clap.app.cli import main
from clap.errors import ClapError
from clap.models import load_model
from interventions.sites import SiteResolver
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES

VALID = textwrap.dedent(
    """\
    name: demo
    model:
      source: MODEL
    probes:
      inline:
        - id: fr
          clean: "The capital of France is"
          corrupted: "The capital of Spain is"
          answer: " Paris"
          wrong: " Madrid"
    sites: ["layers[*].resid_pre"]
    positions: [last]
    """
)


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_field_names_file_line_and_nearest_field(tmp_path):
    path = write(tmp_path, VALID.replace("positions: [last]", "positons: [last]"))
    with pytest.raises(ClapError) as info:
        StudySpec.from_yaml(path)
    message = str(info.value)
    assert f"{path}:12: positons: unknown field 'positons'; did you mean 'positions'" in message


def test_bad_value_names_line_field_and_expected_values(tmp_path):
    path = write(tmp_path, VALID.replace("name: demo", "name: demo\ndirection: sideways"))
    with pytest.raises(ClapError) as info:
        StudySpec.from_yaml(path)
    message = str(info.value)
    assert f"{path}:2: direction:" in message and "'denoising' or 'noising'" in message and "'sideways'" in message


def test_nested_probe_error_points_at_the_probe_line(tmp_path):
    path = write(tmp_path, VALID.replace('      wrong: " Madrid"\n', '      wrong: " Madrid"\n      answr: x\n'))
    with pytest.raises(ClapError,
                       match=rf"{path}:11: probes.inline.0.answr: unknown field 'answr'; did you mean 'answer'"):
        StudySpec.from_yaml(path)


def test_missing_required_field_and_invalid_yaml(tmp_path):
    path = write(tmp_path, VALID.replace("sites: [\"layers[*].resid_pre\"]\n", ""))
    with pytest.raises(ClapError, match=r"spec.yaml:1: \(top level\): name the sites to patch"):
        StudySpec.from_yaml(path)
    broken = write(tmp_path, "model: [unclosed\n", "broken.yaml")
    with pytest.raises(ClapError, match=r"broken.yaml:2: not valid YAML"):
        StudySpec.from_yaml(broken)
    with pytest.raises(ClapError, match="file not found"):
        StudySpec.from_yaml(tmp_path / "absent.yaml")


def test_operation_and_position_validation(tmp_path):
    with pytest.raises(ClapError, match=r"operations.0: .*`noise` needs a positive `scale`"):
        StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["embed"],
                             "operations": ["noise"]})
    with pytest.raises(ClapError, match=r"positions.0"):
        StudySpec.from_dict({"model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["embed"],
                             "positions": ["firts"]})
    with pytest.raises(ClapError, match=r"probes: .*exactly one of `file`"):
        StudySpec.from_dict({"model": {"source": "m"}, "probes": {}, "sites": ["embed"]})


@pytest.mark.parametrize(
    "address, expected",
    [
        ("layers[1].mlpp", r"unknown site 'layers\[1\].mlpp'.*components: .*mlp_out"),
        ("layers[7].attn_out", r"layer 7 is out of range .* 3 layers \(0..2\)"),
        ("layers[0].heads[9]", r"head 9 is out of range .* 4 heads"),
        ("transformer.h.0.mlp.c_fcc", r"closest valid names: transformer.h.0.mlp.c_fc"),
        ("transformer.h.*.attn.c_prog", r"unknown site .*closest valid names: .*c_proj"),
        ("layers[0].heads", r"name the heads"),
    ],
)
def test_unknown_sites_list_the_closest_valid_names(tiny_gpt2, address, expected):
    with pytest.raises(ClapError, match=expected):
        SiteResolver(tiny_gpt2.hf).resolve([address])


def test_wildcards_and_ranges_expand_to_concrete_sites_in_execution_order(tiny_gpt2, tiny_llama):
    resolver = SiteResolver(tiny_gpt2.hf)
    names = [s.name for s in resolver.resolve(["transformer.h.*.attn.c_proj", "layers[0:2].mlp", "unembed"])]
    assert names == ["transformer.h.0.attn.c_proj", "layers.0.mlp_out", "transformer.h.1.attn.c_proj",
                     "layers.1.mlp_out", "transformer.h.2.attn.c_proj", "unembed"]
    heads = SiteResolver(tiny_llama.hf).resolve(["layers[1].heads[0:4]"])
    assert [(s.module, s.access, s.head) for s in heads] == [
        ("model.layers.1.self_attn.o_proj", "input", h) for h in range(4)]
    raw = SiteResolver(tiny_gpt2.hf).resolve(["transformer.h[1:3].mlp.c_fc:input"])
    assert [(s.name, s.access) for s in raw] == [("transformer.h.1.mlp.c_fc:input", "input"),
                                                 ("transformer.h.2.mlp.c_fc:input", "input")]


def _study(loaded, **overrides):
    data = {"model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[0].resid_pre"],
            "execution": {"progress": False}}
    data.update(overrides)
    return Study(StudySpec.from_dict(data), model=loaded)


def test_probe_problems_name_the_probe(tiny_gpt2, tmp_path):
    multi = [dict(PROBES[0], answer=" Parisians")]
    n_answer = len(tiny_gpt2.tokenizer(" Parisians", add_special_tokens=False)["input_ids"])
    assert n_answer > 1
    with pytest.raises(ClapError, match=rf"probes.inline\[0\]: answer ' Parisians' is {n_answer} tokens .*multi_token"):
        _study(tiny_gpt2, probes={"inline": multi}).run()
    no_wrong = [{k: v for k, v in PROBES[0].items() if k != "wrong"}]
    with pytest.raises(ClapError, match=r"logit_diff needs a `wrong` answer .*fr"):
        _study(tiny_gpt2, probes={"inline": no_wrong}).run()
    with pytest.raises(ClapError, match=r"substring 'Lisbon' not found in its clean prompt"):
        _study(tiny_gpt2, positions=[{"match": "Lisbon"}]).run()
    with pytest.raises(ClapError, match=r"position 40 is outside its"):
        _study(tiny_gpt2, positions=[40]).run()
    dup = [PROBES[0], PROBES[0]]
    with pytest.raises(ClapError, match="duplicate probe id 'fr'"):
        _study(tiny_gpt2, probes={"inline": dup}).run()
    bad_file = tmp_path / "probes.jsonl"
    bad_file.write_text(json.dumps(PROBES[0]) + "\n{not json\n")
    with pytest.raises(ClapError, match=rf"{bad_file}:2: not valid JSON"):
        _study(tiny_gpt2, probes={"file": str(bad_file)}).run()
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text(json.dumps({"id": "x", "clean": "a b", "answer": " c"}) + "\n")
    with pytest.raises(ClapError, match=rf"{missing_field}:1: probe x has no `corrupted` prompt; only a causal trace"):
        _study(tiny_gpt2, probes={"file": str(missing_field)}).run()


def test_length_mismatch_is_refused_naming_the_pair(tiny_gpt2):
    insulin = {"id": "insulin", "clean": "Valproate sodium treats", "corrupted": "Insulin treats",
               "answer": " seizures", "wrong": " pain", "labels": {"knowledge_type": "associative"}}
    n_clean, n_corrupted = (len(tiny_gpt2.tokenizer(insulin[k])["input_ids"]) for k in ("clean", "corrupted"))
    assert n_clean != n_corrupted
    uneven = PROBES + [insulin]
    with pytest.raises(ClapError, match=rf"(?s)insulin \(probes.inline\[3\]\): clean {n_clean} tokens, corrupted "
                                        rf"{n_corrupted}.*alignment: right"):
        _study(tiny_gpt2, probes={"inline": uneven}).run()


def test_model_sources_fail_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClapError,
                       match=r"'gpt2-xl-not-cached' are not in the local Hugging Face cache .*local directory"):
        load_model("gpt2-xl-not-cached")
    with pytest.raises(ClapError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ClapError, match="holds no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ClapError, match="GGUF file not found"):
        load_model(str(tmp_path / "weights.gguf"))


def test_remote_without_key_or_service_fails_fast_without_printing_the_key(tiny_gpt2, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None, raising=False)
    with pytest.raises(ClapError, match="needs an NDIF API key"):
        _study(tiny_gpt2, model={"source": "openai-community/gpt2"}, execution={"remote": True}).run()
    secret = "ndif-secret-key-123"
    monkeypatch.setenv("NDIF_API_KEY", secret)
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9", raising=False)
    with pytest.raises(ClapError) as info:
        _study(tiny_gpt2, model={"source": "openai-community/gpt2"}, execution={"remote": True}).run()
    assert "cannot be reached" in str(info.value) and secret not in str(info.value)


def test_cli_prints_one_clear_line_and_exit_code_2(tmp_path, capsys):
    path = write(tmp_path, VALID.replace("positions: [last]", "positons: [last]"))
    assert main(["patch", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clap: error: invalid study spec") and "Traceback" not in err
