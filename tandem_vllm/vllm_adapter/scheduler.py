"""tandem-vllm's scheduler: vLLM's own (``Scheduler``, or ``AsyncScheduler`` under async scheduling)
plus three per-request decisions, handed to vLLM through its supported seam, ``scheduler_cls``. The
``scheduler`` row of ``patches.PATCHES`` makes it the default for every engine with speculation; an
engine given another ``--scheduler-cls`` keeps that one (and loses these decisions, logged once).

- opt-out: a request with ``extra_args={"speculate": "off"}`` is scheduled without drafts, so its
  output is plain target decoding (the drafter still drafts it with the batch; only verification --
  the target's extra query rows -- is saved).
- guards (``guards.py``): a request whose guard says no verifies no drafts this step; every verified
  step's (drafted, accepted) -- as vLLM counts them for its metrics -- feeds the request's acceptance
  window, and so do the drafts a structured-output request's grammar refused before verification
  (drafted, none accepted: vLLM's metrics leave them out, yet the drafter paid for them). When no
  scheduled request may verify drafts next step, the step drafts nothing (K = 0, as vLLM's dynamic K).
- the step's output is kept (``tandem_last_output``) for the engine core's post-step, which skips
  fetching drafts after a K = 0 step (patch ``k0-skip``).
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Final

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from tandem_vllm.vllm_adapter import guards
from tandem_vllm.vllm_adapter.guards import GuardState

# SamplingParams.extra_args["speculate"] values that switch speculation off for one request. On the
# OpenAI API: {"vllm_xargs": {"speculate": "off"}} (vllm_xargs takes no booleans, hence the strings).
SPECULATION_OFF: Final = ("off", "false", "no", "0")


def speculation_opted_out(sampling_params: Any) -> bool:
    value = (getattr(sampling_params, "extra_args", None) or {}).get("speculate", True)
    return value is False or str(value).strip().lower() in SPECULATION_OFF


def guard_state(scheduler: Any, request: Any) -> GuardState | None:
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


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(method: Any) -> inspect.Signature:
    fn = method.__func__
    if fn not in _SIGNATURES:
        _SIGNATURES[fn] = inspect.signature(method)
    return _SIGNATURES[fn]


class TandemScheduling:
    """The mixin: put it before a vLLM scheduler class (``TandemScheduler``, ``TandemAsyncScheduler``)."""

    running: list[Any]
    requests: dict[str, Any]
    num_spec_tokens: int

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.num_spec_tokens:
            for request in self.running:  # every step, drafts or not: a back-off counts steps, K = 0 ones too
                st = guard_state(self, request)
                guarded = st is not None and st.guards.active and not st.allows_drafts(request.num_tokens)
                if guarded or speculation_opted_out(request.sampling_params):
                    request.spec_token_ids = []
        out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        lookahead = 1 + self.num_spec_tokens  # the most tokens a request gains in this step
        if out.num_spec_tokens_to_schedule and self.running and all(
            (st := guard_state(self, request)) is not None and st.blocks_next_step(request.num_tokens + lookahead)
            for request in self.running
        ):
            out.num_spec_tokens_to_schedule = 0
        self.tandem_last_output = out
        return out

    def make_spec_decoding_stats(self, *args: Any, **kwargs: Any) -> Any:
        count = super().make_spec_decoding_stats  # type: ignore[misc]
        call = _signature(count).bind(*args, **kwargs).arguments
        request = self.requests.get(call.get("request_id"))  # type: ignore[arg-type]
        if request is not None and (st := guard_state(self, request)) is not None:
            st.observe(call["num_draft_tokens"], call["num_accepted_tokens"])
        return count(*args, **kwargs)

    def update_draft_token_ids(self, draft_token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        watched = []  # structured-output requests with an acceptance guard: (request, its state, drafts proposed)
        for req_id, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
            request = self.requests.get(req_id)
            if (request is not None and request.use_structured_output and not request.is_prefill_chunk
                    and (st := guard_state(self, request)) is not None and st.guards.min_acceptance):
                watched.append((request, st, sum(1 for _ in itertools.takewhile(lambda t: t >= 0, ids))))  # -1 pads
        out = super().update_draft_token_ids(draft_token_ids, *args, **kwargs)  # type: ignore[misc]
        for request, st, proposed in watched:
            if (dropped := proposed - len(request.spec_token_ids)) > 0:
                st.observe(dropped, 0)  # drafts its grammar refused: drafted, never accepted
        return out


class TandemScheduler(TandemScheduling, Scheduler):
    pass


class TandemAsyncScheduler(TandemScheduling, AsyncScheduler):
    pass


def qualname(async_scheduling: bool) -> str:
    """What ``scheduler_cls`` names for an engine with or without async scheduling."""
    cls = TandemAsyncScheduler if async_scheduling else TandemScheduler
    return f"{cls.__module__}.{cls.__qualname__}"
