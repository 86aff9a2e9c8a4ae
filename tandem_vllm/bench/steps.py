"""Where an engine step's time goes: the step records ``vllm_adapter/profiler.py`` writes, read and
summarised per benchmark cell (the record format is described there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np

from tandem_vllm.vllm_adapter.profiler import ENGINE_PHASES, ENV, PHASES, WORKER_PHASES

__all__ = ["ENGINE_PHASES", "ENV", "PHASES", "WORKER_PHASES", "markdown", "per_window", "plot", "read",
           "recording", "summary"]


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
