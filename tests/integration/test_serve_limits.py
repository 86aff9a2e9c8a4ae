"""Back-pressure and shutdown on a deliberately small app: one replica that runs 1 request and
queues 1. Overflow is refused (HTTP 503 / gRPC RESOURCE_EXHAUSTED) rather than queued without bound,
and stopping the app lets an in-flight request finish."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray  # noqa: F401  (required: a missing package fails the suite)
import vllm  # noqa: F401  (required: a missing package fails the suite)

pytestmark = pytest.mark.slow

MODEL = "tandem-demo"


@pytest.fixture(scope="module")
def app():
    from tandem_vllm.serve.launch import free_port, start, stop

    cfg = {"demo": "ci", "max_ongoing_requests": 1, "max_queued_requests": 1, "graceful_shutdown_timeout_s": 60,
           "kv_cache_memory_bytes": 256 * 2**20}
    try:
        yield start(cfg, host="127.0.0.1", port=free_port(), grpc_port=free_port(), timeout_s=900, log_json=False)
    finally:
        stop()


def _complete(base: str, max_tokens: int) -> tuple[int, dict]:
    body = json.dumps({"model": MODEL, "prompt": "import os\n", "max_tokens": max_tokens, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"body": e.read().decode(errors="replace")}


def test_overflow_is_refused_over_http_and_grpc_and_the_rest_completes(app):
    import grpc

    from tandem_vllm.serve.grpc_api import pb, pb_grpc

    with ThreadPoolExecutor(8) as pool:
        codes = [f.result()[0] for f in [pool.submit(_complete, app.http, 200) for _ in range(8)]]
    assert 503 in codes, codes
    assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes

    stub = pb_grpc.TandemGenerationStub(grpc.insecure_channel(app.grpc))
    # greedy, so no request ends early and frees its slot (the proto has no ignore_eos)
    request = pb.CompleteRequest(prompt="import os\n", sampling=pb.SamplingOptions(max_tokens=200, temperature=0.0))

    def call():
        try:
            stub.Complete(request, timeout=300)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: call(), range(8)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in statuses, statuses
    assert statuses.count(grpc.StatusCode.OK) >= 2, statuses
    assert _complete(app.http, 4)[0] == 200  # and it keeps serving


def _engine_of_the_live_replica(psutil, timeout_s: float = 300.0):
    """The engine process of this app's replica: the newest engine under any "ServeReplica:tandem"
    process (the previous module's app had the same name, and its replica process may linger, with
    or without an engine; Ray may also host a new replica in a reused worker process; a replica
    replaced during the previous test needs a while to start its engine). A child that exits while it
    is looked at, or is a zombie (psutil raises for its cmdline), is passed over on its own."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines, seen = [], []
        for p in psutil.process_iter(["cmdline"]):
            if not any("ServeReplica:tandem" in part for part in (p.info["cmdline"] or [])):
                continue
            try:
                children = p.children(recursive=True)
            except psutil.Error:
                continue
            seen.append(f"{p.pid} {' '.join(p.info['cmdline'])[:80]}")
            for c in children:
                try:
                    line, status = " ".join(c.cmdline()), c.status()
                except psutil.Error:
                    continue
                seen.append(f"  {c.pid} {status} {line[:80]}")
                if "EngineCore" in line:
                    engines.append(c)
        if engines:
            return max(engines, key=lambda c: c.create_time())
        assert time.monotonic() < deadline, "no Serve replica with a running engine:\n" + "\n".join(seen)
        time.sleep(1)


def test_a_dead_engine_is_unavailable_until_serve_replaces_the_replica(app):
    import grpc
    import psutil

    from tandem_vllm.serve.grpc_api import pb, pb_grpc

    _engine_of_the_live_replica(psutil).kill()
    stub = pb_grpc.TandemGenerationStub(grpc.insecure_channel(app.grpc))
    request = pb.CompleteRequest(prompt="x = ", sampling=pb.SamplingOptions(max_tokens=2))
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(request, timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    deadline = time.monotonic() + 600
    while True:  # Serve's health check sees the dead engine and starts a new replica
        try:
            assert stub.Complete(request, timeout=60).usage.completion_tokens >= 1
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "no healthy replica within 10 minutes"
            time.sleep(2)


def test_stopping_the_app_lets_an_in_flight_request_finish(app):
    from tandem_vllm.serve.launch import stop

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(zip(("code", "body"), _complete(app.http, 900))))
    worker.start()
    time.sleep(3)  # the request is decoding (900 tokens take well over 3 s here)
    assert worker.is_alive()
    stop()
    worker.join(300)
    assert result.get("code") == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 900
