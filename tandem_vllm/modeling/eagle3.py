"""An EAGLE-3 draft head in pure PyTorch, trained by tandem-vllm's trainer and served by vLLM's own
``eagle3`` method -- the drafter vLLM users pick today, as a peer for Tandem on the same data and budget.

EAGLE-3 (Li et al., 2025) reads the target's residual stream at three taps (low, middle, high) of the
*last verified* position, normalises each (``fc_norm``: a small model's residual stream has norms in
the hundreds, which stalls learning through a plain linear map), fuses them with ``fc`` and runs ONE
decoder layer whose attention input is
[norm(embedding of the next token) ; norm(fused state)] (width 2D). Its output (before the final norm)
is fed back as the next draft step's state, so drafting needs no target pass. The layout and weight
names are vLLM's ``llama_eagle3.py`` (``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``embed_tokens``).

Cache entry convention (vLLM's): the entry at position i carries token i+1 and state i, and predicts
token i+2. Step 0 uses the target's fused taps at i; draft step s >= 1 uses the previous step's output
at the same anchor i, token i+s+1, RoPE position i+s, and attends to step-0 entries at positions <= i
plus its own earlier steps at anchor i -- the "training-time test" (TTT) mask ``forward_train`` uses, so
training sees its own states exactly as decoding will.

Shapes: B batch, T tokens, D head width, Dt target width, S TTT steps, V vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tandem_vllm.config import WEIGHTS_FILE, TargetIdentity, read_config_json
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.reference import MLP, RMSNorm, _apply_rope, rope_cos_sin

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_taps(num_target_layers: int) -> tuple[int, int, int]:
    """Low, middle, high: the inputs of target layers 1, L/2 and L-1 (vLLM's aux-state convention:
    id l = the residual stream entering layer l). EAGLE-3's own default for deep targets is
    (2, L/2, L-3); a 4-layer target has no room for it."""
    return (min(1, num_target_layers - 1), num_target_layers // 2, num_target_layers - 1)


@dataclass(frozen=True)
class Eagle3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    target_hidden_size: int
    tap_layers: tuple[int, ...]  # three of them
    target: TargetIdentity
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    ttt_steps: int = 3  # draft steps unrolled in training
    draft_vocab_size: int | None = None  # rows of the LM head (target ids in the checkpoint's d2t); None = all
    shared_embedding: bool = False  # the target's embedding (frozen; vLLM shares it when the checkpoint has none)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise TandemError(f"EAGLE-3 hidden {self.hidden_size} is not a multiple of heads {self.num_attention_heads}")
        if len(self.tap_layers) != 3:
            raise TandemError(f"EAGLE-3 reads 3 target taps; got {self.tap_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict:
        """The checkpoint's config.json, as vLLM's eagle3 method reads it."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size or self.vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.tap_layers), "use_aux_hidden_state": True},
            "fc_norm": True,
            "tandem_eagle3": {k: v for k, v in asdict(self).items() if k in ("ttt_steps", "tap_layers", "shared_embedding")}
            | {"target": self.target.model_dump(mode="json")},
        }

    @classmethod
    def load(cls, directory: str | Path) -> Eagle3Config:
        raw = read_config_json(Path(directory))
        if ARCHITECTURE not in raw.get("architectures", []) or "tandem_eagle3" not in raw:
            raise TandemError(f"{directory} is not an EAGLE-3 head exported by tandem-vllm")
        extra = raw["tandem_eagle3"]
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_attention_heads=raw["num_attention_heads"], num_key_value_heads=raw["num_key_value_heads"],
            target_hidden_size=raw["target_hidden_size"], tap_layers=tuple(extra["tap_layers"]),
            target=TargetIdentity(**extra["target"]), rms_norm_eps=raw["rms_norm_eps"], rope_theta=raw["rope_theta"],
            max_position_embeddings=raw["max_position_embeddings"], ttt_steps=extra["ttt_steps"],
            draft_vocab_size=None if raw.get("draft_vocab_size", raw["vocab_size"]) == raw["vocab_size"] else raw["draft_vocab_size"],
            shared_embedding=bool(extra.get("shared_embedding", False)),
        )


