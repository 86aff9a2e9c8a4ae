"""The Ray Serve application: ``build_app`` is the ``import_path`` target of deploy/serve.yaml.

Each replica of ``TandemServer`` hosts one vLLM ``AsyncLLM`` (Tandem speculation comes from the
plugin this package registers with vLLM) and answers
  * HTTP with vLLM's own OpenAI-compatible app (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics, API-key checks, OpenAI error shapes), built late on the replica so it binds
    this replica's engine, behind tandem-vllm's limits and request logging;
  * gRPC (``tandem.v1.TandemGeneration`` and ``grpc.health.v1.Health``) through Serve's gRPC proxy,
    which calls the methods below by rpc name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from tandem_vllm.serve.chat_template import tool_support
from tandem_vllm.serve.config import ServeConfig, replica_options
from tandem_vllm.serve.middleware import LimitsAndLogging
from tandem_vllm.vllm_adapter.stats import spec_metrics_of

logger = logging.getLogger("tandem_vllm.serve")
APP_NAME = "tandem"


def _log_to_stderr() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@serve.ingress()
class TandemServer:
    """One replica: a vLLM async engine with Tandem speculation, on HTTP and gRPC."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        from tandem_vllm.vllm_adapter import engine as vllm_engine
        from tandem_vllm.vllm_adapter.guards import ENV as GUARDS_ENV
        from tandem_vllm.vllm_adapter.guards import Guards
        from tandem_vllm.vllm_adapter.stats import observe_requests, stat_loggers

        _log_to_stderr()
        self.cfg = ServeConfig.model_validate(config).with_env_secrets()
        if self.cfg.speculation_guards:  # read by the scheduler in the engine's process, started below
            os.environ[GUARDS_ENV] = Guards.parse(self.cfg.speculation_guards, "speculation_guards").to_env()
        self.args = vllm_engine.serve_args(self.cfg.vllm_cli(on_cpu=vllm_engine.on_cpu()))
        self.engine = vllm_engine.serve_engine(self.args, stat_loggers=stat_loggers(self.cfg.ray_metrics))
        self.model_name = self.cfg.served_model_name or self.cfg.model or ""
        self.replica = serve.get_replica_context().replica_id.unique_id
        observe_requests(self.engine, self.model_name)
        self.max_model_len = self.engine.model_config.max_model_len
        self.spec_method, self.spec_k, self.drafter = vllm_engine.speculation_of(self.engine)
        logger.info(json.dumps({"event": "replica_ready", "replica": self.replica, "model": self.model_name, "speculation": self.spec_method,
                                "num_speculative_tokens": self.spec_k, "max_model_len": self.max_model_len}))

    async def __serve_build_asgi_app__(self) -> Any:
        from tandem_vllm.vllm_adapter.engine import chat_templates, openai_app

        app = await openai_app(self.engine, self.args)
        app.add_middleware(LimitsAndLogging, max_request_bytes=self.cfg.max_request_bytes, max_n=self.cfg.max_n,
                           extra_roles=tuple(self.cfg.extra_chat_roles), api_key=self.cfg.api_key, replica=self.replica,
                           tool_support=tool_support(chat_templates(self.engine, self.args)))
        return app

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises EngineDeadError: Serve replaces this replica

    async def __del__(self) -> None:
        # Serve waits up to graceful_shutdown_timeout_s for in-flight requests first; what is
        # left is aborted with the engine, which stops as `vllm serve` stops it.
        from tandem_vllm.vllm_adapter.engine import stop_engine

        engine = getattr(self, "engine", None)
        if engine is not None:
            stop_engine(engine)

    # ---- gRPC: tandem.v1.TandemGeneration ----
    async def Generate(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        from tandem_vllm.serve import grpc_api as g

        try:
            g.check_api_key(grpc_context, self.cfg.api_key)
            prompt, params = g.prompt_text(request.prompt), g.sampling_params(request.sampling)
        except g.RpcError as e:
            _fail(grpc_context, e)
        request_id = request.request_id or uuid.uuid4().hex
        sent_text, sent_ids = 0, 0
        async for out in self._run(grpc_context, prompt, params, request_id):
            o = out.outputs[0]
            msg = g.stream_message(request_id, o.text[sent_text:], list(o.token_ids[sent_ids:]), out.finished,
                                   o.finish_reason, len(out.prompt_token_ids or []), len(o.token_ids),
                                   spec_metrics_of(o))
            sent_text, sent_ids = len(o.text), len(o.token_ids)
            yield msg

    async def Complete(self, request: Any, grpc_context: Any) -> Any:
        from tandem_vllm.serve import grpc_api as g

        try:
            g.check_api_key(grpc_context, self.cfg.api_key)
            prompt, params = g.prompt_text(request.prompt), g.sampling_params(request.sampling)
        except g.RpcError as e:
            _fail(grpc_context, e)
        request_id = request.request_id or uuid.uuid4().hex
        final = None
        async for out in self._run(grpc_context, prompt, params, request_id):
            final = out
        assert final is not None  # the engine always ends a request with a finished output
        o = final.outputs[0]
        return g.complete_message(request_id, o.text, list(o.token_ids), o.finish_reason,
                                  len(final.prompt_token_ids or []), spec_metrics_of(o))

    async def ModelInfo(self, request: Any, grpc_context: Any) -> Any:
        from tandem_vllm.serve import grpc_api as g
        from tandem_vllm.vllm_adapter.stats import totals

        try:
            g.check_api_key(grpc_context, self.cfg.api_key)
        except g.RpcError as e:
            _fail(grpc_context, e)
        t = totals()
        return g.pb.ModelInfoResponse(
            model=self.model_name, max_model_len=self.max_model_len, drafter=self.drafter,
            speculative_method=self.spec_method, num_speculative_tokens=self.spec_k,
            speculation=g.pb.SpeculationStats(num_drafts=t.num_drafts, num_draft_tokens=t.num_draft_tokens,
                                              num_accepted_tokens=t.num_accepted_tokens,
                                              mean_acceptance_length=t.mean_acceptance_length))

    async def _run(self, grpc_context: Any, prompt: str, params: Any, request_id: str) -> AsyncIterator[Any]:
        """Stream the engine's outputs; map engine refusals to gRPC codes; abort if the client leaves."""
        import grpc

        from tandem_vllm.serve import grpc_api as g
        from tandem_vllm.vllm_adapter.engine import EngineDeadError, VLLMValidationError

        logger.info(json.dumps({"event": "grpc_request", "request_id": request_id, "max_tokens": params.max_tokens}))
        finished = False
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                finished = out.finished
                yield out
        except EngineDeadError as e:
            _fail(grpc_context, g.RpcError(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}"))
        except (ValueError, VLLMValidationError) as e:  # vLLM's input checks: prompt longer than the context, ...
            _fail(grpc_context, g.invalid(str(e)))
        finally:
            if not finished:  # client cancelled or deadline passed: free the request's KV slots now
                await self.engine.abort(request_id)

    # ---- gRPC: grpc.health.v1.Health ----
    async def Check(self, request: Any, grpc_context: Any) -> Any:
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=await self._health())

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        from grpc_health.v1 import health_pb2

        last = None
        for _ in range(3600):  # one status per change, polled each second, for at most an hour
            status = await self._health()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

    async def _health(self) -> int:
        from grpc_health.v1 import health_pb2

        try:
            await self.engine.check_health()
            return health_pb2.HealthCheckResponse.SERVING
        except Exception:
            return health_pb2.HealthCheckResponse.NOT_SERVING


def _fail(grpc_context: Any, error: Any) -> None:
    grpc_context.set_code(error.code)
    grpc_context.set_details(str(error))
    raise error


def preflight(cfg: ServeConfig) -> None:
    """Refuse a bad config in the calling process, before replicas start: missing directories, and a
    Tandem drafter built for another target or an out-of-range k (the checks vLLM's engine would
    make later, inside a replica that Serve would restart in a loop)."""
    from transformers import AutoConfig

    from tandem_vllm.vllm_adapter import engine as vllm_engine
    from tandem_vllm.vllm_adapter.checks import checked_tandem_config, local_tandem_dir

    cfg.check_paths()
    vllm_engine.check_serve_args(cfg.vllm_cli(on_cpu=vllm_engine.on_cpu()))
    spec = cfg.speculation()
    drafter = local_tandem_dir(spec.get("model")) if spec else None
    if drafter is None:
        return
    assert cfg.model is not None and spec is not None
    target = types.SimpleNamespace(model=cfg.model, tokenizer=cfg.model, trust_remote_code=False,
                                   hf_config=AutoConfig.from_pretrained(cfg.model))
    checked_tandem_config(drafter, spec.get("num_speculative_tokens"), target)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Ray Serve builder: ``import_path: tandem_vllm.serve.app:build_app``; ``args`` is a ServeConfig dict."""
    cfg = ServeConfig.parse(dict(args or {})).resolved()
    preflight(cfg)
    deployment = serve.deployment(TandemServer, name="TandemServer", **replica_options(cfg))
    return deployment.bind(cfg.model_dump())
