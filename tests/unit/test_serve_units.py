"""Serving pieces without Ray or an engine: config validation, the limits middleware, proto stubs,
gRPC conversions and the CLI's refusals."""

from __future__ import annotations

import asyncio
import json

import pytest

from tandem_vllm.errors import TandemError
from tandem_vllm.serve.config import ServeConfig, replica_options
from tandem_vllm.serve.middleware import LimitsAndLogging

# ---------------------------------------------------------------- config


def test_config_builds_the_vllm_serve_command_line():
    cfg = ServeConfig.parse({"model": "/m/target", "drafter": "/m/tandem", "num_speculative_tokens": 5,
                             "max_model_len": 2048, "api_key": "k", "vllm_args": ["--enable-prefix-caching"]})
    argv = cfg.vllm_cli(on_cpu=True)
    assert argv[argv.index("--model") + 1] == "/m/target"
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"model": "/m/tandem", "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(512 * 2**20)  # a fixed CPU footprint
    assert "--kv-cache-memory-bytes" not in cfg.vllm_cli(on_cpu=False)  # GPU: vLLM's utilisation share
    assert argv[argv.index("--api-key") + 1] == "k" and argv[-1] == "--enable-prefix-caching"
    assert "--speculative-config" not in ServeConfig.parse({"model": "/m/target"}).vllm_cli(on_cpu=True)
    assert argv[argv.index("--per-request-spec-decode-metrics") + 1] == "summary"  # per-request stats by default
    plain = ServeConfig.parse({"model": "/m/target"}).vllm_cli(on_cpu=True)
    off = ServeConfig.parse({"model": "/m/target", "drafter": "/m/tandem", "per_request_spec_metrics": "none"})
    assert "--per-request-spec-decode-metrics" not in plain + off.vllm_cli(on_cpu=True)


def test_a_measured_schedule_becomes_vllms_dynamic_k():
    cfg = ServeConfig.parse({"model": "/m", "drafter": "/d", "speculation_schedule": [[1, 2, 3], [3, 100, 1], [101, 200, 0]]})
    argv = cfg.vllm_cli(on_cpu=True)
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec["num_speculative_tokens"] == 3
    assert spec["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 100, 1], [101, 200, 0]]
    assert "num_speculative_tokens_per_batch_size" not in ServeConfig.parse({"model": "/m", "drafter": "/d"}).speculation()


def test_the_chat_demo_drafts_by_its_measured_schedule_unless_k_is_asked_for(monkeypatch):
    from tandem_vllm.demo import build as demo_build
    from tandem_vllm.demo.chat import K_SCHEDULE

    shipped = json.loads(K_SCHEDULE.read_text())["schedule"]
    pairs = {"chat": {"target": "/c/target", "tandem": "/c/tandem", "k_schedule": shipped},
             "ci": {"target": "/t/target", "tandem": "/t/tandem"}}
    monkeypatch.setattr(demo_build, "build", lambda size, **kw: pairs[size])
    spec = ServeConfig.parse({}).resolved().speculation()
    assert spec["num_speculative_tokens_per_batch_size"] == shipped
    assert spec["num_speculative_tokens"] == max(k for _, _, k in shipped) and spec["model"] == "/c/tandem"
    # a k or a schedule the user asks for is served as asked
    assert "num_speculative_tokens_per_batch_size" not in ServeConfig.parse({"num_speculative_tokens": 3}).resolved().speculation()
    mine = ServeConfig.parse({"k_schedule": [[1, 4, 1], [5, 100, 0]]}).resolved().speculation()
    assert mine["num_speculative_tokens_per_batch_size"] == [[1, 4, 1], [5, 100, 0]]
    # the ci pair has no measured schedule; a user's drafter gets none either
    assert "num_speculative_tokens_per_batch_size" not in ServeConfig.parse({"demo": "ci"}).resolved().speculation()
    assert ServeConfig.parse({"drafter": "/mine"}).resolved().speculation()["num_speculative_tokens"] == 3


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"model": "/m", "drafter": "/d", "speculative_config": {"model": "/d"}}, "either drafter or"),
        ({"model": "/m", "drafter": "/d", "no_speculation": True}, "contradicts"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 17}, "num_speculative_tokens"),
        ({"num_replicas": -1}, "num_replicas"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "exceeds max_replicas"),
        ({"modle": "/m"}, "modle: Extra inputs are not permitted"),
        ({"max_n": "many"}, "max_n"),
        ({"api_key": "k", "api_key_env": "KEY"}, "either api_key or api_key_env"),
        ({"api_key_env": "not a name"}, "api_key_env"),
        ({"speculation_guards": {"max_ctx": 5}}, "unknown guard max_ctx"),
        ({"speculation_guards": {"min_acceptance": 3}}, "min_acceptance <= 1"),
        ({"drafter": "/d", "k_schedule": [[2, 8, 1]]}, "first batch-size range must start at 1"),
        ({"drafter": "/d", "k_schedule": [[1, 8, 4]]}, "raise num_speculative_tokens (3) to 4"),
        ({"speculative_config": {"model": "/d"}, "k_schedule": [[1, 8, 1]]}, "goes with drafter"),
    ],
)
def test_bad_config_is_one_readable_error(data, fragment):
    with pytest.raises(TandemError, match="invalid serve config") as e:
        ServeConfig.parse(data)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_api_key_env_is_read_on_the_replica_and_a_missing_one_is_named(monkeypatch):
    cfg = ServeConfig.parse({"model": "/m", "api_key_env": "TANDEM_UNIT_KEY"})
    assert "--api-key" not in cfg.vllm_cli(on_cpu=True)  # the config itself never holds the key
    monkeypatch.delenv("TANDEM_UNIT_KEY", raising=False)
    with pytest.raises(TandemError, match="api_key_env=TANDEM_UNIT_KEY: that environment variable is not set"):
        cfg.with_env_secrets()
    monkeypatch.setenv("TANDEM_UNIT_KEY", "s3cret")
    live = cfg.with_env_secrets()
    assert live.api_key == "s3cret" and live.api_key_env is None
    argv = live.vllm_cli(on_cpu=True)
    assert argv[argv.index("--api-key") + 1] == "s3cret"
    assert ServeConfig.parse({"model": "/m"}).with_env_secrets().api_key is None