class _Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.h, self.hk, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.hk * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.hk * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, 2D) -> roped q (B, H, T, hd), roped k and v (B, Hk, T, hd)."""
        def heads(t: Tensor, n: int) -> Tensor:
            return t.unflatten(-1, (n, self.hd)).transpose(1, 2)

        q = _apply_rope(heads(self.q_proj(x), self.h), cos, sin)
        k = _apply_rope(heads(self.k_proj(x), self.hk), cos, sin)
        return q, k, heads(self.v_proj(x), self.hk)


@dataclass(frozen=True)
class _MlpDims:
    """What ``reference.MLP`` reads of a config."""

    hidden_size: int
    intermediate_size: int


class _MidLayer(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(_MlpDims(cfg.hidden_size, cfg.intermediate_size))  # type: ignore[arg-type]


class Eagle3Head(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.fc_norm = nn.ModuleList([RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(3)])
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size or cfg.vocab_size, bias=False)
        if cfg.draft_vocab_size is not None:
            self.register_buffer("draft_token_ids", torch.arange(cfg.draft_vocab_size))
        if cfg.shared_embedding:
            self.embed_tokens.requires_grad_(False)
        self._bound = not cfg.shared_embedding

    def bind_target(self, target: nn.Module, *, init_head: bool = False) -> Eagle3Head:
        """The target's embedding (frozen, never saved: vLLM shares it); with ``init_head`` (the start of
        training) also its LM head's rows of the draft vocabulary as this head's frozen LM head (saved:
        vLLM loads the head)."""
        if not self.cfg.shared_embedding:
            return self
        embed = target.get_input_embeddings().weight.detach()  # type: ignore[operator]
        head = target.get_output_embeddings().weight.detach()  # type: ignore[operator]
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        self.embed_tokens.weight = nn.Parameter(embed.to(device, dtype), requires_grad=False)
        if init_head:
            rows = head[self.draft_ids().to(head.device)]
            self.lm_head.weight = nn.Parameter(rows.to(device, dtype).contiguous(), requires_grad=False)
        self._bound = True
        return self

    def draft_ids(self) -> Tensor:
        """(N,) the target token id of each LM-head row."""
        if self.cfg.draft_vocab_size is None:
            return torch.arange(self.cfg.vocab_size, device=self.norm.weight.device)
        return self.get_buffer("draft_token_ids")

    def to_target_vocab(self, logits: Tensor) -> Tensor:
        """(..., N) -> (..., V), -inf where the head has no row."""
        if self.cfg.draft_vocab_size is None:
            return logits
        return logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf")).index_copy(-1, self.draft_ids(), logits)

    def fuse(self, taps: Tensor) -> Tensor:
        """(..., 3, Dt) target states at the taps -> (..., D): per-tap RMSNorm, then fc."""
        return self.fc(torch.cat([norm(taps[..., j, :]) for j, norm in enumerate(self.fc_norm)], dim=-1))

    def forward_train(self, tokens: Tensor, taps: Tensor, steps: int | None = None) -> list[Tensor]:
        """Teacher-forced TTT: tokens (B, T), taps (B, T, 3, Dt) the target's states at the tap layers.

        Returns head logits per draft step s = 0..S-1, each (B, T, N): entry i of step s predicts token
        i + s + 2 (entries whose token i + s + 1 lies past the end see padding; mask their loss)."""
        b, t = tokens.shape
        steps = steps or self.cfg.ttt_steps
        layer, attn = self.midlayer, self.midlayer.self_attn
        state = self.fuse(taps)  # (B, T, D) step 0: the fused taps at i
        i = torch.arange(t, device=tokens.device)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        out = []
        for s in range(steps):
            nxt = F.pad(tokens[:, s + 1 :], (0, s + 1))  # (B, T) token i + s + 1 (0 past the end)
            x = torch.cat([layer.input_layernorm(self.embed_tokens(nxt)), layer.hidden_norm(state)], dim=-1)
            cos, sin = rope_cos_sin((i + s).expand(b, t), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
            q, k, v = attn.qkv(x, cos, sin)
            keys.append(k)
            values.append(v)
            # step 0 keys: causal (j <= i); steps 1..s: only the same anchor (j == i)
            causal = i[None, :] <= i[:, None]  # (T, T) key j visible to query i
            diag = i[None, :] == i[:, None]
            mask = torch.cat([causal] + [diag] * s, dim=1)  # (T, (s+1)T)
            rep = attn.h // attn.hk
            kk = torch.cat(keys, dim=2).repeat_interleave(rep, dim=1)
            vv = torch.cat(values, dim=2).repeat_interleave(rep, dim=1)
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # (B, H, T, hd)
            r = state + attn.o_proj(a.transpose(1, 2).flatten(2))
            state = r + layer.mlp(layer.post_attention_layernorm(r))  # pre-norm output: next step's state
            out.append(self.lm_head(self.norm(state)))
        return out

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.cfg.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if k != "draft_token_ids" and not (self.cfg.shared_embedding and k == "embed_tokens.weight")}
        if self.cfg.draft_vocab_size is not None:  # vLLM's draft-to-target map: target id = draft id + d2t
            ids = self.draft_ids()
            state["d2t"] = (ids - torch.arange(len(ids), device=ids.device)).contiguous()
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path) -> Eagle3Head:
        """The head; with ``shared_embedding`` its embedding is bound by ``bind_target`` (pairing.load_eagle3_for)."""
        from safetensors.torch import load_file

        head = cls(Eagle3Config.load(directory))
        state = load_file(str(Path(directory) / WEIGHTS_FILE))
        d2t = state.pop("d2t", None)
        if d2t is not None:
            state["draft_token_ids"] = d2t + torch.arange(len(d2t))
        head.load_state_dict(state, strict=not head.cfg.shared_embedding)
        head._bound = not head.cfg.shared_embedding
        return head


def init_like_llama(head: Eagle3Head, std: float = 0.02) -> None:
    """Llama's init (normal(0, std) linears and embeddings), so the head starts like the drafters."""
    for m in head.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
    # residual branches start small, as in HF Llama's scaled init
    nn.init.normal_(head.midlayer.self_attn.o_proj.weight, std=std / math.sqrt(2))


