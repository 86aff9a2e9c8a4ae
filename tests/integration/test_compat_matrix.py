"""The compatibility matrix through the Ray Serve app's OpenAI API (ci demo pair or, with
TANDEM_COMPAT_PAIR=chat, the chat pair; Tandem k=3, prefix
caching on): every row sends a request with speculation and the same request with speculation off
for that request (vllm_xargs speculate=off: plain target decoding in the same engine), and checks
that the drafter really drafted, that greedy output is identical, and that what was asked for holds
(valid JSON for a schema, a listed choice, a regex match, ...). Rows are recorded for docs/serving.md
table (compat.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import openai
import pytest
import ray  # noqa: F401  (required: a missing package fails the suite)
import vllm  # noqa: F401  (required: a missing package fails the suite)

from tests.integration.compat import PAIR, Row

pytestmark = pytest.mark.slow

MODEL = "tandem-demo"
MAX_MODEL_LEN = 1024
OFF = {"vllm_xargs": {"speculate": "off"}}


@pytest.fixture(scope="module")
def app():
    from tandem_vllm.serve.launch import free_port, start, stop

    # whitespace inside JSON bounded (the small demo target would loop on it) and cached prompt tokens reported
    # (tool calls: vLLM 0.32 wants auto tool choice and a parser even for a named tool_choice; pythonic needs no
    # special tokens in the vocabulary)
    cfg = {"demo": PAIR, "vllm_args": ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--enable-auto-tool-choice",
                         "--tool-call-parser", "pythonic",
                         "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
           "kv_cache_memory_bytes": 256 * 2**20,
           # a fixed k: the chat pair's measured schedule drafts nothing from 3 running requests on, and every
           # row must draft
           "num_speculative_tokens": 3,
           "max_model_len": MAX_MODEL_LEN, "graceful_shutdown_timeout_s": 5}
    try:
        yield start(cfg, host="127.0.0.1", port=free_port(), grpc_port=free_port(), timeout_s=900, log_json=False)
    finally:
        stop()


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app.http}/v1", api_key="unused", max_retries=0, timeout=180)


def both(create, **kw):
    """The request with speculation, then with speculation off for it."""
    extra = kw.pop("extra_body", {})
    return create(**kw, extra_body=extra), create(**kw, extra_body={**extra, **OFF})


def drafts(resp) -> int:
    spec = (resp.model_extra.get("metrics") or {}).get("speculative_decoding") or {}
    return int(spec.get("num_draft_tokens", 0))


def _same_greedy(row: Row, on, off, *, texts) -> None:
    assert drafts(on) > 0, "the drafter proposed nothing for this request"
    assert drafts(off) == 0, "the opted-out request drafted"
    a, b = texts(on), texts(off)
    assert a == b, f"speculation changed the output: {a!r} vs {b!r}"
    row.notes = f"drafted {drafts(on)} tokens; greedy output identical to speculation off"


def _completion_text(r):
    return [c.text for c in r.choices]


def _chat_text(r):
    return [c.message.content for c in r.choices]


def test_plain_completion(client):
    with Row("plain completion (greedy)") as row:
        on, off = both(client.completions.create, model=MODEL, prompt="def parse(line):\n", max_tokens=24,
                       temperature=0, extra_body={"ignore_eos": True})
        _same_greedy(row, on, off, texts=_completion_text)


def test_json_schema(client):
    # every field bounded: the small demo target would fill an unbounded integer with digits until max_tokens
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "kind": {"enum": ["file", "dir", "link"]}, "hidden": {"type": "boolean"}},
              "required": ["name", "kind", "hidden"], "additionalProperties": False}
    with Row("structured outputs: response_format json_schema") as row:
        on, off = both(client.chat.completions.create, model=MODEL, temperature=0, max_tokens=64,
                       messages=[{"role": "user", "content": "Describe the file as JSON."}],
                       response_format={"type": "json_schema", "json_schema": {"name": "file", "schema": schema}})
        _same_greedy(row, on, off, texts=_chat_text)
        value = json.loads(on.choices[0].message.content)
        assert set(value) == {"name", "kind", "hidden"} and value["kind"] in ("file", "dir", "link")
        row.notes += "; valid JSON with the schema's fields"


def test_choice(client):
    # several tokens each on any tokenizer, so the request has steps after the first where the drafter drafts
    choices = ["os.path.join(root, name)", "os.path.abspath(name)", "os.path.normpath(root)"]
    with Row("structured outputs: choice") as row:
        on, off = both(client.completions.create, model=MODEL, prompt="import os\n\nfull = ", max_tokens=16,
                       temperature=0,
                       extra_body={"structured_outputs": {"choice": choices}})
        _same_greedy(row, on, off, texts=_completion_text)
        assert on.choices[0].text in choices
        row.notes += "; one of the choices"


def test_regex(client):
    pattern = r"[a-z_]{3,12}\([a-z_, ]{0,20}\):\n    return [a-z_]{1,12}"
    with Row("structured outputs: regex") as row:
        on, off = both(client.completions.create, model=MODEL, prompt="def ", max_tokens=48, temperature=0,
                       extra_body={"structured_outputs": {"regex": pattern}})
        _same_greedy(row, on, off, texts=_completion_text)
        assert re.fullmatch(pattern, on.choices[0].text), on.choices[0].text
        row.notes += "; the text matches the regex"


def test_named_tool_call(client):
    tool = {"type": "function", "function": {
        "name": "read_file", "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 16}},
                       "required": ["path"], "additionalProperties": False}}}
    with Row("tool call (named tool_choice)") as row:
        on, off = both(client.chat.completions.create, model=MODEL, temperature=0, max_tokens=48,
                       messages=[{"role": "user", "content": "Open the config."}], tools=[tool],
                       tool_choice={"type": "function", "function": {"name": "read_file"}})
        calls = [c.message.tool_calls for c in (on.choices[0], off.choices[0])]
        assert drafts(on) > 0 and drafts(off) == 0
        assert [[(t.function.name, t.function.arguments) for t in c] for c in calls][0] == \
               [[(t.function.name, t.function.arguments) for t in c] for c in calls][1]
        args = json.loads(calls[0][0].function.arguments)
        assert calls[0][0].function.name == "read_file" and isinstance(args["path"], str)
        row.notes = f"drafted {drafts(on)} tokens; the same call with valid arguments as speculation off"


def test_prefix_caching_on(client):
    prompt = "class Cache:\n    def __init__(self, size):\n        self.size = size\n" * 30  # several KV blocks
    with Row("prefix caching on (repeated prompt hits the cache)") as row:
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        on, off = both(client.completions.create, model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        cached = on.usage.prompt_tokens_details.cached_tokens
        assert cached > 0 and off.usage.prompt_tokens_details.cached_tokens > 0, "no prompt token came from the cache"
        _same_greedy(row, on, off, texts=_completion_text)
        assert on.choices[0].text == first.choices[0].text  # a cached prefix changes nothing either
        row.notes += f"; {cached} of {on.usage.prompt_tokens} prompt tokens from the cache, same text as uncached"


def test_logprobs(client):
    with Row("logprobs (top 3)") as row:
        on, off = both(client.completions.create, model=MODEL, prompt="for key in ", max_tokens=16, temperature=0,
                       logprobs=3)
        _same_greedy(row, on, off, texts=_completion_text)
        a, b = on.choices[0].logprobs, off.choices[0].logprobs
        assert a.tokens == b.tokens and len(a.top_logprobs) == 16
        assert all(len(t) == 3 for t in a.top_logprobs)
        # the target's own log-probabilities; verification computes them for 4 tokens at once, so not bitwise
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)
        row.notes += "; same tokens, 3 alternatives each, token logprobs within 1e-3"


def _drafts_total(app) -> float:
    """vLLM's counter of drafting steps (per-request stats are not reported for n > 1 or stop strings)."""
    time.sleep(0.5)  # the engine's stats reach the frontend's counters after the response
    text = urllib.request.urlopen(f"{app.http}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:spec_decode_num_drafts_total"))


