"""Where an engine step's time goes: per-phase wall times of every vLLM engine step.

With ``TANDEM_VLLM_STEP_TIMES=DIR`` in the environment of the process that runs vLLM's engine core,
the plugin times each engine step's phases (``vllm_glue`` installs the hooks) and appends one JSON
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

import atexit
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np

ENV: Final = "TANDEM_VLLM_STEP_TIMES"
# Where each phase is measured: the engine-core loop, or the model runner (a process of its own on CPU,
# where vLLM always uses its multiprocessing executor; the same process with the uni-process one).
ENGINE_PHASES: Final = ("schedule", "update", "post")
WORKER_PHASES: Final = ("execute", "target", "sample", "sampler", "draft", "drafter")
PHASES: Final = ENGINE_PHASES + WORKER_PHASES


class StepClock:
    """Accumulates the phases of the current engine step (engine-core process) and of the current
    model-runner call (worker process) and writes one line per step for each, kind "engine" or
    "worker". Lines are buffered; written when the engine goes idle, every second, and at shutdown."""

    def __init__(self, flush_seconds: float = 1.0, now: Callable[[], float] = time.perf_counter) -> None:
        self.flush_seconds = flush_seconds
        self.now = now
        self._pid: int | None = None
        self._directory: Path | None = None
        self.open: dict[str, dict[str, Any]] = {"engine": {}, "worker": {}}
        self.pending: list[str] = []
        self.last_flush = self.now()
        self.last_end: float | None = None
        atexit.register(self.flush)

    @property
    def directory(self) -> Path | None:
        """``$TANDEM_VLLM_STEP_TIMES`` as this process saw it first: hooks a process inherited by fork
        from one that was timing stay silent unless the variable is set where they run."""
        if self._pid != os.getpid():
            self._pid, self.pending = os.getpid(), []
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
        if self.directory is None:
            return
        self.pending.append(json.dumps(record))
        if self.now() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = self.now()
        directory = self.directory
        if self.pending and directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            with (directory / f"steps-{os.getpid()}.jsonl").open("a") as f:
                f.write("\n".join(self.pending) + "\n")
            self.pending = []


@contextmanager
def recording(directory: str | os.PathLike[str] | None) -> Iterator[None]:
    """Engine processes started inside this block record their steps under ``directory`` (the plugin
    reads the variable where each engine process starts; Ray workers inherit it from a local
    ``ray.init``). None: a no-op."""
    if directory is None:
        yield
        return
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(Path(directory).resolve())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def read(directory: str | os.PathLike[str], start: float = 0.0, end: float = float("inf")) -> list[dict[str, Any]]:
    """Every record under ``directory`` whose step began in [start, end) (wall clock)."""
    steps = []
    for path in sorted(Path(directory).glob("steps-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                step = json.loads(line)
                if start <= step["t"] < end:
                    steps.append(step)
    return sorted(steps, key=lambda s: s["t"])


def per_window(directory: str | os.PathLike[str], windows: list[tuple[float, float]]) -> list[dict[str, float]]:
    """``summary`` of the records in each [start, end) window, reading the directory once."""
    records = read(directory)
    return [summary([r for r in records if start <= r["t"] < end]) for start, end in windows]


def summary(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Mean milliseconds per step of every phase; "ipc" is the rest of the engine step (the model
    runner's phases subtracted: messages between the processes, the engine loop's own work);
    steps, mean scheduled requests/tokens/drafts and drafter passes per step."""
    engine = [s for s in steps if s.get("kind") == "engine"]
    worker = [s for s in steps if s.get("kind") == "worker"]
    if not engine:
        return {"steps": 0}

    def mean(records: list[dict[str, Any]], key: str, scale: float = 1e3) -> float:
        return round(scale * float(np.mean([r.get(key) or 0.0 for r in records])), 2) if records else 0.0

    out: dict[str, float] = {"steps": len(engine), "total": mean(engine, "total")}
    out.update({p: mean(engine, p) for p in ENGINE_PHASES})
    out.update({p: mean(worker, p) for p in WORKER_PHASES})
    out["ipc"] = round(out["total"] - sum(out[p] for p in ("schedule", "update", "post", "execute", "sample")), 2)
    gaps = [r for r in engine if r.get("gap") is not None]
    out["gap"] = mean(gaps, "gap")
    for key in ("reqs", "tokens", "drafts"):
        out[key] = mean(engine, key, scale=1)
    out["passes"] = mean(worker, "passes", scale=1)
    return out


COLUMNS: Final = (
    ("steps", "steps"), ("reqs", "reqs/step"), ("drafts", "drafts/step"), ("total", "step ms"), ("gap", "gap ms"),
    ("schedule", "schedule"), ("execute", "execute"), ("target", "↳ target fwd"), ("sample", "sample"),
    ("sampler", "↳ sampler"), ("draft", "↳ draft"), ("drafter", "↳↳ drafter fwd"), ("passes", "passes"),
    ("update", "update"), ("post", "post"), ("ipc", "ipc + loop"),
)


def markdown(rows: list[tuple[str, int, dict[str, float]]], labels: tuple[str, str] = ("engine", "batch")) -> str:
    """One line per (engine, batch size, summary); times in ms per step."""
    head = f"| {labels[0]} | {labels[1]} | " + " | ".join(label for _, label in COLUMNS) + " |\n"
    head += "|---|---|" + "---|" * len(COLUMNS) + "\n"
    lines = [
        f"| {name} | {batch} | " + " | ".join(
            "—" if key not in s else (f"{s[key]:.0f}" if key == "steps" else f"{s[key]:.2f}" if key in ("reqs", "drafts", "passes") else f"{s[key]:.1f}")
            for key, _ in COLUMNS
        ) + " |"
        for name, batch, s in rows
    ]
    return head + "\n".join(lines) + "\n"


# Stacked segments of one step (ms): each nested phase drawn once, its parent only for the remainder.
SEGMENTS: Final = (
    ("target forward", lambda s: s["target"]),
    ("inputs + logits", lambda s: s["execute"] - s["target"]),
    ("sampler", lambda s: s["sampler"]),
    ("drafter forwards", lambda s: s["drafter"]),
    ("drafting metadata, router", lambda s: s["draft"] - s["drafter"]),
    ("bookkeeping", lambda s: s["sample"] - s["sampler"] - s["draft"]),
    ("schedule, update, post", lambda s: s["schedule"] + s["update"] + s["post"]),
    ("ipc + loop", lambda s: s["ipc"]),
)


def plot(rows: list[tuple[str, int, dict[str, float]]], path: Path, title: str, unit: str = "batch") -> None:
    """One stacked bar per (engine, batch size): where a step's milliseconds go."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r[2].get("steps")]
    fig, ax = plt.subplots(figsize=(11, 0.38 * len(rows) + 1.6))
    labels = [f"{name} · {unit} {b}" for name, b, _ in rows]
    left = np.zeros(len(rows))
    for (segment, value), color in zip(SEGMENTS, plt.get_cmap("tab10").colors):
        widths = np.array([max(value(s), 0.0) for _, _, s in rows])
        ax.barh(labels, widths, left=left, color=color, label=segment)
        left += widths
    ax.invert_yaxis()
    ax.set_xlabel("ms per engine step")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, y=1.0, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
