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
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem_vllm import report
from tandem_vllm.errors import TandemError
from tandem_vllm.progress import progress_bar
from tandem_vllm.speculation import SAMPLED_DRAFTS, UNBOUNDED, KSchedule, drafter_config

if TYPE_CHECKING:  # the engine benchmark imports vLLM
    from tandem_vllm.bench.engine import Cell


def pick(tokens_per_s: dict[int, dict[int, float]]) -> KSchedule:
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
    schedule: KSchedule = []
    for i, k in enumerate(best):
        end = starts[i + 1] - 1 if i + 1 < len(starts) else UNBOUNDED
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], end, k)
        else:
            schedule.append((starts[i], end, k))
    return schedule


def run(
    *, target: str, drafter: str, prompts: list[str], batch_sizes: list[int], ks: list[int], max_tokens: int,
    engine_kwargs: dict[str, Any], repeat: int = 1, temperature: float = 0.0,
) -> tuple[KSchedule, list[Cell]]:
    """Target alone and the drafter at each k, every batch size, one engine per row, in one run."""
    from tandem_vllm.bench.engine import Row, bench_row

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


def markdown(schedule: KSchedule, cells: list[Cell]) -> str:
    sizes = sorted({c.batch_size for c in cells})
    rows = list(dict.fromkeys(c.row for c in cells))
    by = {(c.row, c.batch_size): c for c in cells}
    head = "| engine | " + " | ".join(f"batch {b}" for b in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"
    body = "".join(
        f"| {r} | " + " | ".join(f"{by[r, b].tokens_per_s:.1f} ({by[r, b].speedup:.2f}×, τ {by[r, b].tau:.2f})"
                                 for b in sizes) + " |\n" for r in rows)
    ranges = ", ".join(f"{lo}-{'∞' if hi == UNBOUNDED else hi}: k={k}" for lo, hi, k in schedule)
    return f"tokens/s (× target alone, τ):\n\n{head}{body}\nschedule: {ranges}\n"


def report_doc(schedule: KSchedule, cells: list[Cell], drafter: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "schedule": [list(r) for r in schedule], "speculative_config": drafter_config(drafter, 0, schedule),
            "cells": report.rows(cells)}


def plot(cells: list[Cell], schedule: KSchedule, path: Path, title: str) -> None:
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
