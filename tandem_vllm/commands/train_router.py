"""``tandem-vllm train-router``: the adaptive block-length router of a Tandem drafter; its flags are
RouterArgs' fields (train/router.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tandem_vllm.cli_fields import add_dataclass_flags, passed_frozen


def router_args(a: argparse.Namespace) -> Any:
    """The RouterArgs the command line means (its file lists as tuples)."""
    from tandem_vllm.train.router import RouterArgs

    given: dict[str, Any] = passed_frozen(a, a.router_fields)
    return RouterArgs(**given)


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.train.router import train_router

    metrics = train_router(router_args(a))
    print(json.dumps({"out": str(a.out), **metrics}))


def add(sub: Any) -> None:
    from tandem_vllm.train.router import RouterArgs

    r = sub.add_parser("train-router", help="fit the adaptive block-length router of a Tandem drafter",
                       description="Writes a new drafter directory (--out): the drafter's files plus the router. "
                                   "Point vLLM or the decoders at it to draft adaptively.")
    r.set_defaults(router_fields=add_dataclass_flags(r, RouterArgs, required=("target", "drafter", "out")),
                   func=run)
