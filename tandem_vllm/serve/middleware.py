"""ASGI middleware in front of vLLM's OpenAI app: request limits and one structured log line per request.

Limits answer in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) before the
request reaches the engine: a body over ``max_request_bytes`` is 413, ``n`` above ``max_n`` is 400.
Chat messages are checked as OpenAI's API checks them (vLLM's app would render an unknown role or a
user message without content through the chat template and answer 200): a role outside OpenAI's, or
a system / developer / user / tool message with no content, is 400 naming ``messages[i].role`` or
``messages[i].content``; ``extra_roles`` admits roles a model's chat template defines. Tool calling the
model's chat template cannot express (``tool_support``, see chat_template.py) is 400 naming the field
the prompt would lose.
The body is read once (it is bounded) and replayed to the app, so streaming responses are untouched.
With ``api_key`` every route needs ``Authorization: Bearer <key>`` except the probes in ``OPEN_PATHS``
(vLLM's own check guards only /v1, /v2, /inference and /cohere: /tokenize, /invocations and the
rest would answer anyone); a missing or wrong key is 401 in OpenAI's shape.
Every response names the replica that answered it (``x-tandem-replica``), as does its log line: with
several replicas behind one address, that is how a client or an operator tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from tandem_vllm.serve.chat_template import ToolSupport, tool_error

logger = logging.getLogger("tandem_vllm.serve")

Scope = dict[str, Any]
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_CONTENT_REQUIRED = ("system", "developer", "user", "tool")  # assistant turns may carry tool calls instead
OPEN_PATHS = ("/health", "/metrics")  # liveness / readiness probes and Prometheus scrapes


def openai_error(status: int, message: str, *, type_: str = "BadRequestError", param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}}).encode()


class LimitsAndLogging:
    def __init__(self, app: Callable, *, max_request_bytes: int, max_n: int, extra_roles: tuple[str, ...] = (),
                 api_key: str | None = None, replica: str = "", tool_support: ToolSupport | None = None) -> None:
        self.app = app
        self.tool_support = tool_support
        self.replica = replica
        self.replica_header = (b"x-tandem-replica", replica.encode("latin-1"))
        self.key_hash = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.max_n = max_n
        self.roles = OPENAI_ROLES + tuple(r for r in extra_roles if r not in OPENAI_ROLES)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        status = {"code": 0}

        async def send_logged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.replica:
                    message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        try:
            refusal, receive = await self._check(scope, headers, receive)
            if refusal is not None:
                code, body = refusal
                await _respond(send_logged, code, body)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            logger.info(json.dumps({"event": "http_request", "request_id": request_id, "method": scope.get("method"),
                                    "path": scope.get("path"), "status": status["code"], "replica": self.replica,
                                    "ms": round(1000 * (time.perf_counter() - t0), 1)}))

    async def _check(self, scope: Scope, headers: dict[str, str], receive: Callable) -> tuple[Any, Callable]:
        """(refusal or None, the receive callable the app should use)."""
        if self.key_hash is not None and scope.get("method") != "OPTIONS" and scope.get("path") not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.key_hash):
                return (401, openai_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          type_="AuthenticationError")), receive
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return (413, openai_error(413, f"request body of {length} bytes exceeds the limit of "
                                      f"{self.max_request_bytes} bytes", type_="RequestTooLargeError")), receive
        if scope.get("method") != "POST" or scope.get("path") not in _GENERATION_PATHS:
            return None, receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, _replay([message])
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return (413, openai_error(413, f"request body exceeds the limit of {self.max_request_bytes} bytes",
                                          type_="RequestTooLargeError")), receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return (400, openai_error(400, f"request body is not valid UTF-8 (byte {e.start}); send JSON "
                                      f"encoded as UTF-8")), receive
        request = _json_object(body)
        n = request.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_n:
            return (400, openai_error(400, f"n={n} exceeds this server's limit of {self.max_n} completions "
                                      f"per request", param="n")), receive
        if scope["path"] == "/v1/chat/completions":
            bad = chat_message_error(request.get("messages"), self.roles)
            if bad is None and self.tool_support is not None:
                bad = tool_error(request, self.tool_support)
            if bad is not None:
                message, param = bad
                return (400, openai_error(400, message, param=param)), receive
        return None, _replay([{"type": "http.request", "body": body, "more_body": False}], then=receive)


def chat_message_error(messages: Any, roles: tuple[str, ...]) -> tuple[str, str] | None:
    """(message, param) for the first chat message OpenAI's API would refuse, else None. Shapes other
    than a list of objects are left to vLLM's own validation (it answers them with 400 already)."""
    if not isinstance(messages, list):
        return None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role not in roles:
            supported = ", ".join(f"'{r}'" for r in roles)
            return f"Invalid value: {role!r}. Supported values are: {supported}.", f"messages[{i}].role"
        content = m.get("content")
        if role in _CONTENT_REQUIRED and (content is None or content == []):
            return f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content"
    return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}  # the app answers malformed JSON in its own words
    return data if isinstance(data, dict) else {}


def _replay(messages: list[dict[str, Any]], then: Callable | None = None) -> Callable:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()  # after the body: wait for the client's disconnect
        return {"type": "http.disconnect"}

    return receive


async def _respond(send: Callable, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
