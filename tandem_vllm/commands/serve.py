"""``tandem-vllm serve``: its flags are ServeConfig's fields (serve/config.py), plus where to listen."""

from __future__ import annotations

import argparse
from typing import Any

from tandem_vllm.cli_fields import add_field_flags, passed
from tandem_vllm.commands import common


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.serve.config import ServeConfig
    from tandem_vllm.serve.launch import serve_forever

    fields = passed(a, set(ServeConfig.model_fields) - {"vllm_args"})
    if a.k_schedule is not None:
        fields["k_schedule"] = common.k_schedule(a.k_schedule, "--k-schedule")
    fields["vllm_args"] = a.vllm_args[1:] if a.vllm_args[:1] == ["--"] else a.vllm_args
    serve_forever(ServeConfig.parse(fields), host=a.host, port=a.port, grpc_port=a.grpc_port,
                  timeout_s=a.start_timeout, request_timeout_s=a.request_timeout)


def add(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve on Ray Serve: OpenAI HTTP API + gRPC (no --model: the demo pair)",
                       epilog="Anything after `--` is passed to vLLM's own `vllm serve` parser.")
    from tandem_vllm.serve.config import ServeConfig

    # every ServeConfig field is a flag, with its description as help (vllm_args: anything after `--`)
    add_field_flags(s, ServeConfig, skip=("vllm_args",), types_={"k_schedule": str},
                    aliases={"k_schedule": ["--speculation-schedule"]},
                    metavars={"k_schedule": "JSON|FILE", "speculative_config": "JSON"})
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--grpc-port", type=int, default=9000)
    s.add_argument("--request-timeout", type=float, help="seconds before a request is cut off (504 / DEADLINE_EXCEEDED)")
    s.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the replicas to be ready")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=run)
