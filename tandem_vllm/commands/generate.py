"""``tandem-vllm generate``: decode prompts with the reference decoders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.decoding.speculate import Sampling
    from tandem_vllm.demo.run import run_generation

    sampling = Sampling(temperature=a.temperature, top_p=a.top_p)
    run_generation(target=a.target, drafter=a.drafter, prompts=a.prompt, k=a.k, max_new_tokens=a.max_new_tokens,
                   sampling=sampling, mode=a.mode, seed=a.seed)


def add(sub: Any) -> None:
    g = sub.add_parser("generate", help="decode prompts with the reference Tandem decoders")
    g.add_argument("--target", type=Path, required=True)
    g.add_argument("--drafter", type=Path, help="Tandem drafter (omit for target alone)")
    g.add_argument("--prompt", nargs="+", required=True)
    g.add_argument("--k", type=int, default=5, help="gamma: draft tokens per target pass")
    g.add_argument("--mode", choices=["speed", "standalone"], default="speed")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run)
