"""``tandem-vllm bench serve``: streaming clients against the HTTP API, and the same load on the bare engine.

After a warm-up pass over every prompt, for each concurrency c every prompt is sent once as a
streaming /v1/completions request (greedy, ``ignore_eos``, token ids returned per chunk) with c
requests in flight. The same prompts then run through a bare vLLM ``AsyncLLM`` built from the same
ServeConfig (same model, drafter, k, context and KV size). Each cell is the median of ``repeat``
passes; ``overhead = 1 - serve tokens/s / engine tokens/s`` is the cost of Ray Serve + the HTTP
layer. The server must be idle apart from this benchmark; when the benchmark started the app itself,
the bare engine runs after the app is stopped.

``cold``: before the warm-up, the server's first burst -- c requests sent at once right after it became
healthy -- is its own cell (what a user's first clients wait for after a start). Across rounds the
burst takes each concurrency in turn, the app and vLLM's own server alike.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_vllm.bench import steps
from tandem_vllm.bench.measure import (
    CPU_GROUPS,
    Streamed,
    closed_loop,
    cpu_by_group,
    cpu_snapshot,
    latency_summary,
    measure,
)
from tandem_vllm.errors import TandemError
from tandem_vllm.progress import progress_bar
from tandem_vllm.serve.config import ServeConfig


@dataclass
class Cell:
    path: str  # "serve (HTTP)" or "bare engine"
    concurrency: int
    cold: bool  # the server's first burst after start, before any warm-up
    requests: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms_mean: float
    ttft_ms_p50: float
    itl_ms_p50: float
    itl_ms_p95: float
    overhead: float | None = None  # serve only: 1 - serve tokens/s / bare-engine tokens/s
    vs_vllm_server: float | None = None  # serve only: its tokens/s / vLLM's own server's (mean over rounds)
    ttft_vs_vllm_server: float | None = None  # serve only: its TTFT mean / vLLM's own server's (mean over rounds)
    window: tuple[float, float] = (0.0, 0.0)  # wall clock (time.time()) of the reported pass
    steps: dict[str, float] | None = None  # where the engine's steps' time went (--step-times)
    cpu_s: dict[str, float] | None = None  # CPU seconds each group of processes used in the reported pass


async def _http_stream(client: Any, model: str, prompt: str, max_tokens: int) -> AsyncIterator[list[int]]:
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    tokens: list[int] = []
    async for chunk in stream:
        if chunk.choices:
            tokens = tokens + list(getattr(chunk.choices[0], "token_ids", None) or [])
            yield tokens


async def _raw_stream(http: Any, model: str, prompt: str, max_tokens: int) -> AsyncIterator[list[int]]:
    """The same request without the openai client: one json.loads per SSE line, nothing else, so the
    benchmark's own CPU (on the server's cores) stays small next to the serving path it measures."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    tokens: list[int] = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise TandemError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices:
                    tokens.extend(choices[0].get("token_ids") or [])
                    yield tokens


async def _engine_stream(engine: Any, prompt: str, params: Any) -> AsyncIterator[list[int]]:
    async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
        yield list(out.outputs[0].token_ids)


def _cell(path: str, concurrency: int, raw: list[Any], seconds: float, cold: bool = False) -> Cell:
    ok = [r for r in raw if isinstance(r, Streamed)]
    return Cell(path=path, concurrency=concurrency, cold=cold, requests=len(raw), errors=len(raw) - len(ok),
                **latency_summary(ok, seconds))  # type: ignore[arg-type]


