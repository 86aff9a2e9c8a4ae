import json

import pytest

from tandem_vllm.config import TandemConfig, parse_taps, span_taps, top_taps, uniform_taps
from tandem_vllm.errors import TandemError

from ..conftest import tandem_config_for, tiny_llama


@pytest.fixture(scope="module")
def cfg():
    return tandem_config_for(tiny_llama(), layers=2)


def test_config_json_round_trip(cfg, tmp_path):
    cfg.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["architectures"] == ["TandemDrafterForCausalLM"]
    assert raw["tandem_config"]["target"]["hidden_size"] == 64
    assert TandemConfig.load(tmp_path) == cfg


def test_hf_autoconfig_reads_a_drafter_config(cfg, tmp_path):
    from transformers import AutoConfig

    cfg.save(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.head_dim) == (32, 2, 8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(tandem_format_version=99), "tandem_format_version=99"),
        (lambda r: r.update(architectures=["LlamaForCausalLM"]), "not a Tandem drafter"),
        (lambda r: r["tandem_config"].update(tap_layers=[0, 9]), r"tap_layers \[9\] out of range 0..3"),
        (lambda r: r["tandem_config"].update(tap_layers=[0]), "one per drafter layer"),
        (lambda r: r["tandem_config"].update(block_size=0), "block_size"),
        (lambda r: r.update(vocab_size=50), "differs from the target"),
        (lambda r: r.pop("tandem_config"), "missing or malformed field"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(cfg, tmp_path, edit, message):
    raw = cfg.to_hf_dict()
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TandemError, match=message):
        TandemConfig.load(tmp_path)


def test_missing_and_corrupt_directories(tmp_path):
    with pytest.raises(TandemError, match="does not exist"):
        TandemConfig.load(tmp_path / "nope")
    with pytest.raises(TandemError, match="has no config.json"):
        TandemConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TandemError, match="not valid JSON"):
        TandemConfig.load(tmp_path)


def test_tap_maps():
    assert uniform_taps(3, 12) == (0, 4, 8)
    assert top_taps(2, 12) == (11, 12)
    assert span_taps(3, 12) == (0, 6, 12) and span_taps(1, 12) == (12,)
    assert parse_taps("2,5", 2, 12) == (2, 5)
    with pytest.raises(TandemError, match="names 1 layers"):
        parse_taps("3", 2, 12)
    with pytest.raises(TandemError, match="expected span, uniform, top"):
        parse_taps("deep", 2, 12)
