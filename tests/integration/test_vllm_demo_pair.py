"""The demo pair in vLLM itself (CPU engine): the target loads natively, and vLLM's own SPEED
with our standalone drafter reproduces the reference decoder's greedy output."""

import pytest
import vllm

from tandem_vllm.decoding.speculate import generate
from tandem_vllm.demo.build import build
from tandem_vllm.modeling.target import load_causal_lm
from tandem_vllm.prompts import read_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    return build("ci", progress=False)


def test_vllm_speed_with_the_demo_drafter_matches_the_reference_target(demo):
    prompts = read_prompts(demo["heldout_prompts"])[:16]
    llm = vllm.LLM(
        model=demo["target"],
        speculative_config={"model": demo["baseline"], "num_speculative_tokens": 3},
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=256 * 2**20,
        enforce_eager=True,
        seed=0,
    )
    try:
        outs = llm.generate(prompts, vllm.SamplingParams(temperature=0, max_tokens=32))
    finally:
        del llm
    target = load_causal_lm(demo["target"])
    ids = [target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [list(o.prompt_token_ids) for o in outs] == ids  # same tokenization, no BOS added
    want = generate(target.model, ids, max_new_tokens=32, eos_token_id=target.tokenizer.eos_token_id).tokens
    assert [list(o.outputs[0].token_ids) for o in outs] == want
