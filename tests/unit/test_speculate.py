import itertools

import pytest
import torch
from scipy.stats import chisquare

from tandem_vllm.decoding import speculate
from tandem_vllm.decoding.speculate import (
    ReferenceDraftModelProposer,
    ReferenceTandemProposer,
    Sampling,
    generate,
    to_probs,
    verify,
)
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.target import hidden_taps

from ..conftest import tiny_llama, tiny_tandem

PROMPTS = [[5, 17, 3, 88, 41, 9, 23], [61, 2], [7, 7, 7, 30, 12], [90, 1, 44, 45]]


def naive_greedy(model, prompt, n):
    """No cache, no batching: argmax of a full forward pass per token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_target_alone_matches_naive_greedy(target):
    got = generate(target, PROMPTS, max_new_tokens=12)
    assert got.tokens == [naive_greedy(target, p, 12) for p in PROMPTS]
    assert got.stats.tau == pytest.approx(1.0)


def _decoders(target, draft_lm):
    drafter = tiny_tandem(target, layers=2)
    return {
        "speed": lambda k: dict(proposer=ReferenceDraftModelProposer(draft_lm), k=k),
        "tandem": lambda k: dict(proposer=ReferenceTandemProposer(drafter), k=k, taps=drafter.cfg.tap_layers),
    }


@pytest.mark.parametrize("kind", ["speed", "tandem"])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculation_is_identical_to_target_alone(target, draft_lm, kind, k, batch):
    prompts = PROMPTS[:batch]
    want = generate(target, prompts, max_new_tokens=20).tokens
    got = generate(target, prompts, max_new_tokens=20, **_decoders(target, draft_lm)[kind](k))
    assert got.tokens == want
    s = got.stats
    assert s.drafted > 0 and 0 <= s.accepted <= s.drafted
    assert 1.0 <= s.tau <= k + 1


def test_drafter_that_is_the_target_accepts_everything(target):
    got = generate(target, PROMPTS, max_new_tokens=16, proposer=ReferenceDraftModelProposer(target), k=3)
    assert got.stats.acceptance_rate == 1.0
    assert got.tokens == generate(target, PROMPTS, max_new_tokens=16).tokens


def test_standalone_tandem_keeps_drafts_and_takes_a_free_target_token_per_block(target):
    drafter = tiny_tandem(target)
    k = 3
    got = generate(target, PROMPTS[:2], max_new_tokens=9, proposer=ReferenceTandemProposer(drafter), k=k,
                   taps=drafter.cfg.tap_layers, mode="standalone")
    for prompt, out in zip(PROMPTS[:2], got.tokens):
        assert len(out) == 9
        # out[0] comes from prefill; then blocks of k drafts + 1 free token (target argmax)
        for end in range(k + 1, 9, k + 1):
            seq = torch.tensor([prompt + out[:end]])
            assert out[end] == int(target(seq).logits[0, -1].argmax())
    assert got.stats.accepted == got.stats.drafted


def test_verify_hand_computed():
    gen = torch.Generator().manual_seed(0)
    # greedy: drafts [1, 2], target argmaxes [1, 3, 0] -> accept one, then the target's 3
    p = torch.nn.functional.one_hot(torch.tensor([[1, 2]]), 4).double()
    q = torch.nn.functional.one_hot(torch.tensor([[1, 3, 0]]), 4).double()
    n, nxt = verify(torch.tensor([[1, 2]]), p, q, gen)
    assert (n.item(), nxt.item()) == (1, 3)
    # all accepted -> bonus from q[K]
    q2 = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0]]), 4).double()
    n, nxt = verify(torch.tensor([[1, 2]]), p, q2, gen)
    assert (n.item(), nxt.item()) == (2, 0)


def test_top_p_keeps_the_smallest_prefix_with_enough_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = to_probs(logits, Sampling(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))


def test_bad_sampling_and_k_are_refused(target):
    with pytest.raises(TandemError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(TandemError, match="k=0"):
        generate(target, PROMPTS, max_new_tokens=4, proposer=ReferenceDraftModelProposer(target), k=0)


# ---- sampling exactness ------------------------------------------------------------------------
V, N, STEPS = 4, 6000, 3


def _sharpen(model, scale):
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def tiny_vocab_pair():
    target = _sharpen(tiny_llama(vocab=V, layers=2, hidden=32, seed=11), 12.0)
    drafter = _sharpen(tiny_llama(vocab=V, layers=1, hidden=32, seed=12), 12.0)
    return target, drafter


@torch.no_grad()
def _exact_joint(target, prompt):
    """P(t1, t2, t3 | prompt) under the target at temperature 1, by enumeration."""
    probs = {}
    for seq in itertools.product(range(V), repeat=STEPS):
        ids = torch.tensor([prompt + list(seq)])
        lp = torch.log_softmax(target(ids).logits[0].double(), -1)
        n = len(prompt)
        probs[seq] = float(sum(lp[n - 1 + i, seq[i]] for i in range(STEPS)).exp())
    return probs


def _chi2_pvalue(outputs, exact):
    counts = {s: 0 for s in exact}
    for o in outputs:
        counts[tuple(o)] += 1
    cells = sorted(exact, key=exact.get)
    obs, exp, acc_o, acc_e = [], [], 0, 0.0
    for c in cells:  # pool the rarest cells so every expected count is >= 5
        acc_o, acc_e = acc_o + counts[c], acc_e + exact[c] * len(outputs)
        if acc_e >= 5:
            obs.append(acc_o), exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    exp[-1] += acc_e
    obs[-1] += acc_o
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("kind", ["speed", "tandem"])
def test_sampling_keeps_the_target_distribution(tiny_vocab_pair, kind):
    target, draft_lm = tiny_vocab_pair
    prompt = [1, 3, 0, 2]
    if kind == "speed":
        kw = dict(proposer=ReferenceDraftModelProposer(draft_lm), k=2)
    else:
        tandem = tiny_tandem(target, layers=1, seed=13)
        _sharpen(tandem, 12.0)
        kw = dict(proposer=ReferenceTandemProposer(tandem), k=2, taps=tandem.cfg.tap_layers)
    got = generate(target, [prompt] * N, max_new_tokens=STEPS, sampling=Sampling(temperature=1.0), seed=5, **kw)
    assert 0.1 < got.stats.acceptance_rate < 0.95  # the drafter really differs from the target
    assert _chi2_pvalue(got.tokens, _exact_joint(target, prompt)) > 1e-3


def test_chi_square_check_catches_blind_acceptance(tiny_vocab_pair, monkeypatch):
    """The exactness test has power: accepting every draft yields the drafter's distribution."""
    target, draft_lm = tiny_vocab_pair

    def accept_all(drafts, p, q, gen, lengths=None):
        return torch.full((drafts.shape[0],), drafts.shape[1]), speculate.sample(q[:, -1], gen)

    monkeypatch.setattr(speculate, "verify", accept_all)
    prompt = [1, 3, 0, 2]
    got = generate(target, [prompt] * N, max_new_tokens=STEPS, sampling=Sampling(temperature=1.0), seed=5,
                   proposer=ReferenceDraftModelProposer(draft_lm), k=2)
    assert _chi2_pvalue(got.tokens, _exact_joint(target, prompt)) < 1e-6


