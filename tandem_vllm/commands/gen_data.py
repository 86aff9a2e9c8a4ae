"""``tandem-vllm gen-data``: training data from the target itself."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tandem_vllm.cli_fields import add_dataclass_flags, passed
from tandem_vllm.commands import common


def gen_settings(a: argparse.Namespace) -> Any:
    """The GenSettings a `gen-data` command line means (validated); flags left out keep its defaults."""
    from tandem_vllm.train import gen_data

    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in passed(a, a.gen_fields).items()}
    return gen_data.GenSettings(**given)


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of vllm.LLM arguments, got {text!r}")
    return value


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
    from tandem_vllm.train.gen_data import GenSettings

    gd = sub.add_parser("gen-data", help="training data from the target itself: its continuations of prompts",
                        description="Writes JSONL shards of token ids (prompt + the target's completion, per temperature) "
                                    "and a manifest naming the target; rerun the same command to resume.")
    special = {"prompt_tokens": {"type": common.token_range, "metavar": "N|LO-HI"},
               "engine_args": {"type": json_object, "metavar": "JSON"}}
    gd.set_defaults(gen_fields=add_dataclass_flags(gd, GenSettings, required=("target", "out"), special=special))
    gd.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on a Ray cluster with ray.data (no ADDRESS: a local Ray); --out must be shared storage")
    gd.add_argument("--engines", type=int, default=1, help="--ray: vLLM engines (actors)")
    gd.add_argument("--num-gpus-per-engine", type=float, default=0.0, help="--ray: GPUs per engine actor")
    gd.set_defaults(func=run)