def test_ray_metrics_keeps_vllms_own_prometheus_logger_last():
    import vllm  # noqa: F401  (required: a missing package fails the suite)
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    from tandem_vllm.vllm_adapter.stats import RaySpecStatsLogger, SpecStatsLogger, stat_loggers

    assert stat_loggers(False) == [SpecStatsLogger]
    # Prometheus' constructor unregisters and re-registers the vllm: collectors behind /metrics; Ray's
    # inherits that constructor, so the plain one must come after it.
    assert stat_loggers(True) == [RaySpecStatsLogger, RayPrometheusStatLogger, PrometheusStatLogger]


def _spec(num_draft_tokens: int, histogram: list[int]):
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    return RequestSpecDecodeMetrics(num_spec_tokens=len(histogram) - 1, histogram=histogram,
                                    num_draft_tokens=num_draft_tokens)


def test_per_request_speculation_reaches_grpc_and_the_tau_histogram():
    import asyncio
    from types import SimpleNamespace

    import prometheus_client

    from tandem_vllm.serve import grpc_api as g
    from tandem_vllm.vllm_adapter import stats

    spec = _spec(9, [1, 0, 1, 1])  # 3 steps of 3 drafts: 0, 2 and 3 accepted -> tau 1 + 5/3
    msg = g.complete_message("r", "text", [1, 2], "length", 4, stats.spec_metrics_of(SimpleNamespace(spec_decode_metrics=spec)))
    assert (msg.speculation.num_drafts, msg.speculation.num_draft_tokens, msg.speculation.num_accepted_tokens) == (3, 9, 5)
    assert msg.speculation.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert not g.complete_message("r", "t", [1], "stop", 4, None).HasField("speculation")
    last = g.stream_message("r", "", [], True, "stop", 4, 2, spec.to_dict())
    assert last.speculation.num_accepted_tokens == 5 and not g.stream_message("r", "x", [1], False, None, 4, 1,
                                                                              spec.to_dict()).HasField("speculation")

    def out(finished, metrics):
        return SimpleNamespace(finished=finished, outputs=[SimpleNamespace(spec_decode_metrics=metrics)])

    class Engine:
        async def generate(self, prompt, params, request_id):
            for o in (out(False, None), out(True, spec), out(True, None), out(True, _spec(0, [0, 0, 0, 0]))):
                yield o

    def count():
        return prometheus_client.REGISTRY.get_sample_value("tandem:request_mean_acceptance_length_count",
                                                           {"model_name": "unit"}) or 0.0

    engine, before = Engine(), count()
    stats.observe_requests(engine, "unit")

    async def drain():
        return [o async for o in engine.generate("p", None, "r")]

    assert len(asyncio.run(drain())) == 4  # every output still reaches the caller
    assert count() == before + 1  # only the speculated request that verified drafts is a tau sample