async def _median_cell(path: str, one: Any, prompts: list[str], concurrency: int, repeat: int,
                       cold: bool = False) -> Cell:
    """The median (by tokens/s) of `repeat` closed-loop passes, each with the CPU every group of the
    machine's processes used during it."""
    cells = []
    for _ in range(repeat):
        start, cpu = time.time(), cpu_snapshot()
        raw, seconds = await closed_loop(one, prompts, concurrency)
        cells.append(_cell(path, concurrency, raw, seconds, cold))
        cells[-1].window = (start, time.time())
        cells[-1].cpu_s = cpu_by_group(cpu, cpu_snapshot())
    return sorted(cells, key=lambda c: c.tokens_per_s)[len(cells) // 2]


async def bench_http(url: str, prompts: list[str], concurrencies: list[int], max_tokens: int,
                     api_key: str | None, model: str | None, repeat: int = 1, client_kind: str = "openai",
                     cold: int | None = None) -> list[Cell]:
    """Warm cells for every concurrency; first, with ``cold``, the server's first burst of that many
    requests (call it right after the server became healthy)."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0,
                                timeout=600)
    try:
        served = [m.id for m in (await client.models.list()).data]
    except openai.APIError as e:
        raise TandemError(f"{url}: cannot list models ({e}); is the server up, and is --api-key right?") from None
    model = model or served[0]

    http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600, headers={"Authorization": f"Bearer {api_key or 'none'}"},
                             limits=httpx.Limits(max_connections=max(concurrencies) + 4))

    async def one(prompt: str) -> Streamed:
        if client_kind == "openai":
            return await measure(_http_stream(client, model, prompt, max_tokens))
        return await measure(_raw_stream(http, model, prompt, max_tokens))

    try:
        # the first `cold` prompts sent at once: the burst a freshly started server meets first
        burst = (prompts * cold)[:cold] if cold else []
        first = [await _median_cell("serve (HTTP)", one, burst, cold, 1, cold=True)] if cold else []
        await closed_loop(one, prompts, max(concurrencies))  # warm-up: every prompt prefix-cached, like the engine's
        return first + [await _median_cell("serve (HTTP)", one, prompts, c, repeat) for c in concurrencies]
    finally:
        await client.close()
        await http.aclose()


async def bench_engine(cfg: ServeConfig, prompts: list[str], concurrencies: list[int], max_tokens: int,
                       repeat: int = 1) -> list[Cell]:
    from vllm import SamplingParams

    from tandem_vllm.vllm_adapter import engine as vllm_engine

    engine = vllm_engine.serve_engine(vllm_engine.serve_args(cfg.vllm_cli(on_cpu=vllm_engine.on_cpu())))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(prompt: str) -> Streamed:
        return await measure(_engine_stream(engine, prompt, params))

    try:
        await closed_loop(one, prompts, max(concurrencies))
        return [await _median_cell("bare engine", one, prompts, c, repeat) for c in concurrencies]
    finally:
        vllm_engine.stop_engine(engine)


async def _bench_vllm_server(cfg: ServeConfig, prompts: list[str], concurrencies: list[int], max_tokens: int,
                             repeat: int, client_kind: str, log_dir: Path, cold: int | None) -> list[Cell]:
    """vLLM's own OpenAI server with the same `vllm serve` flags the app's replicas use."""
    from tandem_vllm.serve.launch import free_port
    from tandem_vllm.vllm_adapter import engine as vllm_engine

    port = free_port()
    proc = vllm_engine.start_api_server(cfg.vllm_cli(on_cpu=vllm_engine.on_cpu()), host="127.0.0.1", port=port,
                                        log_path=log_dir / "vllm-server.log")
    try:
        cells = await bench_http(f"http://127.0.0.1:{port}", prompts, concurrencies, max_tokens, cfg.api_key,
                                 cfg.served_model_name, repeat, client_kind, cold)
    finally:
        vllm_engine.stop_api_server(proc)
    for c in cells:
        c.path = "vLLM's own server (HTTP)"
    return cells


def run(*, url: str | None, config: ServeConfig, prompts: list[str], concurrencies: list[int], max_tokens: int,
        model: str | None, compare_engine: bool, repeat: int = 1, client_kind: str = "openai",
        step_times: str | None = None, vllm_server: bool = False, rounds: int = 1, cold: bool = False,
        on_cells: Callable[[list[Cell]], None] | None = None) -> list[Cell]:
    """Serve cells (starting and stopping the app when no url is given), then bare-engine cells.
    ``vllm_server``: vLLM's own OpenAI server with the same flags, alternated with the app ``rounds``
    times (app, vLLM, app, vLLM, ...; one server up at a time). ``step_times``: a directory for the
    engines' step records (bench/steps.py) -- the app's when the benchmark starts it, the bare
    engine's -- summarised per cell. ``cold``: each server's first burst, at concurrency
    ``concurrencies[round % len(concurrencies)]``, before the warm-up. ``on_cells``: called with every
    cell so far after each server's pass (a long run that fails later keeps what it measured)."""
    if not prompts:
        raise TandemError('the prompts file is empty; pass a JSONL file with one {"prompt": ...} per line')
    if (vllm_server or rounds > 1) and url is not None:
        raise TandemError("--vllm-server / --rounds alternate vLLM's own server with the app this benchmark starts; "
                          "drop --url")
    import tempfile

    from tandem_vllm.serve.launch import free_port, start, stop

    cfg = config.resolved()
    bar = progress_bar(total=rounds * (1 + vllm_server) + compare_engine, desc="bench serve", unit="server")
    owned = url is None
    cells: list[Cell] = []
    logs = Path(tempfile.mkdtemp(prefix="tandem-bench-serve-"))
    with steps.recording(step_times):
        for r in range(rounds):
            burst = concurrencies[r % len(concurrencies)] if cold else None
            here = url
            if owned:
                here = start(cfg, host="127.0.0.1", port=free_port(), grpc_port=free_port(), timeout_s=900).http
            assert here is not None
            try:
                app = asyncio.run(bench_http(here, prompts, concurrencies, max_tokens, cfg.api_key, model, repeat,
                                             client_kind, burst))
            finally:
                if owned:
                    stop()
            bar.update(1)
            mine = app
            if vllm_server:
                gc.collect()
                mine = app + asyncio.run(_bench_vllm_server(cfg, prompts, concurrencies, max_tokens, repeat,
                                                            client_kind, logs, burst))
                bar.update(1)
            if rounds > 1:
                for c in mine:
                    c.path += f", round {r + 1}"
            cells += mine
            if on_cells:
                on_cells(cells)
        if compare_engine:
            gc.collect()
            bare = asyncio.run(bench_engine(cfg, prompts, concurrencies, max_tokens, repeat))
            by_c = {c.concurrency: c for c in bare}
            for c in cells:
                if c.path.startswith("serve") and by_c[c.concurrency].tokens_per_s:
                    c.overhead = round(1 - c.tokens_per_s / by_c[c.concurrency].tokens_per_s, 4)
            cells += bare
            bar.update(1)
    bar.close()
    if vllm_server:
        compare_with_vllm_server(cells)
    if step_times:
        for c, summary in zip(cells, steps.per_window(step_times, [c.window for c in cells])):
            c.steps = summary
    return cells


def compare_with_vllm_server(cells: list[Cell]) -> None:
    """Each app cell's tokens/s and TTFT mean as a multiple of vLLM's own server's, over the rounds
    (mean), for the same concurrency and burst: a first burst is compared with a first burst."""
    for c in cells:
        theirs = [v for v in cells if v.path.startswith("vLLM") and (v.concurrency, v.cold) == (c.concurrency, c.cold)]
        if c.path.startswith("serve") and theirs:
            c.vs_vllm_server = round(c.tokens_per_s / (sum(v.tokens_per_s for v in theirs) / len(theirs)), 3)
            ttft = sum(v.ttft_ms_mean for v in theirs) / len(theirs)
            c.ttft_vs_vllm_server = round(c.ttft_ms_mean / ttft, 3) if ttft else None


def markdown(cells: list[Cell]) -> str:
    head = ("| path | burst | concurrency | requests | errors | tokens/s | TTFT mean ms | TTFT p50 ms | ITL p50 ms | "
            "ITL p95 ms | overhead vs engine | tokens/s × vLLM's server | TTFT × vLLM's server |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {c.path} | {'cold' if c.cold else 'warm'} | {c.concurrency} | {c.requests} | {c.errors} | "
             f"{c.tokens_per_s:.1f} | {c.ttft_ms_mean:.0f} | {c.ttft_ms_p50:.0f} | {c.itl_ms_p50:.1f} | {c.itl_ms_p95:.1f} | "
             f"{'—' if c.overhead is None else f'{c.overhead:+.1%}'} | "
             f"{'—' if c.vs_vllm_server is None else f'{c.vs_vllm_server:.2f}×'} | "
             f"{'—' if c.ttft_vs_vllm_server is None else f'{c.ttft_vs_vllm_server:.2f}×'} |" for c in cells]
    return head + "\n".join(lines) + "\n"


def cpu_markdown(cells: list[Cell]) -> str:
    """CPU milliseconds per generated token, by group of processes, in each cell's reported pass."""
    groups = [g for g in CPU_GROUPS if any((c.cpu_s or {}).get(g) for c in cells)]
    cores = os.cpu_count() or 1
    head = ("| path | concurrency | " + " | ".join(groups) + f" | all | wall ms/token × {cores} cores |\n|---|---|"
            + "---|" * (len(groups) + 2) + "\n")
    rows = []
    for c in cells:
        per = {g: 1e3 * (c.cpu_s or {}).get(g, 0.0) / max(c.tokens, 1) for g in groups}
        rows.append(f"| {c.path} | {c.concurrency} | " + " | ".join(f"{per[g]:.2f}" for g in groups)
                    + f" | {sum(per.values()):.2f} | {1e3 * cores * c.seconds / max(c.tokens, 1):.2f} |")
    return head + "\n".join(rows) + "\n"


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(c.path for c in cells):
        mine = sorted((c for c in cells if c.path == name and not c.cold), key=lambda c: c.concurrency)
        xs = [c.concurrency for c in mine]
        line = a.plot(xs, [c.tokens_per_s for c in mine], "o-", label=name)[0]
        b.plot(xs, [c.ttft_ms_p50 for c in mine], "o-", label=name, color=line.get_color())
        cold = [c for c in cells if c.path == name and c.cold]
        if cold:  # the first burst after start: a cross of the same colour
            b.plot([c.concurrency for c in cold], [c.ttft_ms_p50 for c in cold], "x", markersize=9,
                   color=line.get_color(), label=f"{name}, first burst")
    for ax, ylabel in ((a, "tokens/s"), (b, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
