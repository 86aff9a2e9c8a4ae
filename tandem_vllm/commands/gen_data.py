"""``tandem-vllm gen-data``: training data from the target itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem_vllm.errors import TandemError


def gen_settings(a: argparse.Namespace) -> Any:
    """The GenSettings a `gen-data` command line means (validated)."""
    from tandem_vllm.train import gen_data
    from tandem_vllm.train.args import parse_blocks

    lo, hi = parse_blocks(a.prompt_tokens)
    try:
        engine_args = json.loads(a.engine_args)
    except ValueError:
        raise TandemError(f"--engine-args is not a JSON object: {a.engine_args!r}") from None
    if not isinstance(engine_args, dict):
        raise TandemError(f"--engine-args must be a JSON object of vllm.LLM arguments, got {a.engine_args!r}")
    return gen_data.GenSettings(
        target=a.target, out=a.out, corpus=tuple(a.corpus or ()), prompts=a.prompts, num_prompts=a.num_prompts,
        prompt_tokens=(lo or hi, hi), temperatures=tuple(a.temperatures), top_p=a.top_p, max_tokens=a.max_tokens,
        shard_size=a.shard_size, seed=a.seed, engine_args=engine_args, backend=a.backend,
    )


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.train import gen_data

    settings = gen_settings(a)
    if a.ray is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=a.ray or None)
        done = gen_data.run_on_ray(settings, engines=a.engines, num_gpus_per_engine=a.num_gpus_per_engine)
    else:
        done = gen_data.generate(settings)
    print(json.dumps({"out": str(a.out), "prompts": done["prompts"], "shards": done["shards"],
                      "written_shards": done["written_shards"], "written_tokens": done["written_tokens"]}))


def add(sub: Any) -> None:
    gd = sub.add_parser("gen-data", help="training data from the target itself: its continuations of prompts",
                        description="Writes JSONL shards of token ids (prompt + the target's completion, per temperature) "
                                    "and a manifest naming the target; rerun the same command to resume.")
    gd.add_argument("--target", type=Path, required=True, help="the target model directory")
    gd.add_argument("--out", type=Path, required=True, help="output directory (shards + manifest.json)")
    src = gd.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, nargs="+", help="text/JSONL files to cut prompt windows from")
    src.add_argument("--prompts", type=Path, help='JSONL of {"prompt": ...} or {"messages": [...]} rows')
    gd.add_argument("--num-prompts", type=int, default=1024, help="corpus windows (or at most this many prompt rows)")
    gd.add_argument("--prompt-tokens", default="16-96", help="corpus window length in tokens, a range such as 16-96")
    gd.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="one completion per prompt each; 0 = greedy")
    gd.add_argument("--top-p", type=float, default=1.0)
    gd.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (match the trainer's --seq-len)")
    gd.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    gd.add_argument("--seed", type=int, default=0)
    gd.add_argument("--engine-args", default="{}", help='extra vllm.LLM arguments as JSON, e.g. \'{"dtype": "bfloat16"}\'')
    gd.add_argument("--backend", choices=("auto", "vllm", "torch"), default="auto",
                    help="vllm: vLLM's offline engine; torch: the reference decoder (no vLLM needed, CUDA when "
                         "present); auto: vllm where it is installed")
    gd.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on a Ray cluster with ray.data (no ADDRESS: a local Ray); --out must be shared storage")
    gd.add_argument("--engines", type=int, default=1, help="--ray: vLLM engines (actors)")
    gd.add_argument("--num-gpus-per-engine", type=float, default=0.0, help="--ray: GPUs per engine actor")
    gd.set_defaults(func=run)