def test_steps_that_decode_without_drafts_are_counted():
    from types import SimpleNamespace

    import prometheus_client

    from tandem_vllm.vllm_adapter.stats import SpecStatsLogger

    config = SimpleNamespace(model_config=SimpleNamespace(served_model_name="steps"), speculative_config=object())
    logger = SpecStatsLogger(config)

    def value():
        return prometheus_client.REGISTRY.get_sample_value("tandem:spec_decode_steps_without_drafts_total",
                                                           {"model_name": "steps"}) or 0.0

    before = value()
    drafted = SimpleNamespace(num_drafts=2, num_draft_tokens=6, num_accepted_tokens=3)
    decoding, prefill_only = SimpleNamespace(inter_token_latencies_iter=[0.01]), SimpleNamespace(inter_token_latencies_iter=[])
    logger.record(SimpleNamespace(spec_decoding_stats=None), decoding)  # K = 0 step
    logger.record(SimpleNamespace(spec_decoding_stats=drafted), decoding)
    logger.record(SimpleNamespace(spec_decoding_stats=None), prefill_only)  # first tokens only: not a decode step
    assert value() == before + 1


def test_replica_options_follow_the_config():
    fixed = replica_options(ServeConfig.parse({"num_replicas": 2, "num_gpus": 1, "max_queued_requests": 10}))
    assert fixed["num_replicas"] == 2 and fixed["ray_actor_options"]["num_gpus"] == 1
    assert fixed["max_queued_requests"] == 10
    auto = replica_options(ServeConfig.parse({"autoscaling": {"min_replicas": 1, "max_replicas": 4}}))
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4


def test_missing_model_directories_are_refused_with_the_path(tmp_path):
    cfg = ServeConfig.parse({"model": str(tmp_path / "nowhere")})
    with pytest.raises(TandemError, match="nowhere: no config.json"):
        cfg.check_paths()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{}")
    with pytest.raises(TandemError, match="drafter=.*gone"):
        ServeConfig.parse({"model": str(tmp_path / "t"), "drafter": str(tmp_path / "gone")}).check_paths()


# ---------------------------------------------------------------- middleware


def _call(app, body: bytes, *, path="/v1/completions", method="POST", chunks: int = 1, headers=()):
    """Run an ASGI request through `app`; returns (status, json body or None, what the inner app got)."""
    sent, size = [], len(body)
    parts = [body[i * size // chunks:(i + 1) * size // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-length", str(len(body)).encode()), *headers]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else None


async def _echo(scope, receive, send):
    """Stands in for vLLM's app: echoes the body it received."""
    body, more = b"", True
    while more:
        m = await receive()
        body += m.get("body", b"")
        more = m.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"echo": body.decode()}).encode()})


def test_limits_pass_good_requests_through_with_their_body_intact():
    app = LimitsAndLogging(_echo, max_request_bytes=1024, max_n=2)
    body = json.dumps({"model": "m", "prompt": "hello", "n": 2}).encode()
    assert _call(app, body, chunks=3) == (200, {"echo": body.decode()})
    assert _call(app, b"{}", path="/v1/models", method="GET")[0] == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/invocations", "/version", "/anything/new"])
def test_the_api_key_guards_every_route_but_the_probes(path):
    """vLLM's own check covers /v1, /v2, /inference and /cohere only; with a key, every route needs it."""
    app = LimitsAndLogging(_echo, max_request_bytes=1024, max_n=2, api_key="s3cret")
    for headers in ((), ((b"authorization", b"Bearer wrong"),), ((b"authorization", b"Basic s3cret"),)):
        status, body = _call(app, b"{}", path=path, headers=headers)
        assert status == 401 and body["error"]["type"] == "AuthenticationError"
    assert _call(app, b"{}", path=path, headers=((b"authorization", b"Bearer s3cret"),))[0] == 200
    for probe in ("/health", "/metrics"):
        assert _call(app, b"{}", path=probe, method="GET")[0] == 200
    assert _call(LimitsAndLogging(_echo, max_request_bytes=1024, max_n=2), b"{}", path=path)[0] == 200  # no key