class Eagle3Drafter:
    """Incremental EAGLE-3 drafting for one sequence, as vLLM's eagle proposer does it: a cache of
    step-0 entries (token i+1, target state i, position i) for every verified position, extended by
    the "first pass" over newly verified positions once the next token is known, then draft steps
    that feed back the head's own state and attend to the cache plus their own earlier steps."""

    def __init__(self, head: Eagle3Head) -> None:
        self.head = head
        self.k0: Tensor | None = None  # (Hk, n, hd) step-0 keys of verified positions
        self.v0: Tensor | None = None

    @torch.no_grad()
    def _entries(self, tokens: Tensor, states: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """tokens (n,) next tokens, states (n, D), positions (n,) -> (q, k, v) of the entries, and x."""
        h = self.head
        layer = h.midlayer
        x = torch.cat([layer.input_layernorm(h.embed_tokens(tokens)), layer.hidden_norm(states)], dim=-1)[None]
        cos, sin = rope_cos_sin(positions[None], h.cfg.head_dim, h.cfg.rope_theta, x.dtype)
        q, k, v = layer.self_attn.qkv(x, cos, sin)
        return q[0], k[0], v[0], x

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """-> (logits (n, V), pre-norm output state (n, D))."""
        h, attn = self.head, self.head.midlayer.self_attn
        rep = attn.h // attn.hk
        a = F.scaled_dot_product_attention(q[None], keys.repeat_interleave(rep, 0)[None], values.repeat_interleave(rep, 0)[None],
                                           attn_mask=mask)[0]
        r = state + attn.o_proj(a.transpose(0, 1).flatten(1))
        out = r + h.midlayer.mlp(h.midlayer.post_attention_layernorm(r))
        return h.to_target_vocab(h.lm_head(h.norm(out))), out

    @torch.no_grad()
    def first_pass(self, next_tokens: Tensor, taps: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Newly verified positions (n,) with their target taps (n, 3, Dt) and the tokens that follow
        them (n,): cache their entries; returns the last entry's logits (V,) and state (D,)."""
        state = self.head.fuse(taps)  # (n, D)
        q, k, v, _ = self._entries(next_tokens, state, positions)
        n = k.shape[1]
        past = 0 if self.k0 is None else self.k0.shape[1]
        self.k0 = k if self.k0 is None else torch.cat([self.k0, k], dim=1)
        self.v0 = v if self.v0 is None else torch.cat([self.v0, v], dim=1)
        mask = torch.ones(n, past + n, dtype=torch.bool, device=k.device).tril(past)
        logits, out = self._attend(q, self.k0, self.v0, mask, state)
        return logits[-1], out[-1]

    @torch.no_grad()
    def step(self, token: Tensor, state: Tensor, position: int, own: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """One draft step at ``position`` from the previous step's state; ``own`` collects this
        block's draft-step keys/values (discarded when the block is verified)."""
        assert self.k0 is not None and self.v0 is not None
        q, k, v, _ = self._entries(token[None], state[None], torch.tensor([position], device=state.device))
        own.append((k, v))
        keys = torch.cat([self.k0] + [kk for kk, _ in own], dim=1)
        values = torch.cat([self.v0] + [vv for _, vv in own], dim=1)
        logits, out = self._attend(q, keys, values, torch.ones(1, keys.shape[1], dtype=torch.bool, device=keys.device),
                                   state[None])
        return logits[0], out[0]
