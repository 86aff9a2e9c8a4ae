"""The adaptive block-length router: features, stopping rule, checkpoints, and decoding with it
(lossless when greedy, the target's distribution when sampling, fewer drafts when it stops)."""

from __future__ import annotations

import pytest
import torch

from tandem_vllm.decoding.speculate import ReferenceTandemProposer, Sampling, generate
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.router import (
    ROUTER_DIR,
    ROUTER_WEIGHTS,
    BlockLengthRouter,
    BlockLengthRouterConfig,
    draft_lengths,
)

from ..conftest import tiny_tandem
from .test_speculate import PROMPTS, STEPS, N, _chi2_pvalue, _exact_joint, _sharpen, tiny_vocab_pair  # noqa: F401


def test_draft_lengths_stop_at_the_first_position_below_threshold():
    prob = torch.tensor([[0.9, 0.8, 0.7, 0.6],   # never below: all 4
                         [0.9, 0.4, 0.9, 0.9],   # stops before the 2nd draft
                         [0.1, 0.1, 0.9, 0.9],   # the first draft is always proposed
                         [0.9, 0.9, 0.9, 0.2]])
    assert draft_lengths(prob, 0.5).tolist() == [4, 1, 1, 3]
    assert draft_lengths(prob, 0.0).tolist() == [4, 4, 4, 4]


def test_verify_treats_a_shortened_row_as_a_block_of_its_length():
    """Row proposed 2 drafts but the router kept 1: draft 2 is never accepted, and once draft 1 is,
    the next token comes from the target's distribution at position 1 (not a residual against the
    unproposed draft)."""
    from tandem_vllm.decoding.speculate import verify

    v = 5
    drafts = torch.tensor([[1, 2]])
    p = torch.nn.functional.one_hot(drafts, v).float()
    q = torch.zeros(1, 3, v)
    q[0, 0, 1] = 1.0  # the target agrees with draft 1
    q[0, 1, 2] = q[0, 1, 3] = 0.5  # and would accept draft 2 half of the time
    q[0, 2, 4] = 1.0
    seen = set()
    for seed in range(200):
        n, nxt = verify(drafts, p, q, torch.Generator().manual_seed(seed), lengths=torch.tensor([1]))
        assert n.item() == 1
        seen.add(nxt.item())
    assert seen == {2, 3}  # q[1] itself; (q[1] - p[1])+ would only ever give 3
    n, _ = verify(drafts, p, q, torch.Generator().manual_seed(0), lengths=torch.tensor([2]))
    assert n.item() in (1, 2)


def test_features_are_entropy_top_probabilities_and_top_embeddings():
    router = BlockLengthRouter(BlockLengthRouterConfig(embed_dim=3, top_k=2))
    embed = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    flat = router.features(torch.zeros(1, 5), embed)[0]
    assert flat.shape == (BlockLengthRouterConfig(embed_dim=3, top_k=2).num_features,)
    assert flat[0] == pytest.approx(1.0)  # uniform: maximal entropy, normalised to 1
    assert flat[1:3].tolist() == pytest.approx([0.2, 0.2])
    sharp = router.features(torch.tensor([[0.0, 0.0, 30.0, 0.0, 20.0]]), embed)[0]
    assert sharp[0] < 0.01 and sharp[1] > 0.99
    assert sharp[3:6].tolist() == embed[2].tolist() and sharp[6:9].tolist() == embed[4].tolist()


def test_features_of_draft_vocabulary_logits_are_finite():
    """A draft vocabulary's logits reach the router scattered into the target's, -inf elsewhere."""
    router = BlockLengthRouter(BlockLengthRouterConfig(embed_dim=3, top_k=2))
    embed = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    scattered = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf"), 0.0]])
    flat = router.features(scattered, embed)[0]
    assert torch.isfinite(flat).all() and torch.isfinite(router.accept_prob(scattered, embed)).all()
    assert flat[0] == pytest.approx(torch.log(torch.tensor(3.0)).item() / torch.log(torch.tensor(5.0)).item())
    assert flat[1:3].tolist() == pytest.approx([1 / 3, 1 / 3])


