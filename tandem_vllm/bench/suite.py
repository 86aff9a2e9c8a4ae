"""``tandem-vllm bench suite``: the comparison a user runs before choosing a drafter, on a chat target.

For each evaluation set -- MT-Bench turn 1, MT-Bench turn 2 (turn 1 and the target's own greedy turn-1
answer in the history), HumanEval; N questions spread evenly over each -- each k and each temperature, the ``bench engine`` rows (target
alone, vLLM's n-gram lookup, the standalone drafter, EAGLE-3, Tandem) at every batch size: one fresh
engine per row, the same prompts, requests ending at the model's end of turn as a chat client's do.
Greedy rows are checked token for token against target alone. With a k schedule (``bench schedule``,
measured on other prompts) a Tandem row drafts k by batch size as it says.

    OUT/<set>-k<k>-t<T>.json / .md   every cell (tokens/s, TTFT, ITL, tau, acceptance by depth, speed-up)
    OUT/summary.json / .md / .png    tau and batch-1 speed-up per drafter, set, k and temperature
    OUT/mtbench_turn1_answers.json   the target's turn-1 answers the turn-2 prompts carry
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from tandem_vllm import report
from tandem_vllm.errors import TandemError
from tandem_vllm.prompts import Prompt

SETS: Final = ("mtbench", "mtbench2", "humaneval")
# short names of bench engine rows, for the summary
ROW_NAMES: Final = (("target alone", "target"), ("n-gram", "n-gram"), ("standalone", "standalone"),
                    ("EAGLE-3", "EAGLE-3"), ("router", "Tandem router"), ("measured schedule", "Tandem k schedule"),
                    ("Tandem", "Tandem"))
# what a configuration's rows depend on beyond its set, k and temperature: a file measured otherwise is not reused
ROW_SETTINGS: Final = ("target", "tandem", "baseline", "eagle3", "tandem_router", "k_schedule", "batch_sizes",
                       "num_prompts", "max_tokens", "repeat")


@dataclass(frozen=True)
class Suite:
    target: str
    tandem: str
    baseline: str | None
    eagle3: str | None
    tandem_router: str | None
    out: Path
    sets: tuple[str, ...] = SETS
    ks: tuple[int, ...] = (3, 5)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    num_prompts: int = 16
    max_tokens: int = 128
    repeat: int = 1
    k_schedule: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.sets if s not in SETS]
        if bad:
            raise TandemError(f"--sets {bad}: choose from {', '.join(SETS)}")
        if not 1 <= self.num_prompts <= 80:
            raise TandemError(f"--num-prompts {self.num_prompts}: MT-Bench has 80 questions; take 1..80")


def settings(s: Suite) -> dict[str, Any]:
    """The suite as a configuration file records it (JSON types)."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}))


def check_settings(path: Path, s: Suite) -> None:
    """Refuse a configuration file in OUT measured with other drafters or settings than these, rather than
    mix it into the summary (the run then keeps it as measured)."""
    doc = json.loads(path.read_text())
    recorded, mine = doc.get("suite", {}), settings(s)
    changed = [f"{k} {recorded.get(k)!r} -> {mine[k]!r}" for k in ROW_SETTINGS if recorded.get(k) != mine[k]]
    asked = questions(doc.get("set", ""), s.num_prompts)
    if doc.get("questions") != asked:
        changed.append(f"questions {doc.get('questions')!r} -> {asked!r}")
    if changed:
        raise TandemError(f"{path} was measured with other settings ({'; '.join(changed)}): "
                          "give another --out, or delete the file to measure it again")


def measured(s: Suite) -> list[Path]:
    """Every configuration file in OUT, by set then name: the summary covers those an earlier run with other
    --sets, --k or --temperatures measured too."""
    order = {name: i for i, name in enumerate(SETS)}
    return sorted(s.out.glob("*-k*-t*.json"), key=lambda p: (order.get(p.name.split("-k")[0], len(SETS)), p.name))


def short(row: str) -> str:
    return next(name for key, name in ROW_NAMES if key in row)


def render(tokenizer: Any, chats: list[list[dict[str, str]]]) -> list[Prompt]:
    return [Prompt(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)) for c in chats]


def spread(n: int, total: int) -> list[int]:
    """``n`` indices spread evenly over ``total`` items: MT-Bench lists its 80 questions by category, ten
    each (writing first), so its first 8 are all writing; 8 spread ones are one of each category."""
    return [i * total // n for i in range(min(n, total))]


def questions(name: str, n: int) -> list[int]:
    """Which questions of set ``name`` a suite of ``n`` prompts per set asks (indices into the set)."""
    return spread(n, _set_size("humaneval" if name == "humaneval" else "mtbench"))


@functools.cache
def _set_size(name: str) -> int:
    from tandem_vllm.evalsets import humaneval_problems, mtbench_questions

    return len(humaneval_problems() if name == "humaneval" else mtbench_questions())


def workloads(s: Suite, engine_kwargs: dict[str, Any]) -> dict[str, list[Prompt]]:
    """Each set's prompts, rendered with the target's chat template."""
    from tandem_vllm.evalsets import first_turns, second_turns
    from tandem_vllm.modeling.target import load_identity

    _, tokenizer = load_identity(s.target)
    out: dict[str, list[Prompt]] = {}
    for name in s.sets:
        chosen = questions(name, s.num_prompts)
        if name == "mtbench2":
            out[name] = render(tokenizer, second_turns(turn1_answers(s, tokenizer, engine_kwargs), chosen))
        else:
            chats = first_turns(name)
            out[name] = render(tokenizer, [chats[i] for i in chosen])
    return out


def turn1_answers(s: Suite, tokenizer: Any, engine_kwargs: dict[str, Any]) -> list[str]:
    """The target's greedy answers to the suite's MT-Bench questions (cached in OUT)."""
    chosen = questions("mtbench", s.num_prompts)
    path = s.out / "mtbench_turn1_answers.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if (cached.get("target"), cached.get("max_tokens"), cached.get("questions")) == (s.target, s.max_tokens, chosen):
            return list(cached["answers"])
    from vllm import SamplingParams

    from tandem_vllm.evalsets import first_turns
    from tandem_vllm.vllm_adapter.engine import offline_engine, shutdown_offline

    llm = offline_engine(model=s.target, **engine_kwargs)
    try:
        chats = first_turns("mtbench")
        prompts = [p.text for p in render(tokenizer, [chats[i] for i in chosen])]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=s.max_tokens), use_tqdm=False)
    finally:
        shutdown_offline(llm)
    answers = [o.outputs[0].text for o in outs]
    s.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": s.target, "max_tokens": s.max_tokens, "questions": chosen,
                                "answers": answers}, indent=2))
    return answers


