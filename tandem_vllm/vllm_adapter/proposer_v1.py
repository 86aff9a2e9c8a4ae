"""The Tandem proposer for vLLM's V1 model runner (pinned: vLLM 0.32).

vLLM picks its proposer from a closed list. A Tandem checkpoint is a Llama config naming
``TandemDrafterForCausalLM``, so vLLM resolves ``speculative_config={"model": DIR}`` to its
``draft_model`` method and builds a ``DraftModelProposer``; ``install()`` wraps the model runner's
constructor (``patch_runner.py``) so that, for a Tandem checkpoint, that proposer is replaced by ``TandemProposer`` and the
target is asked for its hidden states at the drafter's taps (vLLM's aux-hidden-state outputs, the
mechanism EAGLE-3 uses). Nothing in the installed vLLM package is modified on disk.

``TandemProposer`` is the ``draft_model`` proposer with one change in the first drafter pass of every
step. That pass sees, per request, the tokens the target just processed (prompt chunk, or the last
bonus token plus the drafts, of which the rejected tail is padding) followed by the new bonus token:

    rows    [ t_0 ... t_{a-1} | bonus | rejected padding ]
    K/V     [ from target taps (P_j)  | own   | not written ]

so the paged cache holds context K/V for every verified position -- overwriting the drafter's own
K/V from the previous step's drafting at accepted positions -- and own K/V for the current block.
The remaining k-1 drafting passes are vLLM's unchanged autoregressive loop. Acceptance is vLLM's
rejection sampler's, so greedy output is the target's and sampling keeps the target's distribution.

Adaptive block length: a drafter directory with a router (``tandem-vllm train-router``) makes the
proposer score each drafting pass's logits; each request's drafts are cut at the first position the
router predicts the target would reject, when the runner hands drafts to the scheduler
(``take_draft_token_ids``), so the next step verifies -- and the target computes -- only the kept
ones. That hand-over exists with synchronous scheduling (always on CPU; ``--no-async-scheduling``
on GPU); with asynchronous scheduling vLLM verifies drafts it never hands over, and the router is
left off with a warning.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Final

import torch
from torch import Tensor
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.model_executor.models.interfaces import supports_eagle3
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.router import BlockLengthRouter, draft_lengths
from tandem_vllm.speculation import DRAFT_SAMPLE_METHOD
from tandem_vllm.vllm_adapter.checks import checked_tandem_config, logger
from tandem_vllm.vllm_adapter.drafter import TandemContext

# vLLM drafts greedily by default and then verifies a sampled request as if the drafter were certain of
# its argmax, so a draft is accepted with the target's probability of it. Sampling the draft and handing
# its probabilities to the rejection sampler (accept with min(1, p/q)) is what lets a drafter that is
# close to the target in distribution pay at T > 0 (ci pair, T=1, k=3: tau 1.21 -> 2.39). Greedy
# requests still take the drafter's argmax.
TANDEM_DRAFT_SAMPLING: Final = DRAFT_SAMPLE_METHOD

# "0": K = 0 steps run vLLM's whole first drafting pass instead of writing context K/V alone (the same
# cache contents, slower; kept to compare the two and as an escape hatch for an unusual backend).
CONTEXT_ALONE_ENV: Final = "TANDEM_VLLM_CONTEXT_ALONE"
_PROPOSE: Final = inspect.signature(DraftModelProposer.propose)


class TandemProposer(DraftModelProposer):
    """vLLM's draft-model proposer whose first pass writes the target's context K/V (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner: Any = None) -> None:
        assert vllm_config.speculative_config is not None
        spec = vllm_config.speculative_config
        self.tandem = checked_tandem_config(spec.draft_model_config.model, spec.num_speculative_tokens, vllm_config.model_config)
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self._runner = runner
        # The runner reads this (EAGLE-3's field) to choose which target layers it returns; their
        # concatenation, in ascending layer order, is what ``propose`` receives as target_hidden_states.
        self.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids = sorted(set(self.tandem.tap_layers))
        self._context: TandemContext | None = None
        self.router = BlockLengthRouter.load(spec.draft_model_config.model, device=device)
        if self.router is not None and vllm_config.scheduler_config.async_scheduling:
            logger.warning("the drafter's router is off: asynchronous scheduling verifies drafts before they can be "
                           "cut; pass --no-async-scheduling to draft adaptively")
            self.router = None
        self.kept_lengths: list[int] | None = None  # per batch row, set by propose() when the router cut drafts

    def _sample_from_logits(self, logits: Tensor, sampling_metadata: Any) -> tuple[Tensor, Tensor | None]:
        """Sampled drafts (draft_sample_method=probabilistic), with seeded requests drafting from their
        own generator: vLLM draws every draft from the global RNG, so a seed would no longer fix the
        text (drafts, hence what is accepted, would depend on the other requests in the batch).
        Requests whose sample is discarded (partial prefill) keep their generator untouched."""
        tokens, probs = super()._sample_from_logits(logits, sampling_metadata)
        gens = sampling_metadata.generators
        if probs is None or not gens or self._runner is None or logits.shape[0] != self._runner.input_batch.num_reqs:
            return tokens, probs
        discarded = self._runner.discard_request_mask.np
        for i, gen in gens.items():
            if not discarded[i]:
                noise = torch.empty_like(probs[i]).exponential_(generator=gen)  # Gumbel-max, as vLLM samples
                tokens[i] = (probs[i] / noise).argmax()
        return tokens, probs

    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)
        if not supports_eagle3(target_model):
            raise TandemError(
                f"target {type(target_model).__name__} does not expose per-layer hidden states to drafters "
                "(vLLM's SupportsEagle3 interface); Tandem needs them. Llama, Qwen2 and Qwen3 targets do."
            )
        language_model: Any = getattr(target_model, "get_language_model", lambda: target_model)()
        norm = language_model.model.norm
        self.model.model.bind_target_norm(norm.weight, norm.variance_epsilon)
        self.model.bind_target_weights(language_model)

    def propose(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's drafting, with the router scoring every pass's logits when the drafter has one; a
        step without drafts (K = 0) only writes the context K/V."""
        self.kept_lengths = None
        call = _PROPOSE.bind(self, *args, **kwargs).arguments
        if call["num_speculative_tokens"] == 0 and self.context_alone_at_k0:
            return self._write_context_only(**{k: v for k, v in call.items() if k != "self"})
        if self.router is None:
            return super().propose(*args, **kwargs)
        seen: list[Tensor] = []
        compute_logits = self.model.compute_logits

        def scored(hidden_states: Tensor) -> Tensor:
            logits = compute_logits(hidden_states)
            seen.append(logits)
            return logits

        self.model.compute_logits = scored  # an instance attribute, removed below
        try:
            drafts = super().propose(*args, **kwargs)
        finally:
            del self.model.compute_logits
        k = drafts.shape[1] if drafts.dim() == 2 else 0
        if k > 1 and len(seen) == k and all(t.shape[0] == drafts.shape[0] for t in seen):
            embed = self.model.model.embed_tokens.weight
            prob = torch.stack([self.router.accept_prob(t, embed) for t in seen], dim=1)  # (B, k)
            self.kept_lengths = draft_lengths(prob, self.router.cfg.threshold).tolist()
        return drafts

    def _write_context_only(
        self,
        *,
        target_positions: Tensor,
        target_hidden_states: Tensor,
        common_attn_metadata: CommonAttentionMetadata,
        num_rejected_tokens_gpu: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        """K = 0 (vLLM's dynamic K: the batch-size fallback): nobody verifies drafts, but the next step
        that drafts attends to the context K/V of every position processed now. vLLM's draft-model
        proposer runs the whole first drafting pass for that; Tandem's context K/V need no drafter
        layer, so write them alone (projections only: no attention, MLP or logits), at the target's
        own slots (drafter and target share block tables) -- not in the drafter's row layout."""
        cad = common_attn_metadata
        num_in, dropped = target_positions.shape[0], target_positions.shape[0] + cad.batch_size()
        verified = context_rows(cad.query_start_loc, num_rejected_tokens_gpu, num_in, dropped) < dropped
        slots = torch.where(verified, cad.slot_mapping[:num_in], PADDING_SLOT_ID)  # rejected drafts: skipped
        self.model.model.write_context(target_positions, slots, target_hidden_states)
        return torch.empty(cad.batch_size(), 0, dtype=torch.int64, device=target_positions.device)

    @functools.cached_property
    def context_alone_at_k0(self) -> bool:
        if os.environ.get(CONTEXT_ALONE_ENV, "1") == "0":
            return False
        return self.model.model.can_write_context_alone()

    def initialize_cudagraph_keys(self, cudagraph_mode: CUDAGraphMode) -> None:
        # The first pass carries a TandemContext that CUDA graphs cannot capture: draft eagerly.
        super().initialize_cudagraph_keys(CUDAGraphMode.NONE)

    def set_inputs_first_pass(
        self,
        target_token_ids: Tensor,
        next_token_ids: Tensor,
        target_positions: Tensor,
        target_hidden_states: Tensor,
        token_indices_to_sample: Tensor | None,
        cad: CommonAttentionMetadata,
        num_rejected_tokens_gpu: Tensor | None,
    ) -> tuple[int, Tensor, CommonAttentionMetadata]:
        num_out, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids,
            next_token_ids,
            target_positions,
            target_hidden_states,
            token_indices_to_sample,
            cad,
            num_rejected_tokens_gpu,
        )
        self._context = TandemContext(
            dst=context_rows(cad.query_start_loc, num_rejected_tokens_gpu, target_token_ids.shape[0], num_out),
            states=target_hidden_states,
        )
        return num_out, token_indices_to_sample, new_cad

    def build_model_inputs_first_pass(
        self, num_tokens: int, num_input_tokens: int, mm_embed_inputs: Any
    ) -> tuple[dict[str, Any], int]:
        kwargs, size = super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)
        assert self._context is not None, "set_inputs_first_pass must precede build_model_inputs_first_pass"
        kwargs["tandem_context"], self._context = self._context, None
        return kwargs, size


def context_rows(query_start_loc: Tensor, num_rejected: Tensor | None, num_in: int, num_out: int) -> Tensor:
    """Drafter row of each target row, or ``num_out`` (a scratch row) for rejected drafts.

    The draft-model layout puts request r's verified tokens at its input offset + r (one bonus slot
    per earlier request), then its bonus token, then its rejected tail as padding. No host sync.
    query_start_loc (B+1,) int32; num_rejected (B,) or None -> (num_in,) int64.
    """
    rows = torch.arange(num_in, device=query_start_loc.device, dtype=query_start_loc.dtype)
    request = torch.searchsorted(query_start_loc[1:], rows, right=True)  # (num_in,)
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    verified = lengths if num_rejected is None else lengths - num_rejected
    keep = rows - query_start_loc[request] < verified[request]
    return torch.where(keep, rows.long() + request, num_out)
