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


@pytest.fixture(scope="session")
def target():
    return tiny_llama()


@pytest.fixture(scope="session")
def qwen_target():
    return tiny_llama(qwen=True, seed=3)


@pytest.fixture(scope="session")
def draft_lm():
    return tiny_llama(layers=1, hidden=32, seed=2)
