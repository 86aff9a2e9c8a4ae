"""The compatibility rows that need other engine flags, through vLLM's own OpenAI server (the server a
user runs without Ray) with the Tandem drafter: prefix caching off, and tensor parallel 2 (on these
CPUs vLLM needs VLLM_CPU_OMP_THREADS_BIND="0|1" for 2 ranks). One server at a time, after the Serve
app's module (two engines on 2 cores starve each other)."""

from __future__ import annotations

import json

import openai
import pytest
import vllm  # noqa: F401  (required: a missing package fails the suite)

from tandem_vllm.demo.build import build
from tandem_vllm.serve.launch import free_port
from tandem_vllm.vllm_adapter.engine import start_api_server, stop_api_server
from tests.integration.compat import PAIR, Row
from tests.integration.test_compat_matrix import _completion_text, _same_greedy, both

pytestmark = pytest.mark.slow

PROMPTS = ["def parse(line):\n", "class Stack:\n    def push(self, x):\n", "for path in paths:\n"]


def _server(extra: list[str], log_path, env: dict[str, str] | None = None):
    demo = build(PAIR, progress=False)
    port = free_port()
    spec = {"model": demo["tandem"], "num_speculative_tokens": 3}
    argv = ["--model", demo["target"], "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(256 * 2**20), "--speculative-config", json.dumps(spec),
            "--per-request-spec-decode-metrics", "summary", "--disable-uvicorn-access-log", *extra]
    p = start_api_server(argv, host="127.0.0.1", port=port, log_path=log_path, env=env)
    return p, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.mark.parametrize(("name", "extra", "env"), [
    ("prefix caching off", ["--no-enable-prefix-caching"], None),
    ("tensor parallel 2", ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
     {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
])
def test_vllm_server_row(name, extra, env, tmp_path):
    if PAIR == "chat" and name == "tensor parallel 2":
        pytest.skip("SmolLM2-135M's 3 KV heads do not split over 2 ranks")
    p, client = _server(extra, tmp_path / "server.log", env)
    try:
        with Row(name) as row:
            drafted = 0
            for prompt in PROMPTS:
                on, off = both(client.completions.create, model="m", prompt=prompt, max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True})
                _same_greedy(row, on, off, texts=_completion_text)
                drafted += int(on.model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"])
            row.notes = f"{len(PROMPTS)} prompts, {drafted} tokens drafted; greedy output identical to speculation off"
    finally:
        stop_api_server(p)