# ---- tau oracle: replay the accept/reject walk from teacher-forced predictions ----------------
def _walk(predict, seq, start, k, max_new):
    """Greedy speculative-decoding statistics recomputed without any cache. ``seq`` (1, T) is the
    target's greedy output run k tokens past max_new (so the last step's drafts can be checked);
    ``predict(p)`` gives the drafter's teacher-forced argmaxes (T,) when the block starts at p."""
    p, emitted, passes, accepted = start, 1, 1, 0
    while emitted < max_new:
        pred = predict(p)
        n = 0
        while n < k and pred[p + n] == seq[0, p + n + 1]:
            n += 1
        passes, accepted = passes + 1, accepted + n
        emitted = min(max_new, emitted + n + 1)
        p += n + 1
    return passes, accepted


def _oracle(target, prompts, k, max_new, kind, drafter):
    totals = [0, 0]
    for prompt, out in zip(prompts, generate(target, prompts, max_new_tokens=max_new + k).tokens):
        seq = torch.tensor([prompt + out])
        t = seq.shape[1]
        if kind == "tandem":
            taps = hidden_taps(target(seq, output_hidden_states=True).hidden_states, drafter.cfg.tap_layers)

            def predict(p):
                starts = torch.where(torch.arange(t) >= p, p, torch.arange(t))[None]
                return drafter.forward_train(seq, taps, block_starts=starts).argmax(-1)[0]
        else:
            pred = drafter(seq).logits.argmax(-1)[0]

            def predict(p):
                return pred
        passes, accepted = _walk(predict, seq, len(prompt), k, max_new)
        totals[0] += passes
        totals[1] += accepted
    return totals


