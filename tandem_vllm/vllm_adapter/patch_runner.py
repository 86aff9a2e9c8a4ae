"""Patches on vLLM's V1 model runner: the Tandem proposer, the router's draft cut, the plain sampler for
steps without drafts, sampled drafts under a grammar (rows `proposer`, `router-cut`, `k0-sampler`,
`grammar-drafts` of ``patches.PATCHES``)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from tandem_vllm.vllm_adapter.marks import mark, serves_tandem
from tandem_vllm.vllm_adapter.proposer_v1 import TandemProposer
from tandem_vllm.vllm_adapter.sampling_math import grammar_masked_draft_probs


def tandem_proposer() -> None:
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    make_runner = GPUModelRunner.__init__

    @functools.wraps(make_runner)
    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        make_runner(self, vllm_config, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DraftModelProposer) and not isinstance(drafter, TandemProposer) and serves_tandem(self):
            self.drafter = TandemProposer(vllm_config, self.device, runner=self)
            self.use_aux_hidden_state_outputs = True

    GPUModelRunner.__init__ = mark(__init__, "proposer")


def cut_drafts_where_the_router_stops(runner_cls: Any) -> None:
    """Drafts leave the runner for the scheduler here (synchronous scheduling): keep each request's
    first ``kept_lengths[row]``; the scheduler then verifies only those."""
    take = runner_cls.take_draft_token_ids

    @functools.wraps(take)
    def take_draft_token_ids(self: Any) -> Any:
        out = take(self)
        drafter = getattr(self, "drafter", None)
        kept = getattr(drafter, "kept_lengths", None)  # only a TandemProposer with a router sets it
        if out is None or drafter is None or kept is None:
            return out
        drafter.kept_lengths = None
        if len(kept) == len(out.draft_token_ids):
            out.draft_token_ids = [ids[:n] for ids, n in zip(out.draft_token_ids, kept)]
        return out

    runner_cls.take_draft_token_ids = mark(take_draft_token_ids, "router-cut")


def router_cut() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    cut_drafts_where_the_router_stops(GPUModelRunner)


def plain_sampling_without_drafts(runner_cls: Any) -> None:
    """A step in which no request verifies a draft (K = 0: the batch-size fallback, guards, opted-out
    requests) samples like target alone. vLLM's V1 runner sends every step of a speculative engine
    through the rejection sampler, drafts or not -- a second sampler pass over raw logits, the
    rejection kernels over zero drafts and their logprob bookkeeping. With no drafts the rejection
    sampler's output is the bonus token, drawn by the same sampler from the same logits (one row per
    request), so handing the step to the plain sampler changes nothing but the time."""
    sample = runner_cls._sample

    @functools.wraps(sample)
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0 and serves_tandem(self):
            spec_decode_metadata = None
        return sample(self, logits, spec_decode_metadata, *args, **kwargs)

    runner_cls._sample = mark(_sample, "k0-sampler")


def k0_sampler() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    plain_sampling_without_drafts(GPUModelRunner)


def restrict_draft_probs_to_grammar(runner_cls: Any) -> None:
    """The V1 runner hands the rejection sampler draft probabilities restricted to what each
    structured-output request's grammar allows (``grammar_masked_draft_probs``); other requests, and
    engines whose drafter hands over no probabilities (greedy drafts, n-gram), are untouched."""
    sample_tokens, sample, draft_probs = (runner_cls.sample_tokens, runner_cls._sample,
                                          runner_cls._get_spec_decode_draft_probs)

    @functools.wraps(sample_tokens)
    def _sample_tokens(self: Any, grammar_output: Any, *args: Any, **kwargs: Any) -> Any:
        self._tandem_grammar_reqs = set(grammar_output.structured_output_request_ids) if grammar_output else None
        try:
            return sample_tokens(self, grammar_output, *args, **kwargs)
        finally:
            self._tandem_grammar_reqs = None

    @functools.wraps(sample)
    def _sample(self: Any, logits: Any, *args: Any, **kwargs: Any) -> Any:
        self._tandem_sample_logits = logits  # grammar-masked by now
        try:
            return sample(self, logits, *args, **kwargs)
        finally:
            self._tandem_sample_logits = None

    @functools.wraps(draft_probs)
    def _get_spec_decode_draft_probs(self: Any, metadata: Any) -> Any:
        probs = draft_probs(self, metadata)
        grammar_reqs, logits = getattr(self, "_tandem_grammar_reqs", None), getattr(self, "_tandem_sample_logits", None)
        if probs is None or not grammar_reqs or logits is None:
            return probs
        rows: list[int] = []
        row = 0  # vLLM's order: requests with drafts, each one's drafts in turn
        for req_id, num_draft in zip(self.input_batch.req_ids, metadata.num_draft_tokens):
            if req_id in grammar_reqs:
                rows += range(row, row + num_draft)
            row += num_draft
        if not rows:
            return probs
        index = torch.tensor(rows, device=probs.device)
        probs = probs.clone()
        probs[index] = grammar_masked_draft_probs(probs[index], logits[metadata.target_logits_indices[index]])
        return probs

    runner_cls.sample_tokens = mark(_sample_tokens, "grammar-drafts")
    runner_cls._sample = mark(_sample, "grammar-drafts")
    runner_cls._get_spec_decode_draft_probs = mark(_get_spec_decode_draft_probs, "grammar-drafts")


def grammar_drafts() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    restrict_draft_probs_to_grammar(GPUModelRunner)
