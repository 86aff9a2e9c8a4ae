"""``tandem-vllm generate`` and ``demo run``: decode with the reference decoders and show the numbers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from tandem_vllm.decoding.speculate import ReferenceTandemProposer, Sampling, generate
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.pairing import load_tandem_for
from tandem_vllm.modeling.target import load_causal_lm


def run_generation(
    *,
    target: str | Path,
    drafter: str | Path | None,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    mode: Literal["speed", "standalone"] = "speed",
    seed: int = 0,
    prompt_lines: int | None = None,
) -> None:
    """Decode and print each prompt (its last ``prompt_lines`` lines if given) with its continuation."""
    if drafter is not None and k < 1:
        raise TandemError(f"--k={k}; gamma must be at least 1")
    lm = load_causal_lm(target)
    tok = lm.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not s for s in ids):
        raise TandemError("an empty prompt has nothing to continue; pass non-empty --prompt text")
    kw: dict = {}
    if drafter is not None:
        tandem = load_tandem_for(lm, drafter)
        kw = dict(proposer=ReferenceTandemProposer(tandem), k=k, taps=tandem.cfg.tap_layers, mode=mode)
    t0 = time.perf_counter()
    gen = generate(lm.model, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.eos_token_id,
                   seed=seed, **kw)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, gen.tokens):
        print("=" * 72)
        lines = prompt.splitlines(keepends=True)
        if prompt_lines is not None and len(lines) > prompt_lines:
            print(f"[... {len(lines) - prompt_lines} prompt lines ...]")
            lines = lines[-prompt_lines:]
        print("".join(lines), end="")
        print(f"\033[1m{tok.decode(out)}\033[0m" if _tty() else tok.decode(out))
    s = gen.stats
    label = "target alone" if drafter is None else ("standalone Tandem" if mode == "standalone" else "Tandem+SPEED")
    label += ", greedy" if sampling.temperature == 0 else f", T={sampling.temperature} top-p={sampling.top_p}"
    print("=" * 72)
    print(f"{label}, gamma={k if drafter else 0}: {s.emitted} tokens in {s.target_passes} target passes, "
          f"tau={s.tau:.2f}, draft acceptance {s.acceptance_rate:.1%}, per position {s.accepted_per_pos}, {dt:.2f} s")


def _tty() -> bool:
    import sys

    return sys.stdout.isatty()


def demo(*, size: str, k: int, max_new_tokens: int, engine: Literal["vllm", "reference"] = "vllm") -> None:
    """Build (or reuse) the demo pair, then decode three held-out prompts with Tandem+SPEED.

    Sampling (T=0.8, top-p 0.95) rather than greedy: a target this small loops under greedy
    decoding. Speculative sampling keeps the output distribution exactly the target's."""
    from tandem_vllm.demo.build import build
    from tandem_vllm.prompts import read_prompts

    m = build(size)
    prompts = read_prompts(m["heldout_prompts"])[:3]
    if engine == "reference":
        run_generation(target=m["target"], drafter=m["tandem"], prompts=prompts, k=k, max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature=0.8, top_p=0.95), prompt_lines=6)
    else:
        run_vllm(target=m["target"], drafter=m["tandem"], prompts=prompts, k=k, max_new_tokens=max_new_tokens)


def run_vllm(*, target: str, drafter: str, prompts: list[str], k: int, max_new_tokens: int) -> None:
    """The same demo through vLLM: Tandem is vLLM's speculative decoder; the numbers are vLLM's own counters."""
    import vllm

    from tandem_vllm.vllm_adapter.engine import offline_engine, shutdown_offline, spec_metrics

    llm = offline_engine(
        model=target,
        speculative_config={"model": drafter, "num_speculative_tokens": k},
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=256 * 2**20,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
    )
    t0 = time.perf_counter()
    outs = llm.generate(prompts, vllm.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_new_tokens))
    dt = time.perf_counter() - t0
    stats = spec_metrics()
    shutdown_offline(llm)
    for prompt, out in zip(prompts, outs):
        print("=" * 72)
        lines = prompt.splitlines(keepends=True)
        if len(lines) > 6:
            print(f"[... {len(lines) - 6} prompt lines ...]")
        print("".join(lines[-6:]), end="")
        text = out.outputs[0].text
        print(f"\033[1m{text}\033[0m" if _tty() else text)
    print("=" * 72)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    drafts, accepted = stats.get("num_drafts", 0.0), stats.get("num_accepted_tokens", 0.0)
    drafted, per_pos = stats.get("num_draft_tokens", 0.0), stats.get("num_accepted_tokens_per_pos", [])
    tau = 1 + accepted / drafts if drafts else 1.0
    print(f"vLLM + Tandem+SPEED, T=0.8 top-p=0.95, k={k}: {n} tokens in {dt:.2f} s; {drafts:.0f} verification steps, "
          f"tau={tau:.2f} tokens per step, draft acceptance {accepted / max(drafted, 1):.1%}, per position {per_pos}")
