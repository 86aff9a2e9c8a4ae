"""ASGI middleware in front of vLLM's OpenAI app: request limits and one structured log line per request.

Limits answer in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) before the
request reaches the engine: a body over ``max_request_bytes`` is 413, ``n`` above ``max_n`` is 400.
The body is read once (it is bounded) and replayed to the app, so streaming responses are untouched.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

logger = logging.getLogger("tandem_vllm.serve")

Scope = dict[str, Any]
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def openai_error(status: int, message: str, *, type_: str = "BadRequestError", param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}}).encode()


class LimitsAndLogging:
    def __init__(self, app: Callable, *, max_request_bytes: int, max_n: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_n = max_n

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
                                    "path": scope.get("path"), "status": status["code"],
                                    "ms": round(1000 * (time.perf_counter() - t0), 1)}))

    async def _check(self, scope: Scope, headers: dict[str, str], receive: Callable) -> tuple[Any, Callable]:
        """(refusal or None, the receive callable the app should use)."""
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
        n = _field(body, "n")
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_n:
            return (400, openai_error(400, f"n={n} exceeds this server's limit of {self.max_n} completions "
                                      f"per request", param="n")), receive
        return None, _replay([{"type": "http.request", "body": body, "more_body": False}], then=receive)


def _field(body: bytes, name: str) -> Any:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the app answers malformed JSON in its own words
    return data.get(name) if isinstance(data, dict) else None


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
