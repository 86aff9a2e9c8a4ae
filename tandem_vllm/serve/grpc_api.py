"""gRPC side of a replica: protobuf <-> vLLM types, and which status code each failure gets.

The servicer methods live on the replica class (Ray Serve's gRPC proxy calls them by rpc name);
this module keeps them thin: one function per message conversion, no engine calls.
"""

from __future__ import annotations

from typing import Any

import grpc

from tandem_vllm.serve.protos import load

pb, pb_grpc = load()

DEFAULT_MAX_TOKENS = 16
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "abort": pb.FINISH_REASON_ABORT}

# Servicer registration functions for Ray Serve's gRPC proxy (grpc_options.grpc_servicer_functions).
SERVICER_FUNCTIONS = [
    "tandem_vllm.serve.pb.tandem_pb2_grpc.add_TandemGenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


class RpcError(Exception):
    """A failure with the gRPC status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles it back to the gRPC proxy
        return (RpcError, (self.code, str(self)))


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_api_key(grpc_context: Any, api_key: str | None) -> None:
    if api_key is None:
        return
    metadata = {k.lower(): v for k, v in (grpc_context.invocation_metadata() or [])}
    if metadata.get("authorization") != f"Bearer {api_key}":
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                       "missing or wrong API key: send metadata ('authorization', 'Bearer <key>')")


def sampling_params(s: Any) -> Any:
    """pb SamplingOptions -> vllm.SamplingParams; bad values are INVALID_ARGUMENT with vLLM's reason."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    kw: dict[str, Any] = {"max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS, "stop": list(s.stop) or None}
    if s.no_speculation:
        kw["extra_args"] = {"speculate": "off"}  # read by the opt-out patch (vllm_adapter/patch_scheduler.py)
    for name in ("temperature", "top_p", "seed"):
        if s.HasField(name):
            kw[name] = getattr(s, name)
    if kw.get("temperature", 0.0) < 0:
        raise invalid(f"temperature={kw['temperature']}; it must be >= 0 (0 is greedy)")
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError, VLLMValidationError) as e:
        raise invalid(f"invalid sampling options: {e}") from None


def prompt_text(prompt: str) -> str:
    if not prompt.strip():
        raise invalid("prompt is empty; send the text to continue")
    return prompt


def finish_reason(reason: str | None) -> int:
    return _FINISH.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def speculation_stats(spec: dict[str, Any] | None) -> Any:
    """vLLM's per-request spec-decode metrics (``RequestSpecDecodeMetrics.to_dict()``) as the proto's
    SpeculationStats; None when the request was not speculated."""
    if not spec:
        return None
    return pb.SpeculationStats(num_drafts=spec["num_spec_steps"], num_draft_tokens=spec["num_draft_tokens"],
                               num_accepted_tokens=spec["num_accepted_draft_tokens"],
                               mean_acceptance_length=spec["mean_acceptance_length"])


def stream_message(request_id: str, text: str, token_ids: list[int], finished: bool, reason: str | None,
                   prompt_tokens: int, completion_tokens: int, spec: dict[str, Any] | None = None) -> Any:
    msg = pb.GenerateResponse(request_id=request_id, text=text, token_ids=token_ids)
    if finished:
        msg.finish_reason = finish_reason(reason)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
        if (stats := speculation_stats(spec)) is not None:
            msg.speculation.CopyFrom(stats)
    return msg


def complete_message(request_id: str, text: str, token_ids: list[int], reason: str | None,
                     prompt_tokens: int, spec: dict[str, Any] | None = None) -> Any:
    return pb.CompleteResponse(request_id=request_id, text=text, token_ids=token_ids,
                               finish_reason=finish_reason(reason),
                               usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(token_ids)),
                               speculation=speculation_stats(spec))
