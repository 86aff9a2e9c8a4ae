"""Patches around vLLM's scheduler: tandem-vllm's scheduler class as the default ``scheduler_cls`` of
engines with speculation (row ``scheduler``; the class itself, in ``scheduler.py``, replaces nothing),
and no draft hand-over after a K = 0 step (row ``k0-skip``: the engine core's post-step has no seam)."""

from __future__ import annotations

import functools
from typing import Any

from tandem_vllm.vllm_adapter.checks import logger
from tandem_vllm.vllm_adapter.marks import mark, serves_tandem


def default_scheduler_class(engine_args_cls: Any) -> None:
    """Engines with speculation schedule with ``scheduler.TandemScheduler`` (or its async twin) unless
    their arguments chose a scheduler class: vLLM's own ``scheduler_cls`` seam, set where the engine
    config is built so that every engine -- ``vllm serve``, ``LLM``, the Serve app -- gets it."""
    make_engine_config = engine_args_cls.create_engine_config

    @functools.wraps(make_engine_config)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        from tandem_vllm.vllm_adapter.scheduler import qualname

        config = make_engine_config(self, *args, **kwargs)
        sched = config.scheduler_config
        if config.speculative_config is not None:
            if sched.scheduler_cls is None:
                sched.scheduler_cls = qualname(bool(sched.async_scheduling))
            elif "tandem_vllm" not in str(sched.scheduler_cls):
                logger.warning("scheduler_cls=%s: per-request opt-out (speculate=off) and speculation guards need "
                               "tandem-vllm's scheduler (tandem_vllm.vllm_adapter.scheduler); this engine has "
                               "neither", sched.scheduler_cls)
        return config

    engine_args_cls.create_engine_config = mark(create_engine_config, "scheduler")


def no_draft_handover_after_k0_steps(engine_core_cls: Any) -> None:
    """After a step scheduled with K = 0 (vLLM's dynamic K, or guards), the engine would still ask the
    model runner for drafts -- an RPC to the worker process per step (1-2 ms on CPU) for empty lists.
    Skip it on Tandem engines: the scheduler already cleared every request's drafts when it scheduled
    the step (``TandemScheduling`` keeps the step's output; other schedulers keep none, and the fetch runs)."""
    post_step = engine_core_cls.post_step

    @functools.wraps(post_step)
    def _post_step(self: Any, model_executed: bool) -> None:
        out = getattr(self.scheduler, "tandem_last_output", None)
        if (self.async_scheduling or out is None or out.num_spec_tokens_to_schedule > 0
                or not serves_tandem(self.scheduler)):
            post_step(self, model_executed)

    engine_core_cls.post_step = mark(_post_step, "k0-skip")


def scheduler_class() -> None:
    from vllm.engine.arg_utils import EngineArgs

    default_scheduler_class(EngineArgs)


def k0_skip() -> None:
    from vllm.v1.engine.core import EngineCore

    no_draft_handover_after_k0_steps(EngineCore)
