"""Pure-PyTorch Tandem drafter: the trainer's model and the oracle for the vLLM path.

A small Llama (RMSNorm, RoPE, GQA attention, SwiGLU) whose parameter names match Hugging Face's
``LlamaForCausalLM``, plus one linear map per layer, ``model.layers.j.ctx_proj`` = P_j: Dt -> D.

Layer j's attention has ONE set of keys/values, built with the layer's own norm/K/V/RoPE from
  * y_hat_j = P_j x^(l(j)) for positions the target has already processed ("context"), and
  * the drafter's own residual stream for positions of the current block ("own").
Block-causal rule, query i in block b = i // gamma: context keys < b*gamma, own keys b*gamma..i.

Two forms compute the same function:
  * ``forward_train``: keys = [context K/V over 0..T-1 ; own K/V over 0..T-1], one attention of
    length 2T under ``block_causal_mask`` (the paper's efficient training layout);
  * ``DrafterCache`` + ``extend_context`` / ``step``: the incremental decoding form, where context
    K/V are cached once per target pass and own K/V live only for the current block.
With every position in one block (no context) the drafter is exactly a Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem_vllm.config import WEIGHTS_FILE, TandemConfig
from tandem_vllm.errors import TandemError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for the given positions: (B, T) -> (B, 1, T, hd) each (HF Llama convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(T, 2T) bool, True = may attend. Columns 0..T-1 are context keys, T..2T-1 own keys."""
    i = torch.arange(seq_len, device=device)
    return mask_from_block_starts((i // block_size) * block_size)


def mask_from_block_starts(starts: Tensor) -> Tensor:
    """starts (..., T): first position of each query's block -> (..., T, 2T) block-causal mask."""
    t = starts.shape[-1]
    i = torch.arange(t, device=starts.device)[:, None]
    j = torch.arange(t, device=starts.device)[None, :]
    s = starts[..., :, None]
    return torch.cat([(j < s).expand(*starts.shape, t), (j >= s) & (j <= i)], dim=-1)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
    """SDPA with a boolean mask, or flex attention with a BlockMask (skips fully masked tiles)."""
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex attention in eager mode" notice: expected on CPU
        return _flex_attention()(q, k, v, block_mask=mask)


@lru_cache(maxsize=1)
def _flex_attention() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # compiled, flex attention is a fused kernel on GPUs; eager (CPU) it is a slow reference
    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


def random_block_starts(batch: int, seq_len: int, lo: int, hi: int, gen: torch.Generator) -> Tensor:
    """(B, T) block start of every position, each block's length drawn uniformly from lo..hi.

    Speculative decoding's blocks are variable (a block ends wherever the target rejects a draft),
    and a drafter serving k drafts runs block positions 0..k-1; training on such blocks covers them.
    """
    lens = torch.randint(lo, hi + 1, (batch, seq_len), generator=gen)  # T blocks always cover T positions
    ends = lens.cumsum(1)  # (B, T) exclusive end of block n
    pos = torch.arange(seq_len).expand(batch, seq_len).contiguous()
    block = torch.searchsorted(ends, pos, right=True)  # (B, T) block index of each position
    return (ends - lens).gather(1, block)


def flex_block_causal_mask(
    seq_len: int, block_size: int, device: torch.device | str, *, starts: Tensor | None = None
) -> Any:
    """``block_causal_mask`` (or ``mask_from_block_starts(starts)``, starts (B, T)) as a
    flex-attention BlockMask over the same (T, 2T) key layout."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        start = (i // block_size) * block_size if starts is None else starts[b, i]
        return ((j < seq_len) & (j < start)) | ((j >= seq_len) & (j - seq_len >= start) & (j - seq_len <= i))

    batch = None if starts is None else starts.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager-mode notice on CPU
        return create_block_mask(mask_mod, batch, None, seq_len, 2 * seq_len, device=str(device))


AttnBackend = Literal["sdpa", "flex"]


class Attention(nn.Module):
    def __init__(self, cfg: TandemConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, self.hd)).transpose(1, 2)  # (B, T, n*hd) -> (B, n, T, hd)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (roped) and values of normed states x (B, T, D) -> (B, Hk, T, hd) each."""
        k = _apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)
        return k, self._heads(self.v_proj(x), self.n_kv)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, prefix_k: Tensor, prefix_v: Tensor, mask: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B,T,D) normed; prefix_k/v (B,Hk,P,hd) precede this call's keys; mask (B|1,1,T,P+T)
        bool or a flex BlockMask.

        Returns the attention output (B,T,D) and this call's own keys/values for caching.
        """
        q = _apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)
        k, v = self.kv(x, cos, sin)
        keys = torch.cat([prefix_k, k], dim=2).repeat_interleave(self.n_heads // self.n_kv, dim=1)
        values = torch.cat([prefix_v, v], dim=2).repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = _attend(q, keys, values, mask)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).flatten(2)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: TandemConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: TandemConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.ctx_proj = nn.Linear(cfg.target.hidden_size, cfg.hidden_size, bias=False)  # P_j

    def context_kv(self, target_state: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Target states (B,T,Dt) -> context keys/values (B,Hk,T,hd): P_j, then this layer's norm/K/V/RoPE."""
        return self.self_attn.kv(self.input_layernorm(self.ctx_proj(target_state)), cos, sin)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, prefix_k: Tensor, prefix_v: Tensor, mask: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, prefix_k, prefix_v, mask)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class _Backbone(nn.Module):
    def __init__(self, cfg: TandemConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DrafterLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class DrafterCache:
    """Incremental state for a batch. Context K/V grow by target pass; own K/V live for one block."""

    ctx_k: list[Tensor]  # per layer (B, Hk, S, hd)
    ctx_v: list[Tensor]
    ctx_valid: Tensor  # (B, S) bool: False for padding and never-accepted columns
    own_k: list[Tensor]  # per layer (B, Hk, n, hd), the current block so far
    own_v: list[Tensor]


class TandemDrafter(nn.Module):
    def __init__(self, cfg: TandemConfig, *, attn_backend: AttnBackend = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend  # training form only; decoding always uses SDPA
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.lm_head_rows, bias=False)
        if cfg.draft_vocab_size is not None:  # target ids of the head's rows (persistent: saved with the weights)
            self.register_buffer("draft_token_ids", torch.arange(cfg.draft_vocab_size))
        if cfg.shared_target_weights:  # bound from the target by bind_target(); frozen and never saved
            self.model.embed_tokens.requires_grad_(False)
            self.lm_head.requires_grad_(False)
        elif cfg.tie_word_embeddings and cfg.draft_vocab_size is None:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._bound = not cfg.shared_target_weights

    def shared_keys(self) -> set[str]:
        """State-dict keys that come from the target rather than the checkpoint."""
        return {"model.embed_tokens.weight", "lm_head.weight"} if self.cfg.shared_target_weights else set()

    def bind_target(self, target: Any) -> TandemDrafter:
        """Take the embedding and LM head (restricted to the draft vocabulary) from an HF causal LM target:
        a drafter with ``shared_target_weights`` has no other copy of them."""
        if not self.cfg.shared_target_weights:
            return self
        embed = target.get_input_embeddings().weight.detach()
        head = target.get_output_embeddings().weight.detach()
        if tuple(embed.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
            raise TandemError(f"the target's embedding is {tuple(embed.shape)}; this drafter shares a "
                              f"({self.cfg.vocab_size}, {self.cfg.hidden_size}) one")
        ids = self.draft_ids().to(head.device)
        dtype, device = self.model.norm.weight.dtype, self.model.norm.weight.device
        self.model.embed_tokens.weight = nn.Parameter(embed.to(device, dtype), requires_grad=False)
        self.lm_head.weight = nn.Parameter(head[ids].to(device, dtype).contiguous(), requires_grad=False)
        self._bound = True
        return self

    def draft_ids(self) -> Tensor:
        """(N,) the target token id of each LM-head row."""
        ids = self.get_buffer("draft_token_ids") if self.cfg.draft_vocab_size is not None else None
        return ids if ids is not None else torch.arange(self.cfg.vocab_size, device=self.model.norm.weight.device)

    def target_to_draft(self) -> Tensor | None:
        """(V,) each target token's head row, -1 where the drafter cannot propose it; None = identity."""
        if self.cfg.draft_vocab_size is None:
            return None
        ids = self.draft_ids()
        t2d = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long, device=ids.device)
        return t2d.index_copy(0, ids, torch.arange(len(ids), device=ids.device))

    def to_target_vocab(self, logits: Tensor) -> Tensor:
        """(..., N) head logits -> (..., V) over the target's vocabulary, -inf where the drafter has no row."""
        if self.cfg.draft_vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return full.index_copy(-1, self.draft_ids(), logits)

    def _check_bound(self) -> None:
        if not self._bound:  # random embedding/head weights would not crash, only draft garbage
            raise TandemError("this drafter shares the target's embedding and LM head: call bind_target(target) "
                              "(or load it with load_tandem_for) before using it")

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def _layers(self) -> list[DrafterLayer]:
        return list(self.model.layers)  # type: ignore[arg-type]  # a ModuleList of DrafterLayer

    def forward_train(
        self, tokens: Tensor, taps: Tensor, block_size: int | None = None, *, block_starts: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced logits under the block-causal rule.

        tokens (B, T); taps (B, T, Ls, Dt): taps[:, i, j] = target state x^(l(j)) at position i.
        Blocks are fixed (``block_size``, default the trained gamma) unless ``block_starts`` (B, T)
        gives each position's block start, as speculative decoding's variable blocks do.
        Returns head logits (B, T, N) -- N = V unless the drafter has a draft vocabulary
        (``to_target_vocab`` maps them); position i predicts token i+1.
        """
        self._check_bound()
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.model.embed_tokens(tokens)  # (B, T, D)
        cos, sin = self._rope(positions, h.dtype)
        mask: Any
        if self.attn_backend == "flex":
            mask = flex_block_causal_mask(t, block_size or self.cfg.block_size, tokens.device, starts=block_starts)
        elif block_starts is None:
            mask = block_causal_mask(t, block_size or self.cfg.block_size, tokens.device)[None, None]  # (1,1,T,2T)
        else:
            mask = mask_from_block_starts(block_starts)[:, None]  # (B,1,T,2T)
        for j, layer in enumerate(self._layers()):
            ctx_k, ctx_v = layer.context_kv(taps[:, :, j].to(h.dtype), cos, sin)  # (B, Hk, T, hd)
            h, _, _ = layer(h, cos, sin, ctx_k, ctx_v, mask)
        return self.lm_head(self.model.norm(h))

    # ---- incremental decoding form -----------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> DrafterCache:
        n = self.cfg.num_hidden_layers
        empty = torch.zeros(batch, self.cfg.num_key_value_heads, 0, self.cfg.head_dim, device=device, dtype=dtype)
        return DrafterCache(
            ctx_k=[empty] * n,
            ctx_v=[empty] * n,
            ctx_valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            own_k=[empty] * n,
            own_v=[empty] * n,
        )

    def extend_context(self, cache: DrafterCache, taps: Tensor, positions: Tensor, valid: Tensor) -> None:
        """The target has processed these tokens: cache their context K/V and end the current block.

        taps (B, n, Ls, Dt) target states; positions (B, n) sequence positions; valid (B, n) bool.
        """
        dtype = cache.ctx_k[0].dtype
        cos, sin = self._rope(positions, dtype)
        for j, layer in enumerate(self._layers()):
            k, v = layer.context_kv(taps[:, :, j].to(dtype), cos, sin)
            cache.ctx_k[j] = torch.cat([cache.ctx_k[j], k], dim=2)
            cache.ctx_v[j] = torch.cat([cache.ctx_v[j], v], dim=2)
            cache.own_k[j] = cache.own_k[j][:, :, :0]
            cache.own_v[j] = cache.own_v[j][:, :, :0]
        cache.ctx_valid = torch.cat([cache.ctx_valid, valid], dim=1)

    def step(self, cache: DrafterCache, tokens: Tensor, positions: Tensor) -> Tensor:
        """Run n own tokens (B, n) of the current block at positions (B, n); returns logits (B, n, V)."""
        self._check_bound()
        b, n = tokens.shape
        h = self.model.embed_tokens(tokens)
        cos, sin = self._rope(positions, h.dtype)
        past = cache.own_k[0].shape[2]
        causal = torch.ones(n, past + n, dtype=torch.bool, device=tokens.device).tril(past)  # (n, past+n)
        mask = torch.cat([cache.ctx_valid[:, None, :].expand(b, n, -1), causal.expand(b, n, -1)], dim=2)
        for j, layer in enumerate(self._layers()):
            prefix_k = torch.cat([cache.ctx_k[j], cache.own_k[j]], dim=2)
            prefix_v = torch.cat([cache.ctx_v[j], cache.own_v[j]], dim=2)
            h, k, v = layer(h, cos, sin, prefix_k, prefix_v, mask[:, None])
            cache.own_k[j] = torch.cat([cache.own_k[j], k], dim=2)
            cache.own_v[j] = torch.cat([cache.own_v[j], v], dim=2)
        return self.to_target_vocab(self.lm_head(self.model.norm(h)))

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.cfg.save(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in self.shared_keys()}
        if self.cfg.tie_word_embeddings and self.cfg.draft_vocab_size is None:
            state.pop("lm_head.weight", None)
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path, *, device: torch.device | str = "cpu") -> TandemDrafter:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = TandemConfig.load(directory)
        model = cls(cfg)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise TandemError(f"{directory} has no {WEIGHTS_FILE}; the drafter export is incomplete, re-export it")
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise TandemError(f"{path} is not a readable safetensors file ({e}); re-export the drafter") from None
        tied = cfg.tie_word_embeddings and cfg.draft_vocab_size is None
        want = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")} - model.shared_keys()
        missing, unexpected = want - state.keys(), state.keys() - want
        if missing or unexpected:
            raise TandemError(
                f"{path} does not match its config.json: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}; re-export the drafter"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes disagree with config.json
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:200])
            raise TandemError(f"{path} does not match its config.json ({first}); re-export the drafter") from None
        return model.to(device)
