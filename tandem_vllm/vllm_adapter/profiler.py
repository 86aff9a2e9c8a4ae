"""The step profiler: per-phase wall times of every vLLM engine step (read by ``bench/steps.py``).

With ``TANDEM_VLLM_STEP_TIMES=DIR`` in the environment of the process that runs vLLM's engine core,
the plugin times each engine step's phases (``install`` below hooks vLLM) and appends one JSON
line per step to ``DIR/steps-<pid>.jsonl`` of the process that measured it:

    kind      "engine" (the engine-core loop's step) or "worker" (the model runner's share of it)
    t         wall clock (time.time()) when the step began, to cut records into benchmark cells
  engine:
    total     the whole step: schedule ... post-step (everything the engine-core loop does per step)
    gap       since the previous step ended: reading new requests, idling for input
    schedule  Scheduler.schedule
    update    Scheduler.update_from_output
    post      post-step: drafts handed to the scheduler
    reqs, tokens, drafts   scheduled requests, scheduled tokens, scheduled draft tokens
  worker:
    execute   model runner execute_model: input preparation + the target's forward + logits
    target    of which the target model's forward
    sample    model runner sample_tokens: rejection/plain sampling, bookkeeping, drafting
    sampler   of which the sampler (the rejection sampler when drafts are verified)
    draft     of which the proposer (every drafting pass, its metadata, the router)
    drafter   of which the drafter model's forwards (``passes`` of them)

Times are seconds, measured with time.perf_counter; on CPU every op is synchronous, so each phase
is the time it really took. (On a GPU a phase would include waiting for the kernels it queued.)
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TextIO

from tandem_vllm.vllm_adapter.marks import MARK

ENV: Final = "TANDEM_VLLM_STEP_TIMES"
# Where each phase is measured: the engine-core loop, or the model runner (a process of its own on CPU,
# where vLLM always uses its multiprocessing executor; the same process with the uni-process one).
ENGINE_PHASES: Final = ("schedule", "update", "post")
WORKER_PHASES: Final = ("execute", "target", "sample", "sampler", "draft", "drafter")
PHASES: Final = ENGINE_PHASES + WORKER_PHASES


class StepClock:
    """Accumulates the phases of the current engine step (engine-core process) and of the current
    model-runner call (worker process) and writes one line per step for each, kind "engine" or
    "worker". Each line reaches the file as its step ends (~10 us): vLLM kills its worker processes
    when an engine stops at once, so nothing may wait in a buffer for a shutdown hook."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self._pid: int | None = None
        self._directory: Path | None = None
        self._file: TextIO | None = None
        self.open: dict[str, dict[str, Any]] = {"engine": {}, "worker": {}}
        self.last_end: float | None = None

    @property
    def directory(self) -> Path | None:
        """``$TANDEM_VLLM_STEP_TIMES`` as this process saw it first: hooks a process inherited by fork
        from one that was timing stay silent unless the variable is set where they run."""
        if self._pid != os.getpid():
            self._pid, self._file = os.getpid(), None  # a forked child writes a file of its own
            self._directory = Path(os.environ[ENV]) if os.environ.get(ENV) else None
        return self._directory

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        record = self.open["engine" if name in ENGINE_PHASES else "worker"]
        start = self.now()
        try:
            yield
        finally:
            record[name] = record.get(name, 0.0) + self.now() - start

    def add(self, kind: str, **values: float) -> None:
        record = self.open[kind]
        for key, value in values.items():
            record[key] = record.get(key, 0) + value

    def note(self, kind: str, **values: Any) -> None:
        self.open[kind].update(values)

    @contextmanager
    def engine_step(self) -> Iterator[None]:
        """One pass of the engine-core loop: schedule, execute, update, post-step."""
        self.open["engine"] = {"kind": "engine", "t": time.time()}
        start = self.now()
        try:
            yield
        finally:
            end = self.now()
            record, self.open["engine"] = self.open["engine"], {}
            if record.get("tokens"):  # steps that ran the model; polls without work are not steps
                record["total"] = end - start
                record["gap"] = None if self.last_end is None else start - self.last_end
                self._write(record)
            self.last_end = end

    def worker_begin(self) -> None:
        """The model runner starts a step (execute_model); the previous one ends if it had not."""
        self.worker_end()
        self.open["worker"] = {"kind": "worker", "t": time.time()}

    def worker_end(self) -> None:
        record, self.open["worker"] = self.open["worker"], {}
        if "target" in record:  # ran the target; not a dummy or empty call
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        directory = self.directory
        if directory is None:
            return
        if self._file is None:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = (directory / f"steps-{os.getpid()}.jsonl").open("a", buffering=1)  # line-buffered
        self._file.write(json.dumps(record) + "\n")


