"""Patches on vLLM's scheduler (and the engine core's post-step): per-request opt-out, guards, and no
draft hand-over after a K = 0 step (rows `opt-out`, `guards`, `k0-skip` of ``patches.PATCHES``)."""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, Final

from tandem_vllm.vllm_adapter import guards
from tandem_vllm.vllm_adapter.guards import GuardState
from tandem_vllm.vllm_adapter.marks import mark, serves_tandem

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

    scheduler_cls.schedule = mark(_schedule, "opt-out")


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

    scheduler_cls.schedule = mark(_schedule, "k0-skip")
    engine_core_cls.post_step = mark(_post_step, "k0-skip")


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

    scheduler_cls.schedule = mark(_schedule, "guards")
    scheduler_cls.make_spec_decoding_stats = mark(make_spec_decoding_stats, "guards")
    scheduler_cls.update_draft_token_ids = mark(update_draft_token_ids, "guards")


def guards_on_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    speculation_guards(Scheduler)


def opt_out() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    per_request_opt_out(Scheduler)


def k0_skip() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    no_draft_handover_after_k0_steps(Scheduler, EngineCore)
