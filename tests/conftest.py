"""Tiny random models (CPU, float64) shared by the unit tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tandem_vllm.config import TandemConfig, TargetIdentity, uniform_taps
from tandem_vllm.modeling.reference import TandemDrafter

VOCAB = 97


def tiny_llama(*, vocab: int = VOCAB, layers: int = 3, hidden: int = 64, seed: int = 0, qwen: bool = False):
    torch.manual_seed(seed)
    cls, ccls = (Qwen2ForCausalLM, Qwen2Config) if qwen else (LlamaForCausalLM, LlamaConfig)
    cfg = ccls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return cls(cfg).double().eval()


def tandem_config_for(target, *, layers: int = 2, hidden: int = 32, block_size: int = 2, taps=None) -> TandemConfig:
    t = target.config
    return TandemConfig(
        vocab_size=t.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        tap_layers=taps or uniform_taps(layers, t.num_hidden_layers),
        block_size=block_size,
        target=TargetIdentity(
            name_or_path="tiny",
            architectures=tuple(t.architectures or ("LlamaForCausalLM",)),
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            vocab_size=t.vocab_size,
            tokenizer_fingerprint="test",
        ),
    )


def tiny_tandem(target, *, seed: int = 1, **kw) -> TandemDrafter:
    torch.manual_seed(seed)
    return TandemDrafter(tandem_config_for(target, **kw)).double().eval()


def build_train_workdir(root):
    """A tokenizer trained on 40 stdlib files, 60 kB of their text (data.txt) and a tiny random
    Llama target saved with it (target/): what the trainer tests train drafters against."""
    from tandem_vllm.demo.corpus import read_sources, stdlib_files, train_tokenizer

    texts = list(read_sources(stdlib_files()[:40]))
    tok = train_tokenizer(texts, 320, root / "tok")
    (root / "data.txt").write_text("\n".join(texts)[:60_000])
    torch.manual_seed(0)
    target = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    )
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    return root


@pytest.fixture(scope="session")
def train_workdir(tmp_path_factory):
    return build_train_workdir(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def target():
    return tiny_llama()


@pytest.fixture(scope="session")
def qwen_target():
    return tiny_llama(qwen=True, seed=3)


@pytest.fixture(scope="session")
def draft_lm():
    return tiny_llama(layers=1, hidden=32, seed=2)


def pytest_sessionfinish(session, exitstatus):
    """The compatibility matrix rows this session ran -> results/compat/matrix.{json,md} (the table in docs/serving.md)."""
    from tests.integration import compat

    compat.write()
