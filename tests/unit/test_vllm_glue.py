"""The pure-tensor pieces of the vLLM hook, checked against brute force (no engine)."""

import pytest
import torch

pytest.importorskip("vllm")

from tandem_vllm.decoding import vllm_glue  # noqa: E402
from tandem_vllm.errors import TandemError  # noqa: E402


def _brute_force_rows(lengths, rejected):
    """Draft-model layout: request r's verified rows, then its bonus row, then its rejected rows."""
    num_in, num_out = sum(lengths), sum(lengths) + len(lengths)
    dst, out = [], 0
    for n, rej in zip(lengths, rejected):
        verified = n - rej
        dst += list(range(out, out + verified)) + [num_out] * rej
        out += n + 1
    assert len(dst) == num_in
    return dst


@pytest.mark.parametrize(
    ("lengths", "rejected"),
    [([5], [0]), ([4, 4, 4], [0, 2, 3]), ([1, 7, 2, 4], [0, 0, 1, 3]), ([130, 1, 4], [0, 0, 0])],
)
def test_context_rows_place_verified_target_rows_and_drop_rejected_ones(lengths, rejected):
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    num_in = sum(lengths)
    num_out = num_in + len(lengths)
    got = vllm_glue.context_rows(qsl, torch.tensor(rejected, dtype=torch.int32), num_in, num_out)
    assert got.tolist() == _brute_force_rows(lengths, rejected)
    if not any(rejected):  # prefill steps pass no rejection counts
        assert vllm_glue.context_rows(qsl, None, num_in, num_out).tolist() == _brute_force_rows(lengths, rejected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_batch_to_tokens_repeats_each_request_value_per_draft_token(dtype):
    x = torch.tensor([0.8, 1.3, -1], dtype=torch.float32).to(dtype)
    counts = [3, 0, 2]
    cu = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    got = vllm_glue.expand_batch_to_tokens(x, cu, 5, replace_from=-1, replace_to=7)
    want = [7 if v == -1 else v for v, c in zip(x.tolist(), counts) for _ in range(c)]
    assert got.dtype == dtype
    assert got.tolist() == want


def test_an_unsupported_vllm_version_is_refused_by_name():
    with pytest.raises(TandemError, match="supports vLLM 0.32.x; this is vLLM 0.33.1"):
        vllm_glue.check_vllm_version("0.33.1")
    vllm_glue.check_vllm_version("0.32.0")


@pytest.mark.parametrize(
    ("extra_args", "off"),
    [(None, False), ({}, False), ({"speculate": "on"}, False), ({"speculate": 1}, False),
     ({"speculate": "off"}, True), ({"speculate": "False"}, True), ({"speculate": 0}, True), ({"speculate": False}, True)],
)
def test_per_request_opt_out_values(extra_args, off):
    from types import SimpleNamespace

    assert vllm_glue.speculation_opted_out(SimpleNamespace(extra_args=extra_args)) is off


def test_drafts_are_fetched_from_the_runner_only_after_steps_that_asked_for_them():
    """vLLM's dynamic K: after a K = 0 step the engine skips the post-step RPC for (empty) drafts."""

    class Out:
        def __init__(self, k):
            self.num_spec_tokens_to_schedule = k

    class Scheduler:
        num_spec_tokens = 3

        def __init__(self, ks):
            self.ks = iter(ks)

        def schedule(self):
            return Out(next(self.ks))

    class Engine:
        async_scheduling = False

        def __init__(self, scheduler):
            self.scheduler, self.fetched = scheduler, 0

        def post_step(self, model_executed):
            self.fetched += 1

    vllm_glue._no_draft_handover_after_k0_steps(Scheduler, Engine)
    engine = Engine(Scheduler([3, 0, 0, 3, 1]))
    fetched = []
    for _ in range(5):
        engine.scheduler.schedule()
        engine.post_step(True)
        fetched.append(engine.fetched)
    assert fetched == [1, 1, 1, 2, 3]
    engine.async_scheduling = True  # drafts never go through post_step there; leave vLLM's path alone
    engine.scheduler = Scheduler([0])
    engine.scheduler.schedule()
    engine.post_step(True)
    assert engine.fetched == 4
