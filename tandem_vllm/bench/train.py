"""``tandem-vllm bench train``: one training command under each launcher, side by side in one run.

Each mode runs the same ``tandem-vllm train`` arguments (same global batch, steps and data) as a
fresh process tree -- one process, ``torchrun`` with DDP or FSDP2, Ray Train -- and reads the
throughput the trainer itself reports in ``train_summary.json``: tokens/s of the whole job and the
share of step time spent in the frozen target's forward. With ``nproc`` processes on a machine of
C cores each process gets C / nproc threads, so the comparison is at equal hardware.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tandem_vllm.errors import TandemError

MODES = ("single", "ddp", "fsdp", "ray")


def command(mode: str, train_argv: list[str], out: Path, nproc: int) -> list[str]:
    argv = ["train", *train_argv, "--out", str(out)]
    if mode == "single":
        return [sys.executable, "-m", "tandem_vllm.cli", *argv]
    if mode in ("ddp", "fsdp"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "tandem_vllm.cli", *argv, "--parallel", mode]
    if mode == "ray":
        return [sys.executable, "-m", "tandem_vllm.cli", *argv, "--ray", "--workers", str(nproc)]
    raise TandemError(f"unknown mode {mode!r}; pick from {', '.join(MODES)}")


def run(train_argv: list[str], *, modes: list[str], nproc: int, out: Path, timeout_s: float = 3600) -> list[dict[str, Any]]:
    if "--out" in train_argv or "--ray" in train_argv or "--parallel" in train_argv:
        raise TandemError("pass the training arguments without --out, --ray or --parallel: each mode sets its own")
    cores = os.cpu_count() or 1
    rows = []
    for mode in modes:
        run_dir = out / mode
        shutil.rmtree(run_dir, ignore_errors=True)
        threads = cores if mode == "single" else max(1, cores // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        p = subprocess.run(command(mode, train_argv, run_dir, nproc), env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
            raise TandemError(f"mode {mode} failed (exit {p.returncode}): " + " | ".join(tail))
        summary = json.loads((run_dir / "train_summary.json").read_text())
        rows.append({"mode": mode, "processes": 1 if mode == "single" else nproc, "threads_per_process": threads,
                     "wall_s": round(wall, 1), **summary["throughput"], "eval": summary["eval"]})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| launcher | processes × threads | tokens/s | target forward share | drafter fwd+bwd+opt share | "
            "steps timed (s) | wall incl. start (s) |\n|---|---|---|---|---|---|---|\n")
    names = {"single": "one process", "ddp": "torchrun, DDP", "fsdp": "torchrun, FSDP2", "ray": "Ray Train, DDP"}
    return head + "".join(
        f"| {names[r['mode']]} | {r['processes']} × {r['threads_per_process']} | {r['tokens_per_s']:.0f} | "
        f"{r['target_forward_share']:.0%} | {r['student_share']:.0%} | {r['steps_timed']:.1f} | {r['wall_s']:.1f} |\n"
        for r in rows)
