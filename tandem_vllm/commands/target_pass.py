"""``tandem-vllm target-pass``: one pass of the target, stored for drafter training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem_vllm.commands import common


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.train.target_pass import PassSettings, run

    settings = PassSettings(target=a.target, gen_data=tuple(a.gen_data), out=a.out, taps=tuple(a.taps), top_k=a.top_k,
                            seq_len=a.seq_len, shard_rows=a.shard_rows, batch_size=a.batch_size, max_rows=a.max_rows,
                            device=a.device)
    done = run(settings)
    print(json.dumps({"out": str(a.out), "rows": done["rows"], "shards": done["shards"], "pass": done.get("pass")}))


def add(sub: Any) -> None:
    tp = sub.add_parser("target-pass", help="one pass of the target over gen-data sequences, stored for drafter training",
                        description="Writes resumable shards of the target's hidden states at --taps and its top-k "
                                    "next-token log-probabilities; `train --target-pass DIR` trains from them.")
    tp.add_argument("--target", type=Path, required=True)
    tp.add_argument("--gen-data", type=Path, nargs="+", required=True, help="`tandem-vllm gen-data` directories")
    tp.add_argument("--out", type=Path, required=True)
    tp.add_argument("--taps", type=common.int_list0, required=True,
                    help="hidden-state indices to store, e.g. 0,1,15,29,30 (0 = embedding output, L = final normed state)")
    tp.add_argument("--top-k", type=int, default=64)
    tp.add_argument("--seq-len", type=int, default=256, help="row length (the trainer's --seq-len)")
    tp.add_argument("--shard-rows", type=int, default=256)
    tp.add_argument("--batch-size", type=int, default=8)
    tp.add_argument("--max-rows", type=int, default=0, help="only the first N rows (0: all)")
    tp.add_argument("--device", default="auto")
    tp.set_defaults(func=run)
