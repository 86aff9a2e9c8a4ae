"""Client-side timing shared by the benchmarks: one streamed request, and a closed loop of them.

A stream is an async iterator of the request's token ids so far (cumulative), one item per chunk
the client receives. Speculation delivers several tokens per chunk, so each token of a chunk gets an
equal share of the gap since the previous chunk as its inter-token latency.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

P = TypeVar("P")  # what one request is made from: a prompt, or a prompt with its settings


@dataclass
class Streamed:
    tokens: list[int]
    ttft: float  # seconds from submission to the first token
    itl: list[float] = field(default_factory=list)  # seconds, one per token after the first
    chunks: int = 0  # chunks that brought tokens: one per engine step while the client keeps up


async def measure(stream: AsyncIterator[list[int]]) -> Streamed:
    start = time.perf_counter()
    last, seen, ttft, itl, tokens, chunks = start, 0, 0.0, [], [], 0
    async for tokens in stream:
        now = time.perf_counter()
        new = len(tokens) - seen
        if new > 0:
            chunks += 1
            if seen == 0:
                ttft = now - start
                new -= 1  # the first token's latency is the TTFT
            itl += [(now - last) / max(new, 1)] * new
            last, seen = now, len(tokens)
    return Streamed(list(tokens), ttft, itl, chunks)


async def closed_loop(one: Callable[[P], Awaitable[Streamed]], prompts: Sequence[P],
                      concurrency: int) -> tuple[list[Streamed | BaseException], float]:
    """Every prompt once, `concurrency` in flight; (results or the exception each raised, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(p: P) -> Streamed:
        async with gate:
            return await one(p)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(p) for p in prompts), return_exceptions=True)
    return list(results), time.perf_counter() - start


def latency_summary(results: list[Streamed], seconds: float) -> dict[str, float]:
    """tokens/s over the wall time, TTFT mean and p50, ITL p50 and p95 (milliseconds)."""
    itl = np.concatenate([np.asarray(r.itl) for r in results]) * 1e3 if results else np.zeros(0)
    ttft = np.asarray([r.ttft for r in results]) * 1e3
    tokens = sum(len(r.tokens) for r in results)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "ttft_ms_mean": round(float(ttft.mean()), 1) if ttft.size else 0.0,
        "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1) if ttft.size else 0.0,
        "itl_ms_p50": round(float(np.percentile(itl, 50)), 2) if itl.size else 0.0,
        "itl_ms_p95": round(float(np.percentile(itl, 95)), 2) if itl.size else 0.0,
    }


# ---- where the machine's CPU went during a pass: every process of this machine, grouped by role ----
CPU_GROUPS = ("benchmark client", "Serve replica (HTTP + engine frontend)", "vLLM API server (HTTP + engine frontend)",
              "vLLM engine core", "vLLM worker", "Ray daemons", "Serve controller", "Serve proxy", "HAProxy (Serve ingress)",
              "other")


def _cpu_group(pid: int, name: str, cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    if pid == os.getpid():
        return "benchmark client"
    if "ServeReplica" in line:
        return "Serve replica (HTTP + engine frontend)"
    if "vllm.entrypoints.openai.api_server" in line:
        return "vLLM API server (HTTP + engine frontend)"
    if "EngineCore" in line or "EngineCore" in name:
        return "vLLM engine core"
    if "VLLM::Worker" in line or "VllmWorker" in line:
        return "vLLM worker"
    if "ServeController" in line:
        return "Serve controller"
    if "ProxyActor" in line:
        return "Serve proxy"
    if name == "haproxy":
        return "HAProxy (Serve ingress)"
    if name in ("raylet", "gcs_server") or any(s in line for s in ("ray/dashboard", "log_monitor", "ray::", "raylet",
                                                                  "runtime_env/agent", "ray/_private")):
        return "Ray daemons"
    return "other"


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process we can read, with its group."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        t = p.info.get("cpu_times")
        if t is None:
            continue
        out[p.pid] = (_cpu_group(p.pid, p.info.get("name") or "", p.info.get("cmdline") or []), t.user + t.system)
    return out


def cpu_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each group used between two snapshots (a process started in between counts whole)."""
    used = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, cpu) in after.items():
        used[group] += max(0.0, cpu - before.get(pid, (group, 0.0))[1])
    return {g: round(v, 3) for g, v in used.items() if v > 0}