def test_every_response_names_the_replica_that_answered(caplog):
    """With several replicas behind one address, the header tells a client which one answered."""
    app = LimitsAndLogging(_echo, max_request_bytes=1024, max_n=2, api_key="k", replica="r1")
    for headers, status in ((((b"authorization", b"Bearer k"),), 200), ((), 401)):  # served and refused
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message, sent=sent):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": list(headers)}
        with caplog.at_level("INFO", logger="tandem_vllm.serve"):
            asyncio.run(app(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == status and (b"x-tandem-replica", b"r1") in start["headers"]
        assert json.loads(caplog.records[-1].getMessage())["replica"] == "r1"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (json.dumps({"prompt": "x" * 2000}).encode(), 413, "exceeds the limit of 1024 bytes"),
        (json.dumps({"prompt": "x", "n": 3}).encode(), 400, "n=3 exceeds"),
        (b'{"prompt": "\xff"}', 400, "not valid UTF-8"),
    ],
)
def test_limits_refuse_in_openai_error_shape(body, status, fragment):
    app = LimitsAndLogging(_echo, max_request_bytes=1024, max_n=2)
    got_status, got = _call(app, body, chunks=2)
    assert got_status == status
    assert fragment in got["error"]["message"] and got["error"]["code"] == status


# ---------------------------------------------------------------- protos and gRPC conversions


def test_stubs_are_generated_from_the_protos_and_picklable(tmp_path):
    import pickle

    from tandem_vllm.serve import protos

    out = protos.generate(out=tmp_path / "pb")
    assert {p.name for p in out.iterdir()} >= {"__init__.py", "tandem_pb2.py", "tandem_pb2_grpc.py"}
    pb, pb_grpc = protos.load()
    assert hasattr(pb_grpc, "add_TandemGenerationServicer_to_server")
    assert pb.FINISH_REASON_UNSPECIFIED == 0
    msg = pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=3, temperature=0.5))
    assert pickle.loads(pickle.dumps(msg)) == msg  # Ray moves requests between processes


def test_grpc_sampling_options_map_to_vllm_and_bad_ones_are_invalid_argument():
    import grpc
    import vllm  # noqa: F401  (required: a missing package fails the suite)

    from tandem_vllm.serve import grpc_api as g
    from tandem_vllm.vllm_adapter.patch_scheduler import speculation_opted_out

    p = g.sampling_params(g.pb.SamplingOptions(temperature=0.0, seed=4, stop=["\n\n"]))
    assert p.max_tokens == g.DEFAULT_MAX_TOKENS and p.temperature == 0.0 and p.seed == 4 and p.stop == ["\n\n"]
    assert not speculation_opted_out(p)
    assert speculation_opted_out(g.sampling_params(g.pb.SamplingOptions(no_speculation=True)))
    for bad in (g.pb.SamplingOptions(temperature=-1), g.pb.SamplingOptions(top_p=0.0)):
        with pytest.raises(g.RpcError) as e:
            g.sampling_params(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(g.RpcError, match="prompt is empty"):
        g.prompt_text("  ")


def test_grpc_api_key_is_checked_from_metadata():
    import grpc
    import vllm  # noqa: F401  (required: a missing package fails the suite)

    from tandem_vllm.serve import grpc_api as g

    class Ctx:
        def __init__(self, md):
            self.md = md

        def invocation_metadata(self):
            return self.md

    g.check_api_key(Ctx([]), None)
    g.check_api_key(Ctx([("authorization", "Bearer k")]), "k")
    for md in ([], [("authorization", "Bearer nope")], [("authorization", "k")]):
        with pytest.raises(g.RpcError) as e:
            g.check_api_key(Ctx(md), "k")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_serve_cli_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    from tandem_vllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path / "nope"), "--start-timeout", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem-vllm: error:") and "no config.json" in err and "\n" not in err


# ChatML as small instruct models ship it: every role rendered, neither tools nor tool_calls read
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# a template that renders tool definitions and an assistant's calls
TOOL_CHATML = ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% for m in messages %}<|im_start|>"
               "{{ m.role }}\n{{ m.content or '' }}{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>"
               "{% endfor %}<|im_end|>{% endfor %}")
