"""``tandem-vllm bench engine``: target alone vs SPEED vs Tandem+SPEED in vLLM, one run, same prompts.

Every row is a fresh vLLM async engine on the same target; every batch size streams the same prompts
greedily with ``batch_size`` requests in flight (a closed loop). Per request we record when each
streamed chunk arrives:
  * TTFT = first chunk - submission;
  * inter-token latency = gap between chunks / tokens in the later chunk (speculation emits several
    tokens per step, so each gets its share of the step);
  * tokens/s = generated tokens / wall time of the whole batch-size run.
The acceptance rate comes from vLLM's own spec-decode counters. tau is tokens per decode step
(target pass): vLLM's "mean acceptance length" (1 + accepted / drafting steps) leaves out steps where
a drafter proposed nothing -- n-gram lookup without a match, the fallback's K = 0 steps -- and counts
drafts accepted past max_tokens, so tau here is (tokens - one per request, the prefill's) / decode
steps, each decode step being one streamed chunk (the engine emits one per step and request; the
closed-loop client keeps up, so chunks are not merged). Greedy rows must reproduce target-alone output token for token; the report says
whether they did. Sampled runs (``temperature`` > 0) draft from the drafter's distribution
(``draft_sample_method: probabilistic``) as tandem-vllm configures serving.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem_vllm.bench import steps
from tandem_vllm.bench.measure import Streamed, closed_loop, latency_summary, measure
from tandem_vllm.errors import TandemError
from tandem_vllm.progress import progress_bar
from tandem_vllm.prompts import Prompt
from tandem_vllm.speculation import NGRAM, SAMPLED_DRAFTS, UNBOUNDED, drafter_config
from tandem_vllm.vllm_adapter.engine import async_engine, spec_metrics, stop_engine
from tandem_vllm.vllm_adapter.guards import ENV as GUARDS_ENV
from tandem_vllm.vllm_adapter.guards import server_defaults


@dataclass(frozen=True)
class Row:
    name: str
    speculative_config: dict[str, Any] | None
    env: dict[str, str] = field(default_factory=dict)  # for the engine's processes (speculation guards)




@dataclass
class Cell:
    """One row at one batch size."""

    row: str
    batch_size: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms_mean: float
    itl_ms_p50: float
    itl_ms_p95: float
    tau: float  # tokens per decode step (target pass), steps with no drafts included
    acceptance_rate: float | None
    drafts: int  # speculation steps the engine counted (vLLM's num_drafts)
    temperature: float = 0.0
    speedup: float = 1.0
    speedup_over_tau: float = 1.0
    lossless: bool | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    window: tuple[float, float] = (0.0, 0.0)  # wall clock (time.time()) of the measured pass
    steps: dict[str, float] | None = None  # where each engine step's time went (--step-times)
    accepted_per_pos: list[float] | None = None  # share of drafting steps whose draft i was accepted (vLLM's counter)


def rows_for(
    *, tandem: str, baseline: str | None, k: int, fallback_batch_size: int | None, tandem_router: str | None = None,
    ngram: bool = True, eagle3: str | None = None, guards: str | None = None,
    schedule: list[tuple[int, int, int]] | None = None,
) -> list[Row]:
    """The rows of one run. The adaptive row is the batch-size fallback, plus the learned router
    (``tandem_router``: a drafter directory from ``train-router``) when one is given. ``schedule``
    (from ``bench schedule``) adds a row drafting k by batch size as measured for this pair."""
    rows = [Row("target alone", None)]
    if ngram:
        rows.append(Row(f"n-gram lookup (k={k})", {**NGRAM, "num_speculative_tokens": k}))
        if guards:  # the guards act on every drafter; n-gram lookup is the one that drafts where it cannot know
            rows.append(Row(f"n-gram lookup guarded (k={k}, {guards})", {**NGRAM, "num_speculative_tokens": k},
                            env={GUARDS_ENV: guards}))
    if baseline:
        rows.append(Row(f"SPEED (standalone drafter, k={k})", {"model": baseline, "num_speculative_tokens": k, **SAMPLED_DRAFTS}))
    if eagle3:
        rows.append(Row(f"EAGLE-3 (k={k})", {"method": "eagle3", "model": eagle3, "num_speculative_tokens": k, **SAMPLED_DRAFTS}))
    rows.append(Row(f"Tandem+SPEED (k={k})", {"model": tandem, "num_speculative_tokens": k, **SAMPLED_DRAFTS}))
    if guards:  # JSON of guards.Guards fields: the server defaults of that engine
        rows.append(Row(f"Tandem+SPEED guarded (k={k}, {guards})", {"model": tandem, "num_speculative_tokens": k,
                                                                     **SAMPLED_DRAFTS}, env={GUARDS_ENV: guards}))
    if tandem_router:
        rows.append(Row(f"Tandem+SPEED router (k<={k})", {"model": tandem_router, "num_speculative_tokens": k, **SAMPLED_DRAFTS}))
    if fallback_batch_size:
        # vLLM's dynamic-K schedule: draft k tokens below the threshold, none at or above it.
        fallback = [(1, fallback_batch_size - 1, k), (fallback_batch_size, 1 << 20, 0)]
        how = f"router, k<={k}" if tandem_router else f"k={k}"
        rows.append(
            Row(
                f"Tandem+SPEED adaptive ({how}, off at batch >= {fallback_batch_size})",
                {"model": tandem_router or tandem, "num_speculative_tokens": k,
                 "num_speculative_tokens_per_batch_size": fallback, **SAMPLED_DRAFTS},
            )
        )
    if schedule:
        ranges = ", ".join(f"{lo}-{'' if hi == UNBOUNDED else hi}:{kk}" for lo, hi, kk in schedule)
        rows.append(Row(f"Tandem+SPEED measured schedule (batch:k {ranges})",
                        drafter_config(tandem, k, schedule) or None))
    return rows


async def _engine_stream(engine: Any, prompt: str, params: Any) -> AsyncIterator[list[int]]:
    async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
        yield list(out.outputs[0].token_ids)


async def _cell(row: Row, one: Any, prompts: list[Prompt], batch_size: int) -> Cell:
    """One closed-loop pass over the prompts with batch_size in flight, measured."""
    before, start = spec_metrics(), time.time()
    raw, seconds = await closed_loop(one, prompts, batch_size)
    after, end = spec_metrics(), time.time()
    results = [r for r in raw if isinstance(r, Streamed)]
    if len(results) < len(raw):
        raise next(r for r in raw if isinstance(r, BaseException))
    d = {k: after[k] - before.get(k, 0.0) for k in after if isinstance(after[k], float)}
    s = latency_summary(results, seconds)
    drafts = d.get("num_drafts", 0.0)
    per_pos = after.get("num_accepted_tokens_per_pos")
    if isinstance(per_pos, list) and drafts:
        was = before.get("num_accepted_tokens_per_pos") or [0.0] * len(per_pos)
        per_pos = [round((a - b) / drafts, 4) for a, b in zip(per_pos, was)]
    else:
        per_pos = None
    decode_steps = sum(r.chunks - 1 for r in results)  # each request's first chunk is its prefill's token
    return Cell(
        row=row.name,
        batch_size=batch_size,
        requests=len(prompts),
        tokens=int(s["tokens"]),
        seconds=s["seconds"],
        tokens_per_s=s["tokens_per_s"],
        ttft_ms_mean=s["ttft_ms_mean"],
        itl_ms_p50=s["itl_ms_p50"],
        itl_ms_p95=s["itl_ms_p95"],
        tau=round((s["tokens"] - len(results)) / decode_steps, 3) if decode_steps > 0 else 1.0,
        acceptance_rate=round(d["num_accepted_tokens"] / d["num_draft_tokens"], 4) if d.get("num_draft_tokens") else None,
        drafts=int(drafts),
        outputs=[r.tokens for r in results],
        window=(start, end),
        accepted_per_pos=per_pos,
    )


async def bench_row(
    row: Row, *, target: str, prompts: Sequence[str | Prompt], batch_sizes: list[int], max_tokens: int, repeat: int,
    engine_kwargs: dict[str, Any], temperature: float = 0.0, ignore_eos: bool = True,
) -> list[Cell]:
    """Per batch size, the median (by tokens/s) of `repeat` passes. A warm-up pass over every prompt
    first, so every measured pass sees the same prefix-cache state (prompts cached: decode dominates).
    ``ignore_eos=False``: requests end at the model's end of turn, as a chat client's do."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    workload = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]

    saved = {k: os.environ.get(k) for k in row.env}
    os.environ.update(row.env)  # read where the engine's processes start
    try:
        engine = async_engine(model=target, speculative_config=row.speculative_config, disable_log_stats=False,
                              **engine_kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    params = {p: SamplingParams(temperature=temperature if p.temperature is None else p.temperature,
                                max_tokens=max_tokens, ignore_eos=ignore_eos,
                                structured_outputs=StructuredOutputsParams(regex=p.regex) if p.regex else None)
              for p in set(workload)}

    async def one(prompt: Prompt) -> Streamed:
        return await measure(_engine_stream(engine, prompt.text, params[prompt]))

    cells = []
    try:
        await closed_loop(one, workload, max(batch_sizes))
        for b in batch_sizes:
            passes = sorted([await _cell(row, one, workload, b) for _ in range(repeat)], key=lambda c: c.tokens_per_s)
            passes[len(passes) // 2].temperature = temperature
            cells.append(passes[len(passes) // 2])
    finally:
        stop_engine(engine)
    return cells


def run(
    *,
    target: str,
    tandem: str,
    baseline: str | None,
    prompts: Sequence[str | Prompt],
    batch_sizes: list[int],
    max_tokens: int,
    k: int,
    fallback_batch_size: int | None,
    engine_kwargs: dict[str, Any],
    repeat: int = 3,
    tandem_router: str | None = None,
    step_times: str | None = None,
    temperature: float = 0.0,
    ngram: bool = True,
    eagle3: str | None = None,
    guards: str | None = None,
    schedule: list[tuple[int, int, int]] | None = None,
    ignore_eos: bool = True,
) -> list[Cell]:
    """Every row at every batch size. ``step_times``: a directory the engine processes record each
    step's phases into (bench/steps.py); each cell then carries the summary of its measured pass."""
    if not prompts:
        raise TandemError("the prompts file is empty; pass a JSONL file with one {\"prompt\": ...} per line")
    if guards:
        server_defaults(guards)  # a bad value is refused before any engine starts
    rows = rows_for(tandem=tandem, baseline=baseline, k=k, fallback_batch_size=fallback_batch_size,
                    tandem_router=tandem_router, ngram=ngram, eagle3=eagle3, guards=guards,
                    schedule=schedule)
    cells: list[Cell] = []
    bar = progress_bar(total=len(rows), desc="engine rows", unit="row")
    with steps.recording(step_times):
        for row in rows:
            cells += asyncio.run(
                bench_row(
                    row,
                    target=target,
                    prompts=prompts,
                    batch_sizes=batch_sizes,
                    max_tokens=max_tokens,
                    repeat=repeat,
                    engine_kwargs=engine_kwargs,
                    temperature=temperature,
                    ignore_eos=ignore_eos,
                )
            )
            gc.collect()  # drop the shut-down engine now, not during interpreter exit
            bar.update(1)
    bar.close()
    if step_times:
        for c, summary in zip(cells, steps.per_window(step_times, [c.window for c in cells])):
            c.steps = summary
    base = {c.batch_size: c for c in cells if c.row == rows[0].name}
    greedy = temperature == 0 and not any(isinstance(p, Prompt) and p.temperature for p in prompts)
    for c in cells:
        ref = base[c.batch_size]
        c.speedup = round(c.tokens_per_s / ref.tokens_per_s, 3)
        c.speedup_over_tau = round(c.speedup / c.tau, 3)
        c.lossless = c.outputs == ref.outputs if greedy else None  # sampled outputs differ by design
    return cells


def markdown(cells: list[Cell]) -> str:
    head = (
        "| engine | batch | tokens/s | TTFT ms | ITL p50 ms | ITL p95 ms | τ | acceptance | speedup | "
        "speedup/τ | = target |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {c.row} | {c.batch_size} | {c.tokens_per_s:.1f} | {c.ttft_ms_mean:.0f} | {c.itl_ms_p50:.1f} | "
        f"{c.itl_ms_p95:.1f} | {c.tau:.2f} | {'—' if c.acceptance_rate is None else f'{c.acceptance_rate:.3f}'} | "
        f"**{c.speedup:.2f}×** | {c.speedup_over_tau:.2f} | {_lossless(c.lossless)} |"
        for c in cells
    ]
    return head + "\n".join(lines) + "\n"


def _lossless(ok: bool | None) -> str:
    return "—" if ok is None else "yes" if ok else "NO"


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(c.row for c in cells))
    sizes = sorted({c.batch_size for c in cells})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        mine = {c.batch_size: c for c in cells if c.row == r}
        xs = np.arange(len(sizes)) + i * width
        a.bar(xs, [mine[s].tokens_per_s for s in sizes], width, label=r)
        b.bar(xs, [mine[s].speedup for s in sizes], width, label=r)
    for ax, ylabel in ((a, "tokens/s"), (b, "speed-up vs target alone")):
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, [f"batch {s}" for s in sizes])
        ax.set_ylabel(ylabel)
    b.axhline(1.0, color="k", lw=0.8)
    a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