def test_n_greater_than_one(client, app):
    with Row("n > 1 (n=2, T=1, seeded)") as row:
        kw = dict(model=MODEL, prompt="while True:\n", max_tokens=16, temperature=1.0, n=2, seed=5)
        before = _drafts_total(app)
        a = client.completions.create(**kw)
        drafted = _drafts_total(app) - before
        b = client.completions.create(**kw)
        assert drafted > 0, "no drafting step for the n=2 request"
        assert len(a.choices) == 2 and _completion_text(a) == _completion_text(b)  # the seed fixes both samples
        assert a.choices[0].text != a.choices[1].text  # two samples, not one copied
        row.notes = (f"{drafted:.0f} drafting steps; two different samples, the same two again with the same seed "
                     "(vLLM refuses n > 1 when greedy)")


def test_stop_strings(client, app):
    with Row("stop strings") as row:
        full = client.completions.create(model=MODEL, prompt="def main():\n", max_tokens=32, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
        before = _drafts_total(app)
        on, off = both(client.completions.create, model=MODEL, prompt="def main():\n", max_tokens=32, temperature=0,
                       stop=[stop], extra_body={"ignore_eos": True})
        drafted = _drafts_total(app) - before
        assert drafted > 0, "no drafting step for the stopped request"
        assert _completion_text(on) == _completion_text(off)
        assert on.choices[0].finish_reason == "stop" and on.choices[0].text == full[: full.index(stop)]
        row.notes = (f"{drafted:.0f} drafting steps; identical to speculation off, cut exactly before the stop string "
                     f"{stop!r} (vLLM reports no per-request stats when a stop string ends it)")


def test_seed(client):
    with Row("seed (T=1, same seed twice)") as row:
        kw = dict(model=MODEL, prompt="import ", max_tokens=24, temperature=1.0, seed=11)
        a, b = client.completions.create(**kw), client.completions.create(**kw)
        assert drafts(a) > 0 and a.choices[0].text == b.choices[0].text
        other = client.completions.create(**{**kw, "seed": 12})
        assert other.choices[0].text != a.choices[0].text
        row.notes = f"drafted {drafts(a)} tokens (sampled from the drafter); same seed, same text; another seed differs"


def test_prompt_near_max_model_len(client, app):
    tok = client.completions.create(model=MODEL, prompt="x", max_tokens=1)  # warm: the server is up
    assert tok.choices
    ids = [int(i) for i in json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{app.http}/tokenize", data=json.dumps({"model": MODEL, "prompt": "def f(x):\n    return x\n" * 200}).encode(),
        headers={"Content-Type": "application/json"}), timeout=60).read())["tokens"]]
    prompt = ids[: MAX_MODEL_LEN - 16]
    with Row("prompt near max_model_len") as row:
        on, off = both(client.completions.create, model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                       extra_body={"ignore_eos": True})
        _same_greedy(row, on, off, texts=_completion_text)
        assert on.usage.prompt_tokens + on.usage.completion_tokens == MAX_MODEL_LEN
        with pytest.raises(openai.BadRequestError):  # a prompt that leaves no room: a 400, not a crash
            client.completions.create(model=MODEL, prompt=ids[:MAX_MODEL_LEN], max_tokens=1, temperature=0)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices  # and it keeps serving
        row.notes += f"; {len(prompt)} + 16 tokens = max_model_len; a {MAX_MODEL_LEN}-token prompt is a 400"
