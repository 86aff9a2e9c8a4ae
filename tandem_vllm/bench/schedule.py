"""``tandem-vllm bench schedule``: how many tokens to draft at each batch size, measured for one pair.

Speculation pays at small batches and costs at large ones, and where it turns depends on the pair,
the machine and k: on the bench pair on 2 CPU cores fixed-k Tandem still paid 1.13x at batch 16,
where a fallback fixed at 8 had already switched it off (0.95x). This sweeps target alone and the
drafter at every k in 1..K over batch sizes in one run and writes vLLM's own dynamic-K schedule
(``num_speculative_tokens_per_batch_size``): at each measured batch size the k with the most
tokens/s, and 0 where target alone beats every k (a Tandem step without drafts still writes the
drafter's context, so 0 is no better than target alone: any k that at least matches it is kept).

Each measured size governs the running batch sizes nearest it on a log scale (sizes 1, 4, 16:
1-2 -> size 1, 3-8 -> size 4, 9 and up -> size 16). Measure on prompts other than the ones the
schedule is then judged on (``--skip-prompts``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem_vllm.errors import TandemError
from tandem_vllm.progress import progress_bar

if TYPE_CHECKING:  # the engine benchmark imports vLLM; this module stays light (ServeConfig validates with it)
    from tandem_vllm.bench.engine import Cell

UNBOUNDED = 1 << 20  # the last range's end: every larger running batch
Schedule = list[tuple[int, int, int]]  # vLLM's (first batch size, last batch size, k), inclusive


def pick(tokens_per_s: dict[int, dict[int, float]]) -> Schedule:
    """``tokens_per_s[k][batch]`` (k = 0: target alone) -> the schedule: per measured batch size the
    fastest k >= 1, or 0 where target alone is faster than all of them; neighbouring sizes with the
    same k merge into one range."""
    if 0 not in tokens_per_s or len(tokens_per_s) < 2:
        raise TandemError("a schedule needs target alone (k = 0) and at least one k >= 1 measured")
    sizes = sorted(tokens_per_s[0])
    missing = [(k, b) for k in tokens_per_s for b in sizes if b not in tokens_per_s[k]]
    if missing:
        raise TandemError(f"no measurement for (k, batch) {missing[0]}: every k needs every batch size")
    best = []
    for b in sizes:
        k, tps = max(((k, row[b]) for k, row in tokens_per_s.items() if k > 0), key=lambda kv: (kv[1], -kv[0]))
        best.append(k if tps >= tokens_per_s[0][b] else 0)
    # measured size i governs running sizes from the log-midpoint with size i-1 up to the one with size i+1
    starts = [1] + [math.floor(math.sqrt(a * b)) + 1 for a, b in zip(sizes, sizes[1:])]
    schedule: Schedule = []
    for i, k in enumerate(best):
        end = starts[i + 1] - 1 if i + 1 < len(starts) else UNBOUNDED
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], end, k)
        else:
            schedule.append((starts[i], end, k))
    return schedule


def speculative_config(drafter: str, schedule: Schedule) -> dict[str, Any]:
    """The speculative_config that serves ``schedule`` (k capped by num_speculative_tokens = its largest k)."""
    from tandem_vllm.bench.engine import SAMPLED_DRAFTS

    k_max = max(k for _, _, k in schedule)
    if k_max == 0:
        return {}
    return {"model": drafter, "num_speculative_tokens": k_max,
            "num_speculative_tokens_per_batch_size": [list(r) for r in schedule], **SAMPLED_DRAFTS}


def run(
    *, target: str, drafter: str, prompts: list[str], batch_sizes: list[int], ks: list[int], max_tokens: int,
    engine_kwargs: dict[str, Any], repeat: int = 1, temperature: float = 0.0,
) -> tuple[Schedule, list[Cell]]:
    """Target alone and the drafter at each k, every batch size, one engine per row, in one run."""
    from tandem_vllm.bench.engine import SAMPLED_DRAFTS, Row, bench_row

    if not prompts:
        raise TandemError("no prompts to measure on (check --prompts, --skip-prompts and --num-prompts)")
    rows = [(0, Row("target alone", None))] + [
        (k, Row(f"drafter k={k}", {"model": drafter, "num_speculative_tokens": k, **SAMPLED_DRAFTS})) for k in ks]
    cells: list[Cell] = []
    tps: dict[int, dict[int, float]] = {}
    bar = progress_bar(total=len(rows), desc="schedule rows", unit="row")
    for k, row in rows:
        mine = asyncio.run(bench_row(row, target=target, prompts=prompts, batch_sizes=batch_sizes,
                                      max_tokens=max_tokens, repeat=repeat, engine_kwargs=engine_kwargs,
                                      temperature=temperature))
        gc.collect()
        tps[k] = {c.batch_size: c.tokens_per_s for c in mine}
        cells += mine
        bar.update(1)
    bar.close()
    base = {c.batch_size: c.tokens_per_s for c in cells if c.row == "target alone"}
    for c in cells:
        c.speedup = round(c.tokens_per_s / base[c.batch_size], 3)
    return pick(tps), cells


def markdown(schedule: Schedule, cells: list[Cell]) -> str:
    sizes = sorted({c.batch_size for c in cells})
    rows = list(dict.fromkeys(c.row for c in cells))
    by = {(c.row, c.batch_size): c for c in cells}
    head = "| engine | " + " | ".join(f"batch {b}" for b in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"
    body = "".join(
        f"| {r} | " + " | ".join(f"{by[r, b].tokens_per_s:.1f} ({by[r, b].speedup:.2f}×, τ {by[r, b].tau:.2f})"
                                 for b in sizes) + " |\n" for r in rows)
    ranges = ", ".join(f"{lo}-{'∞' if hi == UNBOUNDED else hi}: k={k}" for lo, hi, k in schedule)
    return f"tokens/s (× target alone, τ):\n\n{head}{body}\nschedule: {ranges}\n"


def write_json(schedule: Schedule, cells: list[Cell], drafter: str, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "schedule": [list(r) for r in schedule], "speculative_config": speculative_config(drafter, schedule),
           "cells": [{k: v for k, v in asdict(c).items() if k not in ("outputs", "window")} for c in cells]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read(source: str | Path) -> Schedule:
    """The ``schedule`` of a ``bench schedule`` report, a file of a bare JSON list of [first, last, k],
    or that list itself as JSON text."""
    text = str(source).strip()
    try:
        doc = json.loads(text if text.startswith("[") else Path(source).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TandemError(f"cannot read a schedule from {source}: {e}") from None
    raw = doc.get("schedule") if isinstance(doc, dict) else doc
    return validate(raw, str(source))


def validate(raw: Any, where: str) -> Schedule:
    """vLLM's rules, checked before any engine starts: [first, last, k] triples, first from 1, sorted,
    not overlapping, k >= 0."""
    try:
        schedule = [(int(a), int(b), int(k)) for a, b, k in raw]
    except (TypeError, ValueError):
        raise TandemError(f"{where}: expected a list of [first batch size, last batch size, k] triples") from None
    if not schedule or schedule[0][0] != 1:
        raise TandemError(f"{where}: the first range must start at batch size 1")
    previous = 0
    for lo, hi, k in schedule:
        if lo <= previous or hi < lo or k < 0:
            raise TandemError(f"{where}: range ({lo}, {hi}, k={k}) overlaps, is out of order or has k < 0")
        previous = hi
    return schedule


def plot(cells: list[Cell], schedule: Schedule, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in dict.fromkeys(c.row for c in cells):
        mine = sorted((c.batch_size, c.speedup) for c in cells if c.row == r)
        ax.plot([b for b, _ in mine], [s for _, s in mine], marker="o", label=r)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("batch size (requests in flight)")
    ax.set_ylabel("tokens/s vs target alone")
    ranges = ", ".join(f"{lo}-{'inf' if hi == UNBOUNDED else hi}: k={k}" for lo, hi, k in schedule)
    ax.set_title(f"{title}\nschedule {ranges}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
