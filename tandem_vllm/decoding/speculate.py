"""Reference decoders: target alone, SPEED, Tandem+SPEED and standalone Tandem, in one loop.

Every decoder is ``generate`` with a different proposer:
  * target alone        -- no proposer, k = 0 (each target pass emits one token);
  * SPEED               -- ``ReferenceDraftModelProposer`` (a standalone causal LM with its own KV cache);
  * Tandem+SPEED        -- ``ReferenceTandemProposer`` (context K/V from the target's own hidden states);
  * standalone Tandem   -- ``ReferenceTandemProposer`` with ``mode="standalone"``: drafts are kept without
    verification and the target's pass over the block only refreshes context (+ one free token).
Acceptance is standard speculative sampling, so in "speed" mode the output distribution is
exactly the target's (and at temperature 0 the output is token-for-token the target's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.reference import DrafterCache, TandemDrafter
from tandem_vllm.modeling.router import BlockLengthRouter
from tandem_vllm.modeling.target import CausalLMRunner, StepOutput


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TandemError(f"temperature={self.temperature}; use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            raise TandemError(f"top_p={self.top_p}; it must lie in (0, 1]")


def to_probs(logits: Tensor, s: Sampling) -> Tensor:
    """The distribution tokens are drawn from, (..., V). Greedy is the one-hot argmax, so that
    speculative sampling below reduces to exact greedy verification."""
    if s.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # keep the smallest prefix with mass >= top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, gen: torch.Generator) -> Tensor:
    """One draw per row: (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def verify(
    drafts: Tensor, p: Tensor, q: Tensor, gen: torch.Generator, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Speculative sampling. drafts (B,K) drawn from p (B,K,V); q (B,K+1,V) the target's.

    Returns (n_accepted (B,), next_token (B,)): the accepted prefix length and the token that
    follows it -- drawn from the residual (q - p)+ at the first rejection, else from q[K] (bonus).
    With ``lengths`` (B,), row i proposed only its first lengths[i] drafts (the router stopped it):
    it is verified as a block of that length, with the bonus token drawn from q[lengths[i]].
    """
    b, k = drafts.shape
    live = None
    if lengths is not None:
        live = torch.arange(k, device=p.device)[None] < lengths[:, None]  # (B, K)
        p = p * live[..., None]  # zero rows past a row's length: the residual there is q itself
    p_d = p.gather(-1, drafts[..., None])[..., 0]  # (B, K) drafter prob of each draft
    q_d = q[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, K) target prob of each draft
    u = torch.rand(p_d.shape, generator=gen, device=p.device)
    ok = u * p_d < q_d  # accept with probability min(1, q/p); strict so q = 0 never accepts
    if live is not None:
        ok &= live
    n_acc = ok.long().cumprod(1).sum(1)  # (B,)
    rows = torch.arange(b, device=p.device)
    q_n = q[rows, n_acc]  # (B, V)
    p_n = torch.cat([p, p.new_zeros(b, 1, p.shape[-1])], dim=1)[rows, n_acc]  # zero row after K: bonus = q[K]
    residual = (q_n - p_n).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return n_acc, sample(torch.where(mass > 0, residual / mass.clamp_min(1e-30), q_n), gen)


class Proposer(Protocol):
    def prefill(self, tokens: Tensor, valid: Tensor, target_out: StepOutput) -> None: ...

    def propose(
        self, last: Tensor, positions: Tensor, k: int, s: Sampling, gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Drafts (B, K'), their distributions (B, K', V) with K' <= k, and how many of each row's
        drafts to verify (B,), or None for all K'."""
        ...

    def observe(self, block: Tensor, keep: Tensor, target_out: StepOutput) -> None: ...


class ReferenceDraftModelProposer:
    """SPEED's drafter: an ordinary causal LM with its own KV cache over the whole sequence."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, tokens: Tensor, valid: Tensor, target_out: StepOutput) -> None:
        self.runner = CausalLMRunner(self.model, tokens.shape[0])
        self.runner.forward(tokens, valid)
        self.pending: tuple[Tensor, Tensor] | None = None  # accepted token the drafter has not seen

    def propose(
        self, last: Tensor, positions: Tensor, k: int, s: Sampling, gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.pending is None:
            logits = self.runner.forward(last[:, None]).logits[:, -1]
        else:
            tok, ok = self.pending
            cols, valid = torch.stack([tok, last], 1), torch.stack([ok, torch.ones_like(ok)], 1)
            logits = self.runner.forward(cols, valid).logits[:, -1]
        drafts, probs = [], []
        for i in range(k):
            p = to_probs(logits, s)
            d = sample(p, gen)
            drafts.append(d)
            probs.append(p)
            if i < k - 1:
                logits = self.runner.forward(d[:, None]).logits[:, -1]
        return torch.stack(drafts, 1), torch.stack(probs, 1), None

    def observe(self, block: Tensor, keep: Tensor, target_out: StepOutput) -> None:
        k = block.shape[1] - 1
        self.runner.reject(keep[:, :k])  # the drafter ran last, d_1..d_{k-1}
        self.pending = (block[:, k], keep[:, k])  # d_k, if accepted, was never run by the drafter


class ReferenceTandemProposer:
    """Tandem's drafter: context K/V come from the target's hidden states of every processed token.

    With a ``router`` (adaptive block length) a row stops drafting at the first position the router
    predicts the target would reject; the batch stops once every row has.
    """

    def __init__(self, drafter: TandemDrafter, router: BlockLengthRouter | None = None) -> None:
        self.drafter = drafter
        self.router = router
        self.cache: DrafterCache | None = None

    def prefill(self, tokens: Tensor, valid: Tensor, target_out: StepOutput) -> None:
        dtype = next(self.drafter.parameters()).dtype
        self.cache = self.drafter.new_cache(tokens.shape[0], tokens.device, dtype)
        self._extend(target_out, valid)

    def _extend(self, target_out: StepOutput, valid: Tensor) -> None:
        assert self.cache is not None and target_out.taps is not None, "target runner built without taps"
        self.drafter.extend_context(self.cache, target_out.taps, target_out.positions, valid)

    @torch.no_grad()
    def propose(
        self, last: Tensor, positions: Tensor, k: int, s: Sampling, gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        assert self.cache is not None
        tok, pos, drafts, probs = last, positions, [], []
        lengths = torch.zeros_like(last) if self.router is not None else None
        for i in range(k):
            logits = self.drafter.step(self.cache, tok[:, None], pos[:, None])[:, -1]
            if lengths is not None and self.router is not None:
                go = self.router.accept_prob(logits, self.drafter.model.embed_tokens.weight) >= self.router.cfg.threshold
                go = (lengths == i) & (go | (i == 0))  # still drafting, and the router says continue
                if not go.any():
                    break
                lengths += go.long()
            p = to_probs(logits, s)
            tok, pos = sample(p, gen), pos + 1
            drafts.append(tok)
            probs.append(p)
        return torch.stack(drafts, 1), torch.stack(probs, 1), lengths

    def observe(self, block: Tensor, keep: Tensor, target_out: StepOutput) -> None:
        # The verification pass's hidden states of the kept tokens become context (rewriting the
        # drafter's own entries for those positions); rejected positions stay masked out.
        self._extend(target_out, keep)


class ReferenceNgramProposer:
    """vLLM's n-gram prompt lookup (``"method": "ngram"``), for the reference decoders: find the
    longest n-gram (prompt_lookup_min..max tokens) ending the context that occurred earlier in it
    (the earliest such occurrence), and propose the up-to-k tokens that followed it. No match, no
    drafts: that step is the target's alone."""

    def __init__(self, prompt_lookup_min: int = 2, prompt_lookup_max: int = 5) -> None:
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max

    def prefill(self, tokens: Tensor, valid: Tensor, target_out: StepOutput) -> None:
        self.history = [row[ok].tolist() for row, ok in zip(tokens, valid)]
        self.vocab_size = target_out.logits.shape[-1]

    def lookup(self, ctx: list[int], k: int) -> list[int]:
        for n in range(min(self.hi, len(ctx) - 1), self.lo - 1, -1):
            suffix = ctx[-n:]
            for start in range(len(ctx) - n):  # earliest occurrence, excluding the suffix itself
                if ctx[start : start + n] == suffix:
                    return ctx[start + n : start + n + k]
        return []

    def propose(
        self, last: Tensor, positions: Tensor, k: int, s: Sampling, gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        found = [self.lookup(h + [t], k) for h, t in zip(self.history, last.tolist())]
        width = max(map(len, found))
        drafts = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=last.device)
        drafts = drafts.reshape(len(found), width)  # (B, K')
        probs = torch.nn.functional.one_hot(drafts, self.vocab_size).to(torch.float32)  # deterministic drafts
        return drafts, probs, torch.tensor([len(f) for f in found], device=last.device)

    def observe(self, block: Tensor, keep: Tensor, target_out: StepOutput) -> None:
        for h, row, ok in zip(self.history, block.tolist(), keep.tolist()):
            h.extend(t for t, o in zip(row, ok) if o)


class ReferenceEagle3Proposer:
    """EAGLE-3 (vLLM's ``eagle3`` method) for the reference decoders: the head's first pass over the
    newly verified positions (their target taps and the tokens that follow them), then draft steps
    on its own states. Rows are drafted one at a time (``Eagle3Drafter`` holds one sequence)."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def prefill(self, tokens: Tensor, valid: Tensor, target_out: StepOutput) -> None:
        from tandem_vllm.modeling.eagle3 import Eagle3Drafter

        assert target_out.taps is not None, "target runner built without the head's taps"
        self.rows = [Eagle3Drafter(self.head) for _ in range(tokens.shape[0])]
        self.pending = [(t[v], x[v], p[v]) for t, x, p, v in zip(tokens, target_out.taps, target_out.positions, valid)]

    @torch.no_grad()
    def propose(
        self, last: Tensor, positions: Tensor, k: int, s: Sampling, gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        drafts, probs = [], []
        for row, (toks, taps, pos), bonus in zip(self.rows, self.pending, last):
            # entry i carries token i+1: the verified tokens shifted by one, then the bonus token
            logits, state = row.first_pass(torch.cat([toks[1:], bonus[None]]), taps, pos)
            anchor = int(pos[-1])
            own: list[tuple[Tensor, Tensor]] = []
            d_row: list[Tensor] = []
            p_row: list[Tensor] = []
            for step in range(k):
                if step:
                    logits, state = row.step(d_row[-1], state, anchor + step, own)
                p = to_probs(logits, s)
                d_row.append(sample(p, gen))
                p_row.append(p)
            drafts.append(torch.stack(d_row))
            probs.append(torch.stack(p_row))
        return torch.stack(drafts), torch.stack(probs), None

    def observe(self, block: Tensor, keep: Tensor, target_out: StepOutput) -> None:
        assert target_out.taps is not None
        self.pending = [(t[v], x[v], p[v]) for t, x, p, v in zip(block, target_out.taps, target_out.positions, keep)]


@dataclass
class DecodeStats:
    target_passes: int = 0  # summed over rows while each row was generating (prefill included)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    attempted_per_pos: list[int] = field(default_factory=list)  # depth d drafted with drafts 1..d-1 accepted

    @property
    def depth_acceptance(self) -> list[float | None]:
        """P(draft at depth d accepted | every draft before it was), d = 1..k: where drafting fails."""
        return [a / n if n else None for a, n in zip(self.accepted_per_pos, self.attempted_per_pos)]

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target pass (the ceiling on speed-up if drafting were free)."""
        return self.emitted / max(self.target_passes, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_passes": self.target_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "tau": round(self.tau, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "accepted_per_pos": self.accepted_per_pos,
            "attempted_per_pos": self.attempted_per_pos,
            "depth_acceptance": [None if x is None else round(x, 4) for x in self.depth_acceptance],
        }


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, prompt excluded
    stats: DecodeStats


def pad_left(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TandemError("every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = torch.tensor(p)
        valid[i, t - len(p) :] = True
    return tokens.to(device), valid.to(device)


@torch.no_grad()
def generate(
    target: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    proposer: Proposer | None = None,
    k: int = 0,
    mode: Literal["speed", "standalone"] = "speed",
    sampling: Sampling = Sampling(),
    taps: tuple[int, ...] = (),
    eos_token_id: int | None = None,
    seed: int = 0,
) -> Generation:
    """Decode a batch of prompts (token ids) with the target and an optional proposer."""
    if (proposer is None) != (k == 0):
        raise TandemError(f"k={k}: use k >= 1 with a drafter and k = 0 for the target alone")
    if max_new_tokens < 1:
        raise TandemError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
    device = next(target.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    tokens, valid = pad_left(prompts, 0, device)
    runner = CausalLMRunner(target, len(prompts), taps=taps)
    out = runner.forward(tokens, valid)
    if proposer is not None:
        proposer.prefill(tokens, valid, out)
    last = sample(to_probs(out.logits[:, -1], sampling), gen)  # the prefill pass emits one token
    outs: list[list[int]] = [[t] for t in last.tolist()]
    stats = DecodeStats(target_passes=len(prompts), emitted=len(prompts), accepted_per_pos=[0] * k, attempted_per_pos=[0] * k)
    done = [_finished(o, max_new_tokens, eos_token_id) for o in outs]
    while not all(done):
        if proposer is None:
            drafts = last[:, None][:, :0]
            block = last[:, None]
            n_acc, lengths = torch.zeros_like(last), None
            nxt = sample(to_probs(runner.forward(block).logits[:, -1], sampling), gen)
        else:
            drafts, p, lengths = proposer.propose(last, runner.next_pos, k, sampling, gen)  # (B,K'), (B,K',V)
            kk = drafts.shape[1]
            block = torch.cat([last[:, None], drafts], dim=1)  # (B, K'+1)
            tout = runner.forward(block)
            q = to_probs(tout.logits, sampling)  # (B, K'+1, V)
            if mode == "standalone":
                n_acc, nxt = torch.full_like(last, kk), sample(q[:, kk], gen)
                lengths = None
            else:
                n_acc, nxt = verify(drafts, p, q, gen, lengths)
            keep = torch.arange(kk + 1, device=device)[None] <= n_acc[:, None]
            runner.reject(keep)
            proposer.observe(block, keep, tout)
        proposed = lengths.tolist() if lengths is not None else [drafts.shape[1]] * len(outs)
        for i, (d, n, t) in enumerate(zip(drafts.tolist(), n_acc.tolist(), nxt.tolist())):
            if done[i]:
                continue
            new = d[:n] + [t]
            before = len(outs[i])
            outs[i] = _truncate(outs[i] + new, max_new_tokens, eos_token_id)
            stats.target_passes += 1
            stats.drafted += proposed[i]
            stats.accepted += n
            stats.emitted += len(outs[i]) - before
            for j in range(n):
                stats.accepted_per_pos[j] += 1
            for j in range(min(n + 1, proposed[i])):
                stats.attempted_per_pos[j] += 1
            done[i] = _finished(outs[i], max_new_tokens, eos_token_id)
        last = nxt
    return Generation(tokens=outs, stats=stats)


def _truncate(toks: list[int], limit: int, eos: int | None) -> list[int]:
    if eos is not None and eos in toks:
        toks = toks[: toks.index(eos) + 1]
    return toks[:limit]


def _finished(toks: list[int], limit: int, eos: int | None) -> bool:
    return len(toks) >= limit or (eos is not None and eos in toks)
