"""The Ray Serve application on loopback, serving the ci demo pair with Tandem: real OpenAI and gRPC
clients, a hostile-input battery, disconnects, 64 concurrent streams, a killed replica.

One app for the whole module (an engine start is ~40 s), with an API key, so every request here
carries it except the ones checking that requests without it are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
import ray  # noqa: F401  (required: a missing package fails the suite)
import vllm  # noqa: F401  (required: a missing package fails the suite)

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "tandem-demo"
MAX_N = 4
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app():
    from tandem_vllm.serve.launch import free_port, start, stop

    # The key reaches the replicas through the environment (as the Helm chart passes a Secret), and
    # vLLM's metrics also go to Ray's metrics agent (as the chart configures): /metrics must not change.
    os.environ["TANDEM_TEST_API_KEY"] = KEY
    cfg = {"demo": "ci", "api_key_env": "TANDEM_TEST_API_KEY", "ray_metrics": True, "max_n": MAX_N,
           "max_request_bytes": 64 * 1024, "graceful_shutdown_timeout_s": 5, "kv_cache_memory_bytes": 256 * 2**20}
    try:
        yield start(cfg, host="127.0.0.1", port=free_port(), grpc_port=free_port(), timeout_s=900,
                    log_json=False)
    finally:
        stop()


def _post(url: str, body: bytes | dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers if headers is not None else AUTH)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _metric(base: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _client(app, **kw):
    import openai

    return openai.OpenAI(base_url=f"{app.http}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


# ---------------------------------------------------------------- OpenAI HTTP


def test_models_completions_and_chat_with_the_openai_client(app):
    c = _client(app)
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.completions.create(model=MODEL, prompt="import os\n", max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.choices[0].text
    spec = r.model_extra["metrics"]["speculative_decoding"]  # what speculation did for this request
    assert spec["num_spec_steps"] > 0 and spec["num_draft_tokens"] == 3 * spec["num_spec_steps"]
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"])
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}],
                                     max_completion_tokens=6, temperature=0.7, top_p=0.9, seed=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    assert chat.usage.prompt_tokens > 3  # the demo chat template wrapped the message


def test_sampling_options_n_stop_and_seed(app):
    c = _client(app)
    kw = dict(model=MODEL, prompt="class A:\n", max_tokens=12, temperature=1.0, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # a seed fixes the sample
    two = c.completions.create(model=MODEL, prompt="class A:\n", max_tokens=12, temperature=1.0, n=2)
    assert sorted(ch.index for ch in two.choices) == [0, 1] and two.usage.completion_tokens <= 24
    text = a.choices[0].text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if len(text[i:i + 2].strip()) == 2)
    stopped = c.completions.create(**kw, stop=[stop])  # same seed: the same text, cut at `stop`
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_async_streaming_chat_reports_usage(app):
    import openai

    async def go():
        c = openai.AsyncOpenAI(base_url=f"{app.http}/v1", api_key=KEY, max_retries=0, timeout=120)
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "for i in"}],
                                                 max_tokens=10, stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        return pieces, usage

    pieces, usage = asyncio.run(asyncio.wait_for(go(), 120))
    assert len(pieces) > 1 and usage is not None and usage.completion_tokens <= 10


def test_plain_http_sse_ends_with_done(app):
    req = urllib.request.Request(
        f"{app.http}/v1/completions", method="POST", headers={"Content-Type": "application/json", **AUTH},
        data=json.dumps({"model": MODEL, "prompt": "def main(", "max_tokens": 8, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln.decode().strip() for ln in r if ln.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_health_metrics_and_tau_are_open_without_the_key(app):
    assert urllib.request.urlopen(f"{app.http}/health", timeout=30).status == 200
    assert _metric(app.http, "vllm:spec_decode_num_drafts_total") > 0  # earlier tests drafted with Tandem
    tau = _metric(app.http, "tandem:spec_decode_mean_acceptance_length", model_name=MODEL)
    drafts = _metric(app.http, "vllm:spec_decode_num_drafts_total")
    accepted = _metric(app.http, "vllm:spec_decode_num_accepted_tokens_total")
    assert tau == pytest.approx(1 + accepted / drafts, rel=0.05)
    assert _metric(app.http, "tandem:request_mean_acceptance_length_count", model_name=MODEL) > 0
    taus = _metric(app.http, "tandem:request_mean_acceptance_length_sum", model_name=MODEL)
    assert 1 <= taus / _metric(app.http, "tandem:request_mean_acceptance_length_count", model_name=MODEL) <= 4


HOSTILE = [
    ("malformed json", "/v1/completions", b'{"model": "tandem-demo", "prompt": ', 400, ""),
    ("invalid utf-8", "/v1/completions", b'{"model": "tandem-demo", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, ""),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, ""),
    ("unknown chat role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
     400, "Invalid value: 'wizard'"),
    ("user message without content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400,
     "messages[0].content"),
    ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": "x = 1\n" * 3000}, 400,
     "context"),
    ("chat longer than the context", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x = 1\n" * 3000}]}, 400, "context"),
    # the demo pair's chat template reads neither tools nor tool_calls: vLLM would drop them from the prompt
    ("tool call the chat template cannot express", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "read a.txt"},
                                   {"role": "assistant", "content": None, "tool_calls": [
                                       {"id": "1", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
                                   {"role": "tool", "content": "hello", "tool_call_id": "1"}]},
     400, "cannot express an assistant's tool calls"),
    ("tools the chat template cannot show", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto",
      "tools": [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]},
     400, "cannot express tool definitions"),
    ("chat n above the limit", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": MAX_N + 1}, 400, "n="),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, ""),
    ("negative temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400,
     "temperature"),
    ("n above the limit", "/v1/completions", {"model": MODEL, "prompt": "x", "n": MAX_N + 1}, 400, "n="),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    ("body too large", "/v1/completions", {"model": MODEL, "prompt": "x" * 100_000}, 413, "limit"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "fragment"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_clear_4xx_and_the_server_keeps_serving(app, case, path, body, status, fragment):
    code, err = _post(app.http + path, body)
    assert code == status, (case, err)
    message = err["error"]["message"]  # OpenAI's error shape
    assert isinstance(message, str) and message and fragment in message, err
    ok, good = _post(f"{app.http}/v1/completions", {"model": MODEL, "prompt": "x = ", "max_tokens": 2})
    assert ok == 200 and good["choices"][0]["text"] is not None


def test_requests_without_the_api_key_get_401(app):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        code, err = _post(f"{app.http}/v1/completions", {"model": MODEL, "prompt": "x"}, headers=headers)
        assert code == 401, err


def test_every_http_route_needs_the_key_but_the_probes(app):
    """Every route the app serves (read from its own OpenAPI schema), called without the key, is 401
    -- vLLM's check alone leaves /tokenize, /invocations and others open."""
    request = urllib.request.Request(f"{app.http}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    routes = json.loads(urllib.request.urlopen(request, timeout=30).read())["paths"]
    assert "/v1/completions" in routes and "/tokenize" in routes
    checked = 0
    for path, methods in routes.items():
        if path in ("/health", "/metrics"):
            continue
        for method in methods:
            url = app.http + re.sub(r"{[^}]+}", "x", path)
            req = urllib.request.Request(url, data=b"{}" if method != "get" else None, method=method.upper(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 401, (method, path)
            checked += 1
    assert checked >= 10


def test_every_grpc_method_needs_the_key(stub):
    import grpc

    from tandem_vllm.serve.grpc_api import pb

    service = pb.DESCRIPTOR.services_by_name["TandemGeneration"]
    calls = {"Generate": lambda: list(stub.Generate(pb.GenerateRequest(prompt="x"), timeout=30)),
             "Complete": lambda: stub.Complete(pb.CompleteRequest(prompt="x"), timeout=30),
             "ModelInfo": lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)}
    assert sorted(calls) == sorted(m.name for m in service.methods)  # a new method must be added here
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_a_client_leaving_mid_stream_aborts_its_request(app):
    """900 tokens are asked for; the client leaves after a few. The engine must drop the request (no
    request running) having generated far fewer than 900 tokens, and it never finishes as 'length'."""
    finished = _metric(app.http, "vllm:request_success_total", finished_reason="length")
    generated = _metric(app.http, "vllm:generation_tokens_total")
    host, port = app.http.split("//")[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"model": MODEL, "prompt": "import sys\n", "max_tokens": 900, "stream": True,
                       "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 60
    while _metric(app.http, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the abandoned request is still running after 60 s"
        time.sleep(0.2)
    time.sleep(2)
    assert _metric(app.http, "vllm:request_success_total", finished_reason="length") == finished
    assert _metric(app.http, "vllm:generation_tokens_total") - generated < 900


def test_64_concurrent_streaming_clients_all_complete(app):
    import openai

    async def one(c, i):
        stream = await c.completions.create(model=MODEL, prompt=f"x{i} = ", max_tokens=12, stream=True,
                                            extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def go():
        c = openai.AsyncOpenAI(base_url=f"{app.http}/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, i) for i in range(64)), return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(go(), 300))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(isinstance(r, str) and r for r in results)


# ---------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def stub(app):
    import grpc

    from tandem_vllm.serve.grpc_api import pb_grpc

    channel = grpc.insecure_channel(app.grpc)
    yield pb_grpc.TandemGenerationStub(channel)
    channel.close()


META = (("authorization", f"Bearer {KEY}"),)


def test_grpc_stream_unary_and_model_info(stub):
    from tandem_vllm.serve.grpc_api import pb

    opts = pb.SamplingOptions(max_tokens=10, temperature=0)
    parts = list(stub.Generate(pb.GenerateRequest(prompt="def main(", sampling=opts), metadata=META, timeout=120))
    whole = stub.Complete(pb.CompleteRequest(prompt="def main(", sampling=opts), metadata=META, timeout=120)
    assert "".join(p.text for p in parts) == whole.text  # greedy: same text both ways
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert parts[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert parts[-1].usage.completion_tokens == len(whole.token_ids) == whole.usage.completion_tokens
    for last in (parts[-1], whole):  # per-request speculation, the same for both (greedy, same prompt)
        assert last.speculation.num_drafts > 0 and last.speculation.num_draft_tokens == 3 * last.speculation.num_drafts
    assert not parts[0].HasField("speculation")  # only the last message carries it
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=META, timeout=30)
    assert info.model == MODEL and info.speculative_method == "tandem" and info.num_speculative_tokens == 3
    assert info.speculation.num_drafts > 0
    s = info.speculation
    assert s.mean_acceptance_length == pytest.approx(1 + s.num_accepted_tokens / s.num_drafts)


def test_grpc_health_and_reflection(app):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(app.grpc) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"tandem.v1.TandemGeneration", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("prompt", "options", "fragment"),
    [
        ("", {}, "prompt is empty"),
        ("x", {"temperature": -0.5}, "temperature"),
        ("x", {"top_p": 1.5}, "top_p"),
        ("x = 1\n" * 3000, {}, "maximum context length"),
    ],
    ids=["empty prompt", "negative temperature", "top_p above 1", "prompt longer than the context"],
)
def test_grpc_bad_input_is_invalid_argument(stub, prompt, options, fragment):
    import grpc

    from tandem_vllm.serve.grpc_api import pb

    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingOptions(max_tokens=4, **options))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request, metadata=META, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert fragment in e.value.details()
    ok = stub.Complete(pb.CompleteRequest(prompt="x = ", sampling=pb.SamplingOptions(max_tokens=2)),
                       metadata=META, timeout=60)
    assert ok.usage.completion_tokens >= 1


def test_a_cancelled_grpc_stream_is_aborted_in_the_engine(stub, app):
    """The client cancels a 900-token Generate stream after a few messages. Server side, the engine
    stops running the request without it ever finishing (vLLM counts every finish -- length, stop --
    but not an abort) and having generated far fewer than 900 tokens."""
    from tandem_vllm.serve.grpc_api import pb

    finished = _metric(app.http, "vllm:request_success_total")
    generated = _metric(app.http, "vllm:generation_tokens_total")
    # greedy: the ci target's greedy reply to this prompt runs to 900 tokens, while a sampled one ends
    # within 50 tokens about one time in four (the proto has no ignore_eos)
    call = stub.Generate(pb.GenerateRequest(prompt="import sys\n",
                                            sampling=pb.SamplingOptions(max_tokens=900, temperature=0.0)),
                         metadata=META, timeout=300)
    for i, _ in enumerate(call):
        if i == 2:
            assert _metric(app.http, "vllm:num_requests_running") == 1
            call.cancel()
            break
    deadline = time.monotonic() + 60
    while _metric(app.http, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the cancelled request is still running after 60 s"
        time.sleep(0.2)
    time.sleep(2)
    assert _metric(app.http, "vllm:request_success_total") == finished, "the request finished instead of aborting"
    assert _metric(app.http, "vllm:generation_tokens_total") - generated < 900


def test_grpc_without_the_key_is_unauthenticated_and_deadlines_hold(stub):
    import grpc

    from tandem_vllm.serve.grpc_api import pb

    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.CompleteRequest(prompt="x"), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.CompleteRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=900)),
                      metadata=META, timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------- serving benchmark


@pytest.mark.parametrize("client", ["raw", "openai"])
def test_bench_serve_against_the_running_app(app, tmp_path, capsys, client):
    from tandem_vllm.cli import main
    from tandem_vllm.demo.build import build

    out = tmp_path / "serve.json"
    main(["bench", "serve", "--url", app.http, "--api-key", KEY, "--prompts", build("ci", progress=False)["heldout_prompts"],
          "--num-prompts", "4", "--concurrency", "1,2", "--max-tokens", "8", "--repeat", "1", "--json", str(out),
          "--plot", str(tmp_path / "s.png"), "--client", client, "--cold"])
    cells = json.loads(out.read_text())["cells"]
    # --cold: first a burst of the first concurrency's size (1 request), then the warm cells
    assert [(c["path"], c["concurrency"], c["cold"]) for c in cells] == [
        ("serve (HTTP)", 1, True), ("serve (HTTP)", 1, False), ("serve (HTTP)", 2, False)]
    assert [c["tokens"] for c in cells] == [8, 4 * 8, 4 * 8]
    assert all(c["errors"] == 0 and c["tokens_per_s"] > 0 for c in cells)
    shown = capsys.readouterr().out
    assert "| serve (HTTP) | cold | 1 |" in shown and "| serve (HTTP) | warm | 2 |" in shown
    assert (tmp_path / "s.png").stat().st_size > 0


# ---------------------------------------------------------------- start-up refusals


@pytest.mark.parametrize("case", ["other target", "k out of range"])
def test_bad_drafters_are_refused_before_any_replica_starts(tmp_path, case):
    from tandem_vllm.demo.build import build
    from tandem_vllm.errors import TandemError
    from tandem_vllm.serve.app import build_app
    from tests.integration.helpers import other_target

    demo = build("ci", progress=False)
    args = {"model": demo["target"], "drafter": demo["tandem"]}
    if case == "other target":
        args["model"] = other_target(demo, tmp_path)
        fragment = "was trained for target"
    else:
        args = {"model": demo["target"], "speculative_config": {"model": demo["tandem"], "num_speculative_tokens": 40}}
        fragment = "num_speculative_tokens=40"
    with pytest.raises(TandemError, match=fragment):
        build_app(args)


# ---------------------------------------------------------------- replicas


def test_a_killed_replica_is_replaced_and_serving_resumes(app):
    """Last: it costs an engine restart."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if re.search(r"SERVE_REPLICA::tandem#TandemServer", a["name"])]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 600
    while True:
        try:
            code, body = _post(f"{app.http}/v1/completions", {"model": MODEL, "prompt": "x = ", "max_tokens": 2},
                               timeout=30)
            if code == 200:
                break
        except (urllib.error.URLError, OSError, ValueError):
            pass
        assert time.monotonic() < deadline, "no replica came back within 10 minutes"
        time.sleep(2)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::tandem" in a["name"]]
    assert names and names != [replicas[0]["name"]]
