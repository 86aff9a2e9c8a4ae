"""What several commands share: list and range parsers, the k schedule flag, the in-process
engine flags, and the report every benchmark writes (``tandem_vllm.report``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tandem_vllm import report
from tandem_vllm.errors import TandemError


def _ints(text: str, least: int, example: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as {example}") from None
    if any(v < least for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least {least}")
    return values


def int_list0(text: str) -> list[int]:
    """Indices such as taps: 0,15,30."""
    return _ints(text, 0, "0,15,30")


def int_list(text: str) -> list[int]:
    """Counts such as batch sizes: 1,4,16."""
    return _ints(text, 1, "1,4,16")


def blocks(text: str) -> tuple[int, int]:
    """``--block-size``: ``2`` -> (0, 2), ``1-4`` -> (1, 4)."""
    return _range(text, "--block-size", (1, 4))


def token_range(text: str) -> tuple[int, int]:
    """``--prompt-tokens``: ``16-96``, or one length ``64`` (= 64-64)."""
    lo, hi = _range(text, "--prompt-tokens", (16, 64))
    return (lo or hi, hi)


def _range(text: str, flag: str, example: tuple[int, int]) -> tuple[int, int]:
    from tandem_vllm.train.args import parse_blocks

    try:
        return parse_blocks(text, flag, example)
    except TandemError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resume(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"{text!r}: --resume takes no value, or 'auto'")
    return text


def k_schedule(source: str, flag: str) -> list[tuple[int, int, int]]:
    from tandem_vllm.speculation import read_k_schedule
    from tandem_vllm.vllm_adapter.engine import validate_k_schedule

    return validate_k_schedule(read_k_schedule(source), f"{flag} {source}")


def engine_flags(p: argparse.ArgumentParser, *, batch_sizes: list[int]) -> None:
    """Flags every in-process engine benchmark shares: prompts, batch sizes, lengths, engine size, report."""
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line (bench engine: optional '
                   '"regex" -- vLLM structured outputs -- and "temperature" per request)')
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--skip-prompts", type=int, default=0, help="start after this many prompts (measure a "
                   "schedule on prompts other than those it is judged on)")
    p.add_argument("--batch-sizes", type=int_list, default=batch_sizes)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (rows checked against target alone); > 0 samples, drafters drafting probabilistically")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    p.add_argument("--plot", help="PNG path")


def engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                kv_cache_memory_bytes=a.kv_cache_mib * 2**20, enforce_eager=True, seed=0)


def step_report(rows: list[tuple[str, int, Any]], plot: str | None, labels: tuple[str, str], title: str) -> str:
    """The --step-times table (returned) and, with --plot, its stacked bars beside the plot
    (out/engine.png -> out/engine_steps.png). rows: (name, batch or concurrency, steps.summary)."""
    from tandem_vllm.bench import steps

    if plot:
        path = Path(plot)
        steps.plot(rows, path.with_name(path.stem + "_steps" + path.suffix), title, unit=labels[1])
    return f"\n{title} (ms per step, means over the reported pass):\n\n" + steps.markdown(rows, labels)


def write_report(path: str | Path, doc: dict[str, Any], table: str) -> None:
    """The command's report: JSON at ``path``, the markdown table beside it, the table on stdout."""
    report.write(path, doc, table)
    print(table)
