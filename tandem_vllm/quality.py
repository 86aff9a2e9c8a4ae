"""``tandem-vllm eval``: the paper's Table 1 in miniature, plus acceptance length tau vs gamma.

Teacher-forced on held-out prompts, per drafter: next-token accuracy, cross-entropy, agreement
with the target's argmax, total-variation distance to the target's next-token distribution
(Tandem under its training block size). Then greedy decoding with the reference decoders:
tau (tokens per target pass) for SPEED with the baseline vs Tandem+SPEED at each gamma.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tandem_vllm.decoding.speculate import DraftModelProposer, Sampling, TandemProposer, generate
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.pairing import load_baseline_for, load_tandem_for
from tandem_vllm.modeling.target import hidden_taps, load_causal_lm
from tandem_vllm.progress import progress_bar
from tandem_vllm.train.data import read_texts
from tandem_vllm.train.loss import tv_distance

METRICS = ("accuracy", "ce", "agreement", "tv")
# Greedy tau on a small target is dominated by its degenerate loops (e.g. runs of newlines that
# one drafter happens to predict); sampled tau (T=1) tracks the distributions' overlap.
TAU_MODES = {"greedy": Sampling(), "sampled": Sampling(temperature=1.0)}


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix != ".jsonl":
        raise TandemError(f"--prompts {path}: expected a .jsonl file with one {{\"prompt\": ...}} per line")
    return read_texts([path])


@torch.no_grad()
def teacher_forced(target: Any, drafter: Any, kind: str, ids: list[list[int]]) -> dict[str, float]:
    """Token-averaged metrics of one drafter ('tandem' or 'baseline'; 'target' scores the target)."""
    sums = dict.fromkeys(METRICS, 0.0)
    n = 0
    for seq in ids:
        x = torch.tensor([seq])
        inp, lab = x[:, :-1], x[:, 1:]
        t_out = target(input_ids=inp, output_hidden_states=kind == "tandem")
        if kind == "tandem":
            logits = drafter.forward_train(inp, hidden_taps(t_out.hidden_states, drafter.cfg.tap_layers))
        elif kind == "baseline":
            logits = drafter(input_ids=inp).logits
        else:
            logits = t_out.logits
        pred = logits.argmax(-1)
        sums["accuracy"] += (pred == lab).sum().item()
        sums["ce"] += torch.nn.functional.cross_entropy(logits[0].float(), lab[0], reduction="sum").item()
        sums["agreement"] += (pred == t_out.logits.argmax(-1)).sum().item()
        sums["tv"] += tv_distance(logits, t_out.logits).sum().item()
        n += lab.numel()
    return {k: v / max(n, 1) for k, v in sums.items()}


def quality_report(
    *,
    target_dir: str | Path,
    drafter_dir: str | Path,
    baseline_dir: str | Path | None,
    prompts_file: str | Path,
    gammas: tuple[int, ...] = (2, 3, 4, 5, 6, 7),
    max_new_tokens: int = 64,
    max_prompts: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    target = load_causal_lm(target_dir)
    tandem = load_tandem_for(target, drafter_dir)
    baseline = load_baseline_for(target, baseline_dir) if baseline_dir else None
    prompts = read_prompts(prompts_file)[:max_prompts]
    tok = target.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [s for s in ids if len(s) >= 2]
    if not ids:
        raise TandemError(f"{prompts_file}: no prompt has 2+ tokens to score")

    rows: dict[str, dict[str, float]] = {"target": teacher_forced(target.model, None, "target", ids)}
    if baseline is not None:
        rows["baseline"] = teacher_forced(target.model, baseline.model, "baseline", ids)
    rows["tandem"] = teacher_forced(target.model, tandem, "tandem", ids)

    names = ["baseline", "tandem"] if baseline is not None else ["tandem"]
    taus: dict[str, dict[str, dict[str, float]]] = {mode: {n: {} for n in names} for mode in TAU_MODES}
    jobs = [(mode, name, g) for mode in TAU_MODES for g in gammas for name in names]
    for mode, name, g in progress_bar(iterable=jobs, desc="tau vs gamma", disable=not progress):
        if name == "tandem":
            kw: dict[str, Any] = dict(proposer=TandemProposer(tandem), taps=tandem.cfg.tap_layers)
        else:
            assert baseline is not None
            kw = dict(proposer=DraftModelProposer(baseline.model))
        gen = generate(target.model, ids, max_new_tokens=max_new_tokens, k=g, sampling=TAU_MODES[mode], seed=seed, **kw)
        taus[mode][name][str(g)] = round(gen.stats.tau, 4)
    return {
        "target": str(target_dir),
        "tandem": str(drafter_dir),
        "baseline": str(baseline_dir) if baseline_dir else None,
        "prompts": len(ids),
        "scored_tokens": sum(len(s) - 1 for s in ids),
        "block_size": tandem.cfg.block_size,
        "tap_layers": list(tandem.cfg.tap_layers),
        "teacher_forced": rows,
        "tau": taus,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }


def markdown(report: dict[str, Any]) -> str:
    rows = report["teacher_forced"]
    lines = [
        f"Held-out: {report['prompts']} prompts, {report['scored_tokens']} scored tokens; Tandem block size "
        f"{report['block_size']}, taps {report['tap_layers']}.",
        "",
        "| model | next-token acc | cross-entropy | agreement w/ target | TV to target |",
        "|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['ce']:.4f} | {m['agreement']:.4f} | {m['tv']:.4f} |")
    for mode, taus in report["tau"].items():
        gammas = list(taus["tandem"])
        lines += ["", f"| tau ({mode}) | " + " | ".join(f"gamma={g}" for g in gammas) + " |", "|---|" + "---|" * len(gammas)]
        for name, label in (("baseline", "SPEED (baseline)"), ("tandem", "Tandem+SPEED")):
            if name in taus:
                lines.append(f"| {label} | " + " | ".join(f"{taus[name][g]:.3f}" for g in gammas) + " |")
        if "baseline" in taus:
            lines.append("| Tandem / SPEED | " + " | ".join(f"{taus['tandem'][g] / taus['baseline'][g]:.3f}" for g in gammas) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 3, 1.4]})
    for mode, style in (("greedy", "-"), ("sampled", "--")):
        for i, (name, label) in enumerate((("baseline", "SPEED"), ("tandem", "Tandem+SPEED"))):
            taus = report["tau"][mode]
            if name in taus:
                g = [int(x) for x in taus[name]]
                ax1.plot(g, list(taus[name].values()), style, marker="o", color=f"C{i}", label=f"{label}, {mode}")
    ax1.set_xlabel("gamma (draft tokens per step)")
    ax1.set_ylabel("tau (tokens per target pass)")
    ax1.set_title("Acceptance length")
    ax1.grid(alpha=0.3)
    ax1.legend()
    rows = {k: v for k, v in report["teacher_forced"].items() if k != "target"}
    unit = ("accuracy", "agreement", "tv")  # metrics in [0, 1]; CE gets its own axis
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows.items()):
        ax2.bar([x + i * width for x in range(len(unit))], [m[k] for k in unit], width, label=name)
        ax3.bar([i], [m["ce"]], 0.6, label=name, color=f"C{i}")
    ax2.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(unit))], ["next-token acc", "agreement", "TV to target"])
    ax2.set_title("Held-out, teacher-forced")
    ax2.legend()
    ax3.set_xticks(range(len(rows)), list(rows))
    ax3.set_title("cross-entropy (nats)")
    ax3.axhline(report["teacher_forced"]["target"]["ce"], color="k", ls="--", lw=1, label="target")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], json_out: str | Path, md_out: str | Path | None, png_out: str | Path | None) -> None:
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    if md_out:
        Path(md_out).write_text(markdown(report))
    if png_out:
        plot(report, png_out)