CALL = [{"role": "user", "content": "read a.txt"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                              "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "content": "hello", "tool_call_id": "1"}]
TOOLS = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]


def test_what_a_chat_template_expresses_of_tool_calling():
    from tandem_vllm.serve.chat_template import ToolSupport, tool_support

    assert tool_support([PLAIN_CHATML]) == ToolSupport(definitions=False, calls=False)
    assert tool_support([TOOL_CHATML]) == ToolSupport(definitions=True, calls=True)
    subscript = "{% for m in messages %}{% if 'tool_calls' in m %}{{ m['tool_calls'] | tojson }}{% endif %}{% endfor %}"
    assert tool_support([subscript]) == ToolSupport(definitions=False, calls=True)
    assert tool_support([PLAIN_CHATML, TOOL_CHATML]) == ToolSupport(True, True)  # the template for tools counts
    assert tool_support([]) is None and tool_support(["{% for %}"]) is None  # nothing known: nothing refused


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"messages": CALL}, "messages[1].tool_calls"),
        ({"messages": CALL[:1], "tools": TOOLS}, "tools"),
        ({"messages": CALL[:1], "tools": TOOLS, "tool_choice": "auto"}, "tools"),
    ],
)
def test_tool_calling_a_template_would_drop_is_refused_naming_the_field(request_, param):
    from tandem_vllm.serve.chat_template import tool_support

    plain = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2, tool_support=tool_support([PLAIN_CHATML]))
    status, got = _call(plain, json.dumps({"model": "m", **request_}).encode(), path="/v1/chat/completions")
    assert status == 400 and got["error"]["param"] == param and "chat template cannot express" in got["error"]["message"]
    capable = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2, tool_support=tool_support([TOOL_CHATML]))
    assert _call(capable, json.dumps({"model": "m", **request_}).encode(), path="/v1/chat/completions")[0] == 200


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "read"}}, "required", "none"])
def test_constrained_or_declined_tool_choice_is_served_on_any_template(choice):
    """A named or required tool_choice constrains the output to the tools' schemas: served without the
    template showing them (the compatibility matrix's tool-call row); "none" asks for no call."""
    from tandem_vllm.serve.chat_template import tool_support

    plain = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2, tool_support=tool_support([PLAIN_CHATML]))
    body = {"model": "m", "messages": CALL[:1], "tools": TOOLS, "tool_choice": choice}
    assert _call(plain, json.dumps(body).encode(), path="/v1/chat/completions")[0] == 200


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role", "Invalid value: 'wizard'"),
        ([{"role": "system", "content": "be brief"}, {"role": "user"}], "messages[1].content", "Missing required"),
        ([{"role": "user", "content": None}], "messages[0].content", "Missing required"),
    ],
)
def test_chat_messages_are_checked_as_openai_checks_them(messages, param, fragment):
    app = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2)
    status, got = _call(app, json.dumps({"model": "m", "messages": messages}).encode(), path="/v1/chat/completions")
    assert status == 400 and got["error"]["param"] == param and fragment in got["error"]["message"], got


def test_valid_chat_and_extra_roles_pass_through():
    ok = [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]},
          {"role": "tool", "content": "42", "tool_call_id": "1"}]
    app = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2)
    assert _call(app, json.dumps({"messages": ok}).encode(), path="/v1/chat/completions")[0] == 200
    custom = json.dumps({"messages": [{"role": "ipython", "content": "out"}]}).encode()
    assert _call(app, custom, path="/v1/chat/completions")[0] == 400
    roomy = LimitsAndLogging(_echo, max_request_bytes=4096, max_n=2, extra_roles=("ipython",))
    assert _call(roomy, custom, path="/v1/chat/completions")[0] == 200
    # the completions route has no messages to check
    assert _call(app, json.dumps({"prompt": "x", "messages": "not checked"}).encode())[0] == 200


