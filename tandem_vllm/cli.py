"""``tandem-vllm``: one module per command in ``tandem_vllm/commands`` (its flags and what it runs);
this file only assembles them and turns a TandemError into one line and exit status 2.

  train, gen-data, import-gguf, target-pass, train-router   training (commands/train.py, gen_data.py, ...)
  eval, generate                                          quality report, reference decoding
  bench engine | suite | schedule | train | serve         measurements (commands/bench.py)
  serve                                                   the Ray Serve app (commands/serve.py)
  demo build | ship | run                                 the demo pairs (commands/demo.py)
"""

from __future__ import annotations

import argparse
import sys

from tandem_vllm.commands import COMMANDS
from tandem_vllm.errors import TandemError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem-vllm", description="Tandem Transformers for vLLM: train, evaluate, serve.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        a.func(a)
    except TandemError as e:
        print(f"tandem-vllm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("tandem-vllm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
