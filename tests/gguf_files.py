"""Tiny GGUF files written from a Hugging Face Llama the way llama.cpp's converter lays them out (Q/K rows
permuted for its RoPE, tensor names, gpt2-style tokenizer metadata), for the import tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _permute(x: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    n = n_kv if n_kv != n_head else n_head
    return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_gguf(model: Any, tok: Any, path: Path, *, arch: str = "llama", qtype: Any = None, raw_types: Any = None) -> Path:
    """``model`` (HF LlamaForCausalLM) and ``tok`` (its fast tokenizer) as a GGUF file. ``qtype``: quantize
    every matrix to this GGML type; ``raw_types``: {gguf tensor name: numpy dtype} stored as is."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_chat_template(tok.chat_template)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        v = value.detach().float().numpy()
        if key in HF_TO_GGUF:
            name = HF_TO_GGUF[key]
        else:
            parts = key.split(".")
            sub = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{LAYER_TO_GGUF[sub]}.weight"
            if sub == "self_attn.q_proj":
                v = _permute(v, cfg.num_attention_heads, cfg.num_attention_heads)
            elif sub == "self_attn.k_proj":
                v = _permute(v, cfg.num_attention_heads, cfg.num_key_value_heads)
        if raw_types and name in raw_types:
            w.add_tensor(name, v.astype(raw_types[name]))
        elif qtype is not None and v.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(v, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