@pytest.mark.parametrize("kind", ["speed", "tandem"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_acceptance_counts_match_the_teacher_forced_walk(kind, k):
    target = tiny_llama(vocab=5, layers=2, hidden=32, seed=21)
    if kind == "tandem":
        drafter = tiny_tandem(target, layers=2, seed=22)
        kw = dict(proposer=ReferenceTandemProposer(drafter), k=k, taps=drafter.cfg.tap_layers)
    else:
        drafter = tiny_llama(vocab=5, layers=1, hidden=32, seed=22)
        kw = dict(proposer=ReferenceDraftModelProposer(drafter), k=k)
    prompts = [[1, 2, 3, 4, 0, 1, 2], [3, 3], [4, 0, 2, 1]]
    got = generate(target, prompts, max_new_tokens=24, **kw)
    passes, accepted = _oracle(target, prompts, k, 24, kind, drafter)
    assert (got.stats.target_passes, got.stats.accepted) == (passes, accepted)
    assert accepted > 0  # the walk compared something


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_tandem_with_a_qwen2_target_is_identical_to_target_alone(qwen_target, k):
    drafter = tiny_tandem(qwen_target, layers=2, taps=(0, 3))
    want = generate(qwen_target, PROMPTS, max_new_tokens=16).tokens
    got = generate(qwen_target, PROMPTS, max_new_tokens=16, proposer=ReferenceTandemProposer(drafter), k=k, taps=(0, 3))
    assert got.tokens == want


def test_ngram_lookup_takes_the_longest_match_at_its_earliest_occurrence():
    ng = speculate.ReferenceNgramProposer(prompt_lookup_min=2, prompt_lookup_max=3)
    #        0  1  2  3  4  5  6  7  8  9
    ctx = [1, 2, 3, 9, 1, 2, 3, 8, 2, 3]
    # suffix (2, 3) occurs at 1 and 5 (earliest: 1); (x, 2, 3) with x=8 never occurred before
    assert ng.lookup(ctx, 3) == [9, 1, 2]
    assert ng.lookup(ctx + [9], 2) == [1, 2]  # (2, 3, 9) at 1: the longest match wins
    assert ng.lookup([4, 5, 6, 4, 5], 4) == [6, 4, 5]  # fewer than k tokens follow the match
    assert ng.lookup([1, 2, 3, 4], 3) == []  # no n-gram repeats: no drafts


def test_ngram_decoding_is_lossless_and_counts_steps_without_drafts():
    target = tiny_llama(vocab=6, layers=2, hidden=32, seed=31)  # a tiny vocabulary repeats n-grams
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 0], [3, 3, 3, 3]]
    want = generate(target, prompts, max_new_tokens=20)
    got = generate(target, prompts, max_new_tokens=20, proposer=speculate.ReferenceNgramProposer(), k=3)
    assert got.tokens == want.tokens
    s = got.stats
    assert s.accepted > 0 and s.target_passes < want.stats.target_passes
    # every pass emits one token plus its accepted drafts, drafted or not
    assert s.emitted <= s.target_passes + s.accepted  # (the last pass may overshoot max_new_tokens)
    assert s.drafted < 3 * (s.target_passes - len(prompts))  # some steps found no n-gram
    depth = s.depth_acceptance
    assert s.attempted_per_pos[0] >= s.attempted_per_pos[1] >= s.attempted_per_pos[2]
    assert all(x is None or 0 <= x <= 1 for x in depth)
    assert s.attempted_per_pos[1] <= s.accepted_per_pos[0]  # depth 2 only after an accepted depth 1


def test_depth_acceptance_is_conditional_on_every_earlier_draft():
    s = speculate.DecodeStats(accepted_per_pos=[6, 3, 1], attempted_per_pos=[10, 6, 3])
    assert s.depth_acceptance == [0.6, 0.5, 1 / 3]