def run(s: Suite, engine_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (set, k, temperature) configuration; each is written when done and skipped when present.
    Returns every configuration in OUT, the summary's records."""
    from tandem_vllm.bench import engine

    for path in measured(s):  # a file measured with other settings is refused before any engine starts
        check_settings(path, s)
    loads = workloads(s, engine_kwargs)
    s.out.mkdir(parents=True, exist_ok=True)
    for name, prompts in loads.items():
        for k in s.ks:
            for t in s.temperatures:
                path = s.out / f"{name}-k{k}-t{t:g}.json"
                if not path.is_file():  # one there was checked above
                    cells = engine.run(target=s.target, tandem=s.tandem, baseline=s.baseline, prompts=prompts,
                                       batch_sizes=list(s.batch_sizes), max_tokens=s.max_tokens, k=k,
                                       fallback_batch_size=None, engine_kwargs=engine_kwargs, repeat=s.repeat,
                                       tandem_router=s.tandem_router, temperature=t, eagle3=s.eagle3, ignore_eos=False,
                                       schedule=list(s.k_schedule) if s.k_schedule else None)
                    meta = {"set": name, "k": k, "temperature": t, "prompts": len(prompts), "max_tokens": s.max_tokens,
                            "questions": questions(name, s.num_prompts), "suite": settings(s), "engine": engine_kwargs}
                    report.write(path, {**meta, "cells": report.rows(cells)}, engine.markdown(cells))
    records = [json.loads(p.read_text()) for p in measured(s)]
    write_summary(records, s.out)
    return records


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set, k, temperature, drafter, batch): tau, acceptance by depth, speed-up."""
    rows = []
    for rec in records:
        for c in rec["cells"]:
            rows.append({"set": rec["set"], "k": rec["k"], "temperature": rec["temperature"], "drafter": short(c["row"]),
                         "batch": c["batch_size"], "tau": c["tau"], "tokens_per_s": c["tokens_per_s"],
                         "speedup": c["speedup"], "acceptance_by_depth": c.get("accepted_per_pos"),
                         "lossless": c["lossless"]})
    return rows


def markdown(rows: list[dict[str, Any]], batch: int = 1) -> str:
    """tau and speed-up at ``batch``, one line per (set, k, T), one column pair per drafter."""
    drafters = [d for d in dict.fromkeys(r["drafter"] for r in rows) if d != "target"]  # in the engine's row order
    head = "| set | k | T | " + " | ".join(f"{d} τ / speed-up" for d in drafters) + " | greedy = target |\n"
    head += "|---|---|---|" + "---|" * (len(drafters) + 1) + "\n"
    lines = []
    keys = dict.fromkeys((r["set"], r["k"], r["temperature"]) for r in rows)
    for key in keys:
        mine = {r["drafter"]: r for r in rows if (r["set"], r["k"], r["temperature"]) == key and r["batch"] == batch}
        if not mine:
            continue
        cells = [f"{mine[d]['tau']:.2f} / {mine[d]['speedup']:.2f}×" if d in mine else "—" for d in drafters]
        same = [r["lossless"] for r in mine.values() if r["lossless"] is not None]
        exact = "—" if not same else "yes" if all(same) else "NO"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | " + " | ".join(cells) + f" | {exact} |")
    return head + "\n".join(lines) + "\n"


def write_summary(records: list[dict[str, Any]], out: Path) -> None:
    rows = summary_rows(records)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    batches = sorted({r["batch"] for r in rows})
    text = "".join(f"\n### batch {b}\n\n" + markdown(rows, b) for b in batches)
    (out / "summary.md").write_text(text)
    plot(rows, out / "summary.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    one = [r for r in rows if r["batch"] == 1 and r["drafter"] != "target"]
    if not one:
        return
    configs = list(dict.fromkeys((r["set"], r["k"], r["temperature"]) for r in one))
    drafters = list(dict.fromkeys(r["drafter"] for r in one))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(configs) + 4), 4))
    width = 0.8 / len(drafters)
    for i, d in enumerate(drafters):
        by = {(r["set"], r["k"], r["temperature"]): r for r in one if r["drafter"] == d}
        xs = np.arange(len(configs)) + i * width
        axes[0].bar(xs, [by[c]["tau"] if c in by else 0 for c in configs], width, label=d)
        axes[1].bar(xs, [by[c]["speedup"] if c in by else 0 for c in configs], width, label=d)
    labels = [f"{s}\nk={k} T={t:g}" for s, k, t in configs]
    for ax, ylabel in zip(axes, ("τ (tokens per target pass)", "speed-up over target alone, batch 1")):
        ax.set_xticks(np.arange(len(configs)) + 0.4 - width / 2, labels, fontsize=7)
        ax.set_ylabel(ylabel)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
