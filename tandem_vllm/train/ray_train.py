"""The training loop on a Ray cluster: Ray Train's ``TorchTrainer`` runs ``trainer.train`` on N workers.

Ray Train starts the process group (gloo on CPU workers, NCCL on GPU ones) and places each worker
on its device; the loop finds the group up and behaves as one rank of a torchrun job: the same
data shares, gradients and checkpoints (distributed.py). The run directory (``--out``) must be on
storage every worker sees (a PVC on KubeRay); rank 0 writes checkpoints and the exported model
there, and a failed job resumes from them with ``--resume`` -- on Ray or with one process.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tandem_vllm.errors import TandemError
from tandem_vllm.train.args import TrainArgs


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its device from Ray, then the ordinary loop."""
    import ray.train.torch

    from tandem_vllm.train.trainer import train

    args: TrainArgs = config["args"]
    device = ray.train.torch.get_device()
    train(dataclasses.replace(args, device=str(device) if config["use_gpu"] else "cpu"))


def train_on_ray(args: TrainArgs, *, address: str, workers: int, use_gpu: bool = False) -> dict[str, Any]:
    """Train with ``workers`` Ray Train workers on the cluster at ``address`` ("": the one RAY_ADDRESS
    names, else a Ray started here). Returns the run's ``train_summary.json``."""
    if workers < 1:
        raise TandemError(f"--workers {workers}: need at least 1")
    if args.batch_size < workers:
        raise TandemError(f"--batch-size {args.batch_size} is shared by {workers} workers; give each one a row "
                          f"(--batch-size >= {workers})")
    try:
        import ray
        import ray.train.torch  # Ray Train present: fail here, before Ray starts
    except ImportError as e:
        raise TandemError(f"--ray needs Ray Train ({e.name} is missing): pip install 'ray[train]'") from None
    out = args.out.resolve()
    args = dataclasses.replace(args, out=out)
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address or None)
    try:
        return _fit(args, out, workers, use_gpu)
    finally:
        if owned:  # a Ray this call started ends with it (a driver's later ray.init must not find it)
            ray.shutdown()


def _fit(args: TrainArgs, out: Any, workers: int, use_gpu: bool) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"args": args, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"tandem-train-{out.name}", storage_path=str(out / "ray")),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; keep its last line
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise TandemError(f"Ray Train job failed: {message}; the last checkpoint in {out / 'checkpoints'} "
                          "resumes it (--resume, on Ray or one process)") from None
    summary = out / "train_summary.json"
    if not summary.is_file():
        raise TandemError(f"Ray Train finished but {summary} is missing: is --out on storage every worker shares?")
    return dict(json.loads(summary.read_text()))