def test_engine_flags_vllm_refuses_are_one_error_before_any_replica_starts(tmp_path):
    """Without this a replica's vLLM parser exits with code 2 and Serve restarts it in a loop, and the
    app's failure names no cause."""
    from tandem_vllm.serve.app import preflight

    (tmp_path / "config.json").write_text("{}")
    for flags, said in ((["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
                        (["--structured-outputs-config", '{"disable_any_whitespace": true}'],
                         "disable_any_whitespace is only supported for xgrammar and guidance")):
        cfg = ServeConfig.parse({"model": str(tmp_path), "vllm_args": flags})
        with pytest.raises(TandemError, match="vLLM refuses the engine arguments") as e:
            preflight(cfg)
        assert said in str(e.value) and "\n" not in str(e.value)
    preflight(ServeConfig.parse({"model": str(tmp_path), "vllm_args": ["--enable-prefix-caching"]}))


def _listener_process(tmp_path, argv0: str, *extra: str):
    """A process listening on a free port, whose command line is ``argv0 ... extra`` (argv0 links to python)."""
    import os
    import subprocess
    import sys
    import time

    from tandem_vllm.serve.launch import _port_free, free_port

    port = free_port()
    exe = tmp_path / argv0
    os.symlink(os.path.realpath(sys.executable), exe)
    code = ("import socket,sys,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); "
            f"s.bind(('0.0.0.0',{port})); s.listen(); time.sleep(120)")
    proc = subprocess.Popen([str(exe), "-c", code, *extra])
    deadline = time.monotonic() + 30
    while _port_free("0.0.0.0", port):
        assert time.monotonic() < deadline and proc.poll() is None, "the listener did not start"
        time.sleep(0.05)
    return proc, port


def test_a_dead_servers_haproxy_is_stopped_and_its_ports_reclaimed(tmp_path, capsys):
    """What a server killed hard leaves behind: Ray's HAProxy, its config on the command line, no Ray parent."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    from tandem_vllm.serve.launch import _port_free, reclaim_ports

    proc, port = _listener_process(tmp_path, "haproxy", "-db", "-f", RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)
    try:
        reclaim_ports("0.0.0.0", (port,))
        assert proc.wait(10) is not None and _port_free("0.0.0.0", port)
        assert f"port {port}: stopping a dead server's HAProxy" in capsys.readouterr().out
    finally:
        proc.kill()


@pytest.mark.parametrize("argv0, extra", [("python-server", ("-f", "/tmp/haproxy-serve/haproxy.cfg")),
                                          ("haproxy", ("-f", "/etc/haproxy/haproxy.cfg"))])
def test_a_port_held_by_anything_else_is_refused_naming_the_process(tmp_path, argv0, extra):
    """Another program, or an HAProxy that is not Ray Serve's, keeps running; the error names its pid."""
    from tandem_vllm.serve.launch import reclaim_ports

    proc, port = _listener_process(tmp_path, argv0, *extra)
    try:
        with pytest.raises(TandemError, match=rf"port {port} is in use by pid {proc.pid} \(.*{argv0}"):
            reclaim_ports("0.0.0.0", (port,))
        assert proc.poll() is None
    finally:
        proc.kill()


def test_haproxys_side_ports_move_when_another_server_holds_them(tmp_path, monkeypatch):
    """A second server on one machine: Ray's HAProxy stats/metrics ports are taken by the first one."""
    import os

    from tandem_vllm.serve import launch

    proc, port = _listener_process(tmp_path, "haproxy", "-f", "/etc/haproxy/haproxy.cfg")  # alive, not ours
    try:
        free = launch.free_port()
        monkeypatch.setattr(launch, "HAPROXY_SIDE_PORTS", {"TANDEM_TEST_SIDE_PORT": port, "TANDEM_TEST_FREE_PORT": free})
        monkeypatch.delenv("TANDEM_TEST_SIDE_PORT", raising=False)
        monkeypatch.delenv("TANDEM_TEST_FREE_PORT", raising=False)
        launch.move_haproxy_side_ports()
        moved = int(os.environ["TANDEM_TEST_SIDE_PORT"])
        assert moved != port and launch._port_free("0.0.0.0", moved) and proc.poll() is None
        assert "TANDEM_TEST_FREE_PORT" not in os.environ  # a free default stays Ray's default
    finally:
        proc.kill()


def test_free_ports_come_from_outside_the_ranges_other_processes_take_ports_from():
    """A port picked from the kernel's ephemeral range (where every port-0 bind and outgoing connection
    lands: vLLM's ZMQ sockets, Ray's) was taken again before HAProxy bound it; Ray's workers take
    10002-19999 and Serve's replicas 30000-31000 / 40000-41000. free_port() stays out of all of them,
    and what it returns binds."""
    import socket
    from pathlib import Path

    from tandem_vllm.serve.launch import free_port

    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # spread, not one port handed to every caller
    taken_by_ray = (range(10002, 20000), range(30000, 31001), range(40000, 41001))  # workers, direct ingress
    assert all(not lo <= p <= hi and not any(p in r for r in taken_by_ray) for p in ports), sorted(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_a_replica_stops_its_engine_as_vllm_serve_does():
    """Within vLLM's shutdown_timeout (0 unless set), as `vllm serve` does: vLLM's default wait gives the
    engine process 5 s, and an idle CPU engine used them all before it was killed."""
    import types

    from tandem_vllm.serve.app import TandemServer

    timeouts = []
    engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(shutdown_timeout=0),
                                   shutdown=lambda timeout=None: timeouts.append(timeout))
    asyncio.run(TandemServer.__del__(types.SimpleNamespace(engine=engine)))
    assert timeouts == [0]
    asyncio.run(TandemServer.__del__(types.SimpleNamespace()))  # a replica whose engine never started
    assert timeouts == [0]
