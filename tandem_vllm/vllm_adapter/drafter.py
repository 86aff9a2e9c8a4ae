"""``TandemDrafterForCausalLM`` built from vLLM's own layers.

The same function as ``modeling/reference.py``, laid out for vLLM: every drafter layer's attention is a
vLLM ``Attention`` with rows in the engine's paged KV pool (block tables shared with the target), so a
token's K/V live at the token's slot whatever wrote them.

Layer j's input to its K/V projection is, per token row,
  * ``input_layernorm(P_j x^(l(j)))`` for rows the target has processed ("context" rows), and
  * ``input_layernorm(h_j)`` (the drafter's own residual stream) for rows of the current block.
One fused ``qkv_proj`` over the mixed rows writes the right K/V for both kinds; the queries of context
rows are computed and ignored (only the bonus row of each request is ever sampled). That is exactly the
reference's ``context_kv`` = ``self_attn.kv(input_layernorm(ctx_proj(x)))``.

Target taps reach the drafter as vLLM "aux hidden states": tap ``l < L`` is the residual stream entering
target layer ``l`` (the runner hands us ``hidden + residual``), tap ``l == L`` arrives *pre*-norm, so the
drafter applies the target's final RMSNorm itself (``bind_target_norm``).

Part of the vLLM adapter (``vllm_adapter/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from tandem_vllm.config import TandemConfig


@dataclass(frozen=True)
class TandemContext:
    """The target rows of a drafter forward pass: their K/V come from the target's taps.

    dst (Tin,) int64: the drafter row each target row lands on; rows equal to the pass's row count
    (one past the end) are dropped (rejected drafts). states (Tin, U*Dt): the target's distinct taps,
    ascending layer order, concatenated.
    """

    dst: Tensor
    states: Tensor


class TandemDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer plus P_j (``ctx_proj``): context rows' K/V come from the target."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, target_hidden_size: int) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.ctx_proj = ReplicatedLinear(
            target_hidden_size, self.hidden_size, bias=False, prefix=f"{prefix}.ctx_proj"
        )

    def forward(
        self,
        positions: Tensor,
        hidden_states: Tensor,
        residual: Tensor | None,
        context: tuple[Tensor, Tensor] | None = None,  # (dst (Tin,), this layer's tap (Tin, Dt))
    ) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden_states
            x = self.input_layernorm(hidden_states)
        else:
            x, residual = self.input_layernorm(hidden_states, residual)
        if context is not None:
            dst, tap = context
            projected, _ = self.ctx_proj(tap)  # (Tin, D)
            # Context rows replace the normed own state before qkv_proj; one scratch row takes the drops.
            x = torch.cat([x, x[:1]]).index_copy(0, dst, self.input_layernorm(projected))[:-1]
        x = self.self_attn(positions=positions, hidden_states=x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def write_context(self, positions: Tensor, slots: Tensor, tap: Tensor) -> None:
        """Only the context K/V of target rows, straight into the paged cache (slot -1: skipped): the
        same K/V ``forward`` writes for them, without the attention, MLP or any own row."""
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(self.input_layernorm(self.ctx_proj(tap)[0]))  # (T, q + 2 kv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        _, k = attn.rotary_emb(positions, q, k)
        layer = attn.attn
        layer.impl.do_kv_cache_update(
            layer,
            k.view(-1, layer.num_kv_heads, layer.head_size),
            v.view(-1, layer.num_kv_heads, layer.head_size_v),
            layer.kv_cache,
            slots,
        )


class TandemDrafterModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.tandem = TandemConfig.load(vllm_config.model_config.model)
        # a drafter sharing the target's embedding gets it from bind_target_weights() after loading
        self.embed_tokens: nn.Module | None = None
        if not self.tandem.shared_target_weights:
            self.embed_tokens = VocabParallelEmbedding(hf.vocab_size, hf.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            TandemDecoderLayer(
                vllm_config=vllm_config,
                prefix=f"{prefix}.layers.{j}",
                target_hidden_size=self.tandem.target.hidden_size,
            )
            for j in range(hf.num_hidden_layers)
        )
        self.norm = RMSNorm(hf.hidden_size, eps=hf.rms_norm_eps)
        # The runner concatenates the distinct taps in ascending order; layer j reads slot tap_slot[j].
        self.taps = tuple(sorted(set(self.tandem.tap_layers)))
        self.tap_slot = tuple(self.taps.index(t) for t in self.tandem.tap_layers)
        self._target_norm: tuple[Tensor, float] | None = None

    def bind_target_norm(self, weight: Tensor, eps: float) -> None:
        """The target's final RMSNorm, applied here to tap L (the runner hands that tap pre-norm)."""
        self._target_norm = (weight, eps)

    def _split_taps(self, states: Tensor) -> list[Tensor]:
        dt = self.tandem.target.hidden_size
        taps = list(states.view(states.shape[0], len(self.taps), dt).unbind(1))  # U x (T, Dt)
        top = self.tandem.target.num_hidden_layers
        if top in self.taps:
            assert self._target_norm is not None, "bind_target_norm() must run before a forward with context"
            weight, eps = self._target_norm
            i = self.taps.index(top)
            x32 = taps[i].float()
            taps[i] = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(taps[i].dtype)
        return taps

    def can_write_context_alone(self) -> bool:
        """Whether every layer's attention backend exposes its cache write (vLLM's FlashAttention,
        FlashInfer, Triton and CPU backends do)."""
        layers: list[Any] = list(self.layers)
        return all(hasattr(layer.self_attn.attn.impl, "do_kv_cache_update") for layer in layers)

    def write_context(self, positions: Tensor, slots: Tensor, states: Tensor) -> None:
        """Context K/V of every layer for the target rows at ``slots`` (T,) and ``positions`` (T,);
        ``states`` (T, U*Dt) are the target's taps. Layer j's context K/V depend on tap l(j) alone,
        so no drafter layer has to run: this is all a step without drafts needs."""
        taps = self._split_taps(states)
        layers: list[Any] = list(self.layers)
        for j, layer in enumerate(layers):
            layer.write_context(positions, slots, taps[self.tap_slot[j]])

    def forward(self, input_ids: Tensor, positions: Tensor, context: TandemContext | None = None) -> Tensor:
        assert self.embed_tokens is not None, "bind_target_weights() must run before the first forward"
        h = self.embed_tokens(input_ids)  # (T, D)
        residual = None
        taps = None if context is None else self._split_taps(context.states)
        for j, layer in enumerate(self.layers):
            layer_ctx = None if context is None or taps is None else (context.dst, taps[self.tap_slot[j]])
            h, residual = layer(positions, h, residual, layer_ctx)
        h, _ = self.norm(h, residual)
        return h