def test_router_checkpoint_round_trip_and_a_corrupt_one_is_named(tmp_path):
    torch.manual_seed(0)
    router = BlockLengthRouter(BlockLengthRouterConfig(embed_dim=8, top_k=3, hidden=16, threshold=0.3))
    router.save(tmp_path)
    back = BlockLengthRouter.load(tmp_path)
    assert back is not None and back.cfg == router.cfg
    x = torch.randn(5, router.cfg.num_features)
    assert torch.equal(back(x), router(x))
    assert BlockLengthRouter.load(tmp_path / "elsewhere") is None  # a drafter without a router
    assert not list(tmp_path.glob("*.safetensors"))  # out of the way of model loaders
    (tmp_path / ROUTER_DIR / ROUTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(TandemError, match="router files are unreadable"):
        BlockLengthRouter.load(tmp_path)
    with pytest.raises(TandemError, match="threshold"):
        BlockLengthRouterConfig(embed_dim=8, threshold=1.5)


def _router_for(drafter, threshold: float, seed: int = 3) -> BlockLengthRouter:
    torch.manual_seed(seed)
    return BlockLengthRouter(BlockLengthRouterConfig(embed_dim=drafter.cfg.hidden_size, top_k=2, hidden=8, threshold=threshold)).eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_with_a_router_is_identical_to_target_alone_with_fewer_drafts(target, batch):
    drafter = tiny_tandem(target, layers=2)
    prompts, k = PROMPTS[:batch], 4
    want = generate(target, prompts, max_new_tokens=20).tokens
    fixed = generate(target, prompts, max_new_tokens=20, proposer=ReferenceTandemProposer(drafter), k=k,
                     taps=drafter.cfg.tap_layers)
    router = _router_for(drafter, threshold=0.5)
    probs = router.accept_prob(torch.randn(200, target.config.vocab_size), drafter.model.embed_tokens.weight)
    assert 0.05 < float((probs < 0.5).float().mean()) < 0.95  # this router really stops sometimes
    got = generate(target, prompts, max_new_tokens=20, proposer=ReferenceTandemProposer(drafter, router), k=k,
                   taps=drafter.cfg.tap_layers)
    assert got.tokens == want == fixed.tokens
    assert got.stats.drafted < k * got.stats.target_passes - got.stats.emitted  # blocks were shortened
    assert got.stats.drafted < fixed.stats.drafted
    never = generate(target, prompts, max_new_tokens=20, proposer=ReferenceTandemProposer(drafter, _router_for(drafter, 0.0)),
                     k=k, taps=drafter.cfg.tap_layers)
    assert never.stats.as_dict() == fixed.stats.as_dict()  # threshold 0: fixed blocks exactly


def test_sampling_with_a_router_keeps_the_target_distribution(tiny_vocab_pair):
    target, _ = tiny_vocab_pair
    prompt = [1, 3, 0, 2]
    tandem = _sharpen(tiny_tandem(target, layers=1, seed=13), 12.0)
    router = _router_for(tandem, threshold=0.5, seed=4)
    with torch.no_grad():  # make it stop on roughly half of the positions
        router.net[2].bias.fill_(0.0)
    got = generate(target, [prompt] * N, max_new_tokens=STEPS, sampling=Sampling(temperature=1.0), seed=5,
                   proposer=ReferenceTandemProposer(tandem, router), k=3, taps=tandem.cfg.tap_layers)
    passes_if_fixed = got.stats.target_passes - N  # decode passes (the prefill pass drafts nothing)
    assert got.stats.drafted < 3 * passes_if_fixed  # the router shortened blocks
    assert _chi2_pvalue(got.tokens, _exact_joint(target, prompt)) > 1e-3


def test_bad_router_training_arguments_are_refused(tmp_path):
    from tandem_vllm.train.router import RouterArgs

    with pytest.raises(TandemError, match="--k 1"):
        RouterArgs(target=tmp_path, drafter=tmp_path / "d", data=(tmp_path / "x",), out=tmp_path / "o", k=1)
    with pytest.raises(TandemError, match="--out must differ"):
        RouterArgs(target=tmp_path, drafter=tmp_path / "d", data=(tmp_path / "x",), out=tmp_path / "d")
