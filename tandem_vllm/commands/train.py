"""``tandem-vllm train``: its flags are TrainArgs' fields (train/args.py), plus the Ray Train launcher's."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tandem_vllm.cli_fields import add_dataclass_flags, passed_frozen
from tandem_vllm.commands import common


def train_args(a: argparse.Namespace) -> Any:
    """The TrainArgs a `train` command line means (validated); flags left out keep TrainArgs' defaults."""
    from tandem_vllm.train.args import ModelDims, TrainArgs

    given: dict[str, Any] = passed_frozen(a, a.train_fields)
    dims = {k: given.pop(k) for k in [f.name for f in dataclasses.fields(ModelDims)] if k in given}
    if "heads" in dims:
        dims.setdefault("kv_heads", dims["heads"])
    if "block_size" in given:
        given["block_min"], given["block_size"] = given["block_size"]
    return TrainArgs(**given, dims=ModelDims(**dims))


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.train.trainer import train

    args = train_args(a)
    if a.ray is not None:
        from tandem_vllm.train.ray_train import train_on_ray

        summary = train_on_ray(args, address=a.ray, workers=a.workers, use_gpu=a.use_gpu)
        print(json.dumps({"out": str(args.out), "steps": summary["steps"], "eval": summary["eval"],
                          "throughput": summary.get("throughput")}))
        return
    res = train(args)
    if res.rank == 0:
        print(json.dumps({"out": str(res.out), "steps": res.steps, "eval": res.metrics}))


def add(sub: Any) -> None:
    from tandem_vllm.train.args import TrainArgs

    t = sub.add_parser("train", help="train a Tandem drafter, a standalone baseline drafter, or a plain LM")
    special = {"block_size": {"type": common.blocks, "metavar": "N|LO-HI"},
               "resume": {"nargs": "?", "const": True, "type": common.resume, "metavar": "auto"}}
    t.set_defaults(train_fields=add_dataclass_flags(t, TrainArgs, required=("out",), special=special))
    t.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="train with Ray Train on this Ray cluster (no ADDRESS: RAY_ADDRESS's, else a local Ray); --out "
                        "must be storage every worker shares")
    t.add_argument("--workers", type=int, default=2, help="--ray: training workers (processes)")
    t.add_argument("--use-gpu", action="store_true", help="--ray: one GPU per worker")
    t.set_defaults(func=run)