class TandemDrafterForCausalLM(nn.Module):
    """vLLM model for a Tandem drafter checkpoint (see ``tandem_vllm/config.py`` for the contract)."""

    # Checkpoint names are Hugging Face Llama's plus ``ctx_proj``; stacking q/k/v and gate/up is the
    # only rename, the same table vLLM's Llama uses.
    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.config = hf
        self.model = TandemDrafterModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        tandem = self.model.tandem
        self.vocab_size, rows = hf.vocab_size, tandem.lm_head_rows
        if tandem.shared_target_weights:
            if vllm_config.parallel_config.tensor_parallel_size > 1:
                raise ValueError("a drafter sharing the target's embedding and LM head serves with "
                                 "tensor_parallel_size 1 (the target's head is split across ranks)")
            self.lm_head: nn.Module | None = None  # the target's rows of the draft vocabulary: head_weight
            self.register_buffer("head_weight", torch.empty(0), persistent=False)
        else:
            self.lm_head = ParallelLMHead(rows, hf.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            if hf.tie_word_embeddings and tandem.draft_vocab_size is None:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)  # type: ignore[operator]
        self.logits_processor = LogitsProcessor(rows)
        if tandem.draft_vocab_size is not None:  # target id of each head row, loaded from the checkpoint
            self.register_buffer("draft_token_ids", torch.zeros(rows, dtype=torch.long))
        else:
            self.draft_token_ids: Tensor | None = None

    def bind_target_weights(self, target_language_model: nn.Module) -> None:
        """The target's embedding module and its LM head's rows of the draft vocabulary (a drafter with
        ``shared_target_weights`` stores neither). Runs after loading, before the first forward."""
        if not self.model.tandem.shared_target_weights:
            return
        lm: Any = target_language_model
        self.model.embed_tokens = lm.model.embed_tokens
        head = lm.lm_head.weight[: self.vocab_size]  # a padded vocabulary's extra rows are never drafted
        ids = self.draft_token_ids if self.draft_token_ids is not None else torch.arange(self.vocab_size, device=head.device)
        self.head_weight = head[ids.to(head.device)].contiguous()

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        assert self.model.embed_tokens is not None, "bind_target_weights() must run before the first forward"
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: Tensor | None = None,
        tandem_context: TandemContext | None = None,
    ) -> Tensor:
        assert inputs_embeds is None, "the Tandem drafter embeds its own tokens"
        return self.model(input_ids, positions, tandem_context)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        """(T, V) logits; a draft vocabulary's rows are scattered into the target's, -inf elsewhere
        (as vLLM's EAGLE-3 does), so sampling and the rejection sampler see the target's vocabulary."""
        if self.lm_head is None:
            logits = torch.nn.functional.linear(hidden_states, self.head_weight)  # (T, N)
        else:
            logits = self.logits_processor(self.lm_head, hidden_states)
            if logits is None:  # not the last pipeline rank
                return None
        if self.draft_token_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.draft_token_ids, logits)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        # Unknown names raise in the loader and vLLM raises on any parameter left unloaded (a tied
        # lm_head aliases the embedding), so a successful load proves checkpoint and model agree.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
