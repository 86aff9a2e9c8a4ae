"""Distributed training on CPU (gloo): 2 processes under torchrun or Ray Train reach the parameters one
process reaches on the same global batch, a job whose worker dies ends with a resumable checkpoint,
and the throughput report. ``pytest -k distributed`` selects these."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tandem_vllm.errors import TandemError
from tandem_vllm.train.args import ModelDims, TrainArgs
from tandem_vllm.train.distributed import World
from tandem_vllm.train.ray_train import train_on_ray
from tandem_vllm.train.trainer import train

# batch 3 over 2 ranks: shares of 2 and 1 rows, so the ranks' token counts differ and only a loss
# weighed by the global count averages to the one-process gradient
SETTINGS = dict(seq_len=32, batch_size=3, steps=4, warmup=1, eval_every=2, eval_batches=1, save_every=2)


def _args(root: Path, out: str, kind: str = "tandem", **kw) -> TrainArgs:
    base = dict(kind=kind, out=root / out, data=(root / "data.txt",), target=root / "target",
                dims=ModelDims(layers=1, hidden=32), progress=False, device="cpu", **SETTINGS)
    base.update(kw)
    return TrainArgs(**base)


def _cli(a: TrainArgs) -> list[str]:
    argv = ["train", "--kind", a.kind, "--target", str(a.target), "--data", *map(str, a.data), "--out", str(a.out),
            "--layers", str(a.dims.layers), "--hidden", str(a.dims.hidden), "--seq-len", str(a.seq_len),
            "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--eval-every", str(a.eval_every), "--save-every", str(a.save_every), "--device", "cpu",
            "--parallel", a.parallel, "--grad-accum", str(a.grad_accum)]
    return argv + (["--resume"] if a.resume else [])


def _torchrun(a: TrainArgs, nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tandem_vllm.cli", *_cli(a)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _run(a: TrainArgs, nproc: int = 2, timeout: float = 300) -> str:
    p = _torchrun(a, nproc)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def _weights(d: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors"
    return load_file(str(d / name))


def _assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def _losses(d: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(train_workdir):
    """The reference: one process, the whole global batch."""
    train(_args(train_workdir, "dist-single"))
    return train_workdir / "dist-single"


@pytest.mark.parametrize("kind", ["baseline", "eagle3"])
def test_distributed_ddp_other_drafter_kinds_match_one_process(train_workdir, kind):
    """The standalone drafter (tied embeddings) and the EAGLE-3 head (a loss per unrolled step)."""
    one = _args(train_workdir, f"dist-{kind}-1", kind=kind)
    train(one)
    two = _args(train_workdir, f"dist-{kind}-2", kind=kind)
    _run(two)
    _assert_same_weights(one.out, two.out)


def test_distributed_world_shares_cover_the_batch_once():
    for n in range(1, 9):
        for size in range(1, n + 1):
            rows = [i for r in range(size) for i in range(n)[World(r, size).share(n)]]
            assert rows == list(range(n))


def test_distributed_ddp_two_ranks_reach_the_one_process_parameters(train_workdir, single):
    out = _run(_args(train_workdir, "dist-ddp"))
    assert out.count('"steps": 4') == 1, out[-2000:]  # the result is printed by rank 0 only
    _assert_same_weights(single, train_workdir / "dist-ddp")
    torch.testing.assert_close(_losses(single), _losses(train_workdir / "dist-ddp"), atol=1e-5, rtol=1e-5)
    summary = json.loads((train_workdir / "dist-ddp" / "train_summary.json").read_text())
    tp = summary["throughput"]
    assert tp["world_size"] == 2 and tp["parallel"] == "ddp" and tp["tokens_per_s"] > 0
    assert 0 < tp["target_forward_share"] < 1 and tp["target_forward_share"] + tp["student_share"] == pytest.approx(1)


def test_distributed_fsdp_two_ranks_reach_the_one_process_parameters(train_workdir, single):
    _run(_args(train_workdir, "dist-fsdp", parallel="fsdp"))
    _assert_same_weights(single, train_workdir / "dist-fsdp")
    assert json.loads((train_workdir / "dist-fsdp" / "train_summary.json").read_text())["throughput"]["parallel"] == "fsdp"


def test_distributed_gradient_accumulation_matches_one_process(train_workdir):
    """grad_accum 2 under DDP (no all-reduce on the first micro-batch) == one process."""
    one = _args(train_workdir, "dist-accum-1", grad_accum=2, steps=2)
    train(one)
    two = _args(train_workdir, "dist-accum-2", grad_accum=2, steps=2)
    _run(two)
    _assert_same_weights(one.out, two.out)


def test_distributed_a_dead_worker_ends_the_job_and_one_process_resumes_it(train_workdir):
    """SIGKILL one rank after the first checkpoint: the job ends (no hang), the survivor says how to
    resume, and the checkpoint written by 2 processes resumes on 1 to the parameters an
    uninterrupted one-process run reaches."""
    steps = 60  # long enough that the kill lands mid-run
    reference = _args(train_workdir, "dist-killed-ref", steps=steps, save_every=2, eval_every=steps)
    train(reference)
    a = _args(train_workdir, "dist-killed", steps=steps, save_every=2, eval_every=steps)
    p = _torchrun(a, start_new_session=True)
    latest = a.out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    try:
        while not latest.exists():
            assert p.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "tandem_vllm.cli" in " ".join(c.cmdline())]
        rank1 = next(c for c in workers if c.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=120)  # torchrun tears the other rank down; no hang
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0, out[-2000:]
    assert not (a.out / "train_summary.json").exists()
    # the survivor names itself and the checkpoint when its collective fails first; when torchrun's agent
    # stops it first, torchrun's own summary names the dead rank and its signal
    ours = "rank 0: training failed" in out and "resumes it with --resume, on any number of processes" in out
    assert ours or ("rank      : 1" in out and "SIGKILL" in out), out[-3000:]
    done = int(latest.read_text().strip().split("-")[1])
    assert 2 <= done < steps, done
    res = train(_args(train_workdir, "dist-killed", steps=steps, save_every=2, eval_every=steps, resume=True))
    assert res.steps == steps
    _assert_same_weights(reference.out, a.out)


def test_distributed_ray_train_two_workers_trains_the_tiny_pair(train_workdir, single):
    summary = train_on_ray(_args(train_workdir, "dist-ray"), address="", workers=2)
    assert summary["steps"] == 4 and summary["throughput"]["world_size"] == 2
    _assert_same_weights(single, train_workdir / "dist-ray")


def test_distributed_refusals_name_the_fix(train_workdir):
    with pytest.raises(TandemError, match="--batch-size 1 is shared by 2 workers"):
        train_on_ray(_args(train_workdir, "dist-bad", batch_size=1), address="", workers=2)
    p = _torchrun(_args(train_workdir, "dist-bad", batch_size=1))
    out, _ = p.communicate(timeout=180)
    assert p.returncode != 0 and "give every process at least one row (--batch-size >= 2)" in out
