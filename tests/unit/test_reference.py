import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem_vllm.modeling.reference import (
    TandemDrafter,
    _apply_rope,
    block_causal_mask,
    random_block_starts,
    rope_cos_sin,
)
from tandem_vllm.modeling.target import hidden_taps

from ..conftest import tiny_tandem


def _taps(target, drafter, tokens):
    out = target(tokens, output_hidden_states=True)
    return hidden_taps(out.hidden_states, drafter.cfg.tap_layers)


def _brute_force(drafter: TandemDrafter, tokens, taps, block):
    """Per position, per layer: explicit softmax over [context keys < block start ; own keys start..i]."""
    cfg = drafter.cfg
    b, t = tokens.shape
    pos = torch.arange(t).expand(b, t)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float64)
    h = drafter.model.embed_tokens(tokens)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for j, layer in enumerate(drafter.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _apply_rope(attn._heads(attn.q_proj(x), attn.n_heads), cos, sin)
        k_own, v_own = attn.kv(x, cos, sin)
        k_ctx, v_ctx = layer.context_kv(taps[:, :, j], cos, sin)
        out = torch.zeros_like(q)
        for i in range(t):
            start = (i // block) * block
            keys = torch.cat([k_ctx[:, :, :start], k_own[:, :, start : i + 1]], 2).repeat_interleave(rep, 1)
            vals = torch.cat([v_ctx[:, :, :start], v_own[:, :, start : i + 1]], 2).repeat_interleave(rep, 1)
            w = torch.softmax(q[:, :, i : i + 1] @ keys.transpose(-1, -2) / math.sqrt(cfg.head_dim), -1)
            out[:, :, i : i + 1] = w @ vals
        h = h + attn.o_proj(out.transpose(1, 2).flatten(2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return drafter.lm_head(drafter.model.norm(h))


def test_block_causal_mask_shape_and_rule():
    m = block_causal_mask(6, 3)
    assert m.shape == (6, 12)
    # query 4 is in block 1 (positions 3..5): context 0..2, own 3..4
    assert m[4].tolist() == [True, True, True, False, False, False] + [False, False, False, True, True, False]
    assert m[0].tolist() == [False] * 6 + [True] + [False] * 5


@pytest.mark.parametrize("block", [1, 2, 3])
def test_training_form_matches_brute_force_per_position(target, block):
    drafter = tiny_tandem(target, block_size=block)
    tokens = torch.randint(0, 97, (2, 10))
    taps = _taps(target, drafter, tokens)
    got = drafter.forward_train(tokens, taps)
    want = _brute_force(drafter, tokens, taps, block)
    torch.testing.assert_close(got, want)


def test_output_ignores_own_states_of_earlier_blocks_and_future_context(target):
    drafter = tiny_tandem(target, block_size=3)
    tokens = torch.randint(0, 97, (1, 12))
    taps = _taps(target, drafter, tokens)
    base = drafter.forward_train(tokens, taps)
    # own states of blocks 0 and 1 come only from tokens 0..5: change them, keep the target's taps
    changed = tokens.clone()
    changed[:, :6] = torch.randint(0, 97, (1, 6))
    out = drafter.forward_train(changed, taps)
    torch.testing.assert_close(out[:, 6:], base[:, 6:])
    assert not torch.allclose(out[:, :6], base[:, :6])
    # context of the current or later blocks must not leak into a position
    taps2 = taps.clone()
    taps2[:, 6:] += 1.0
    out2 = drafter.forward_train(tokens, taps2)
    torch.testing.assert_close(out2[:, :9], base[:, :9])
    assert not torch.allclose(out2[:, 9:], base[:, 9:])


def test_one_block_without_context_is_exactly_a_llama(target):
    drafter = tiny_tandem(target)
    c = drafter.cfg
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        )
    ).double().eval()
    state = {k: v for k, v in drafter.state_dict().items() if "ctx_proj" not in k}
    llama.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 97, (2, 9))
    taps = _taps(target, drafter, tokens)
    torch.testing.assert_close(drafter.forward_train(tokens, taps, block_size=9), llama(tokens).logits)


@pytest.mark.parametrize("block", [1, 2, 4])
def test_incremental_form_equals_full_sequence_form(qwen_target, block):
    drafter = tiny_tandem(qwen_target, block_size=block, layers=3)
    tokens = torch.randint(0, 97, (2, 11))
    taps = _taps(qwen_target, drafter, tokens)
    want = drafter.forward_train(tokens, taps)
    cache = drafter.new_cache(2, "cpu", torch.float64)
    got = []
    for start in range(0, 11, block):
        for i in range(start, min(start + block, 11)):
            pos = torch.full((2, 1), i)
            got.append(drafter.step(cache, tokens[:, i : i + 1], pos))
        end = min(start + block, 11)
        positions = torch.arange(start, end).expand(2, -1)
        drafter.extend_context(cache, taps[:, start:end], positions, torch.ones(2, end - start, dtype=torch.bool))
    torch.testing.assert_close(torch.cat(got, 1), want)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", ["fixed", "variable"])
def test_flex_attention_training_form_agrees_with_sdpa(target, device, blocks, monkeypatch):
    """Flex runs forward-only on CPU (no CPU backward); on a GPU the gradients are compared too."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cuda":  # compiled flex computes float32 products in TF32 unless told otherwise; the
        # comparison is of masks and layouts, so both sides run in full float32
        monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
        torch._dynamo.reset()
    drafter = tiny_tandem(target, block_size=2, hidden=64).float().to(device)  # head size 16: flex's CUDA minimum
    tokens = torch.randint(0, 97, (2, 32))
    taps = _taps(target, drafter, tokens).float().to(device)
    tokens = tokens.to(device)
    starts = random_block_starts(2, 32, 1, 4, torch.Generator().manual_seed(7)).to(device) if blocks == "variable" else None
    outs = {}
    for backend in ("sdpa", "flex"):
        drafter.attn_backend = backend
        drafter.zero_grad()
        with torch.set_grad_enabled(device == "cuda"):
            logits = drafter.forward_train(tokens, taps, block_starts=starts)
        grads = []
        if device == "cuda":
            logits.square().mean().backward()
            grads = [p.grad.clone() for p in drafter.parameters()]
        outs[backend] = (logits.detach(), grads)
    torch.testing.assert_close(outs["flex"][0], outs["sdpa"][0], atol=1e-4, rtol=1e-4)
    for g_flex, g_sdpa in zip(outs["flex"][1], outs["sdpa"][1]):
        torch.testing.assert_close(g_flex, g_sdpa, atol=1e-4, rtol=1e-4)


def test_random_block_starts_draw_every_length_in_range():
    gen = torch.Generator().manual_seed(0)
    starts = random_block_starts(64, 40, 1, 4, gen)
    i = torch.arange(40)
    assert (starts[:, 0] == 0).all() and (starts <= i).all()
    # a block is a run of equal starts beginning at its own position; its length lies in 1..4
    lengths = []
    for row in starts.tolist():
        blocks = sorted(set(row))
        assert all(row[b] == b for b in blocks)
        lengths += [b2 - b1 for b1, b2 in zip(blocks, blocks[1:])]
    assert set(lengths) == {1, 2, 3, 4}
    assert torch.equal(random_block_starts(64, 40, 1, 4, torch.Generator().manual_seed(0)), starts)
    fixed = random_block_starts(2, 9, 3, 3, gen)
    assert torch.equal(fixed, (i[:9] // 3 * 3).expand(2, 9))


def test_training_form_with_variable_blocks_equals_the_cached_form(qwen_target):
    """Speculative decoding's blocks vary (each ends where a draft is rejected): the training form
    with per-row block starts computes what the decoding cache computes block by block."""
    drafter = tiny_tandem(qwen_target, layers=3)
    tokens = torch.randint(0, 97, (2, 13))
    taps = _taps(qwen_target, drafter, tokens)
    starts = random_block_starts(2, 13, 1, 4, torch.Generator().manual_seed(3))
    assert not torch.equal(starts[0], starts[1])  # rows differ: a per-row mask is exercised
    want = drafter.forward_train(tokens, taps, block_starts=starts)
    for row in range(2):
        cache = drafter.new_cache(1, "cpu", torch.float64)
        bounds = sorted(set(starts[row].tolist())) + [13]
        got = []
        for a, b in zip(bounds, bounds[1:]):
            for i in range(a, b):
                got.append(drafter.step(cache, tokens[row : row + 1, i : i + 1], torch.full((1, 1), i)))
            drafter.extend_context(cache, taps[row : row + 1, a:b], torch.arange(a, b)[None], torch.ones(1, b - a, dtype=torch.bool))
        torch.testing.assert_close(torch.cat(got, 1), want[row : row + 1])