# What install() replaces: the "step-times" row of patches.PATCHES lists exactly these.
SYMBOLS: Final = ("vllm.v1.engine.core:EngineCoreProc._process_engine_step", "vllm.v1.core.sched.scheduler:Scheduler.schedule",
                  "vllm.v1.core.sched.scheduler:Scheduler.update_from_output", "vllm.v1.engine.core:EngineCore.post_step",
                  "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
                  "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward",
                  "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
                  "vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample",
                  "vllm.v1.worker.gpu_model_runner:GPUModelRunner.propose_draft_token_ids")


def install() -> None:
    """Time every engine step's phases (module docstring). Installed by the adapter only when
    ``$TANDEM_VLLM_STEP_TIMES`` is set; ~10 us per phase; re-entrant."""
    from torch import nn
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(EngineCoreProc._process_engine_step, "_tandem_timed", False):
        return  # re-entrant, and a forked engine process inherits its parent's hooks
    clock = StepClock()

    def wrap(cls: Any, name: str, before: Any = None, after: Any = None, phase: str | None = None) -> None:
        method = getattr(cls, name)

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if before:
                before(self)
            try:
                if phase is None:
                    return method(self, *args, **kwargs)
                with clock.phase(phase):
                    return method(self, *args, **kwargs)
            finally:
                if after:
                    after(self)

        wrapper._tandem_timed = True  # type: ignore[attr-defined]
        setattr(wrapper, MARK, (*getattr(wrapper, MARK, ()), "step-times"))  # a row of patches.PATCHES
        setattr(cls, name, wrapper)

    step = EngineCoreProc._process_engine_step

    def _process_engine_step(self: Any) -> Any:
        with clock.engine_step():
            return step(self)

    schedule = Scheduler.schedule

    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        with clock.phase("schedule"):
            out = schedule(self, *args, **kwargs)
        clock.note("engine", reqs=len(out.num_scheduled_tokens), tokens=out.total_num_scheduled_tokens,
                   drafts=sum(map(len, out.scheduled_spec_decode_tokens.values())))
        return out

    def drafter_started(module: Any, args: Any, kwargs: Any) -> None:
        module._tandem_started = clock.now()

    def drafter_done(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        clock.add("worker", drafter=clock.now() - module._tandem_started, passes=1)

    def hook_drafter(runner: Any) -> None:
        model: Any = getattr(getattr(runner, "drafter", None), "model", None)
        if isinstance(model, nn.Module) and not getattr(model, "_tandem_timed", False):
            model.register_forward_pre_hook(drafter_started, with_kwargs=True)
            model.register_forward_hook(drafter_done, with_kwargs=True)
            model.__dict__["_tandem_timed"] = True  # a plain attribute of ours on vLLM's module

    for cls, name, fn in ((EngineCoreProc, "_process_engine_step", _process_engine_step), (Scheduler, "schedule", _schedule)):
        fn = functools.wraps(getattr(cls, name))(fn)
        fn._tandem_timed = True  # type: ignore[attr-defined]
        setattr(fn, MARK, (*getattr(fn, MARK, ()), "step-times"))
        setattr(cls, name, fn)
    wrap(Scheduler, "update_from_output", phase="update")
    wrap(EngineCore, "post_step", phase="post")
    wrap(GPUModelRunner, "execute_model", before=lambda runner: clock.worker_begin(), phase="execute")
    wrap(GPUModelRunner, "_model_forward", phase="target")
    wrap(GPUModelRunner, "sample_tokens", after=lambda runner: clock.worker_end(), phase="sample")
    wrap(GPUModelRunner, "_sample", phase="sampler")
    wrap(GPUModelRunner, "propose_draft_token_ids", before=hook_drafter, phase="draft")
