"""``tandem-vllm train-router``: the adaptive block-length router of a Tandem drafter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.train.router import RouterArgs, train_router

    args = RouterArgs(target=a.target, drafter=a.drafter, data=list(a.data), out=a.out, k=a.k, seq_len=a.seq_len,
                      max_positions=a.max_positions, epochs=a.epochs, lr=a.lr, top_k=a.top_k, hidden=a.hidden,
                      threshold=a.threshold, seed=a.seed)
    metrics = train_router(args)
    print(json.dumps({"out": str(a.out), **metrics}))


def add(sub: Any) -> None:
    r = sub.add_parser("train-router", help="fit the adaptive block-length router of a Tandem drafter",
                       description="Writes a new drafter directory (--out): the drafter's files plus the router. "
                                   "Point vLLM or the decoders at it to draft adaptively.")
    r.add_argument("--target", type=Path, required=True, help="the target the drafter was trained for")
    r.add_argument("--drafter", type=Path, required=True, help="Tandem drafter directory")
    r.add_argument("--data", type=Path, nargs="+", required=True, help="text or JSONL files (training text)")
    r.add_argument("--out", type=Path, required=True, help="new drafter directory with the router")
    r.add_argument("--k", type=int, default=3, help="drafts per step the router will serve (block length)")
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--max-positions", type=int, default=60_000, help="labelled positions collected")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--top-k", type=int, default=4, help="top-k probabilities and embeddings used as features")
    r.add_argument("--hidden", type=int, default=64, help="router MLP width")
    r.add_argument("--threshold", type=float, default=0.5, help="keep drafting while P(accept) >= this")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=run)
