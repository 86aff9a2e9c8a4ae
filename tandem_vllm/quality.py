"""``tandem-vllm eval``: the paper's Table 1 in miniature, and the measurements that predict decoding.

Teacher-forced on held-out prompts (natural text) and on the target's own continuations of them
(greedy and sampled at T=1, which is what a drafter meets when serving), per drafter: next-token
accuracy, cross-entropy, agreement with the target's argmax, total-variation distance to the
target's next-token distribution, and agreement by *block position* with blocks of the serving k
(Tandem's context ends at each block start; position 0 sees the most context, k-1 the least).

Then decoding with the reference decoders, greedy and sampled, at each gamma: tau (tokens per target
pass) and the per-depth conditional acceptance P(draft d accepted | drafts 1..d-1 were), which
shows where drafting fails. Rows: the standalone drafter (SPEED), Tandem+SPEED, vLLM's n-gram
prompt lookup, and any extra drafters passed by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tandem_vllm.decoding.speculate import (
    Proposer,
    ReferenceDraftModelProposer,
    ReferenceEagle3Proposer,
    ReferenceNgramProposer,
    ReferenceTandemProposer,
    Sampling,
    generate,
)
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.eagle3 import ARCHITECTURE as EAGLE3_ARCH
from tandem_vllm.modeling.eagle3 import Eagle3Head
from tandem_vllm.modeling.pairing import load_baseline_for, load_eagle3_for, load_tandem_for
from tandem_vllm.modeling.reference import TandemDrafter
from tandem_vllm.modeling.target import hidden_taps, load_causal_lm, resolve_device
from tandem_vllm.progress import progress_bar
from tandem_vllm.prompts import read_prompts
from tandem_vllm.speculation import NGRAM_LOOKUP
from tandem_vllm.train.loss import tv_distance

METRICS = ("accuracy", "ce", "agreement", "tv")
# Greedy tau on a small target is dominated by its degenerate loops (e.g. runs of newlines that
# one drafter happens to predict); sampled tau (T=1) tracks the distributions' overlap.
TAU_MODES = {"greedy": Sampling(), "sampled": Sampling(temperature=1.0)}
NGRAM = NGRAM_LOOKUP  # what the benchmarks configure in vLLM
LABELS = {"baseline": "SPEED (standalone)", "tandem": "Tandem+SPEED", "eagle3": "EAGLE-3", "ngram": "n-gram lookup"}


def _drafter_logits(target_out: Any, drafter: Any, inp: torch.Tensor, block: int | None) -> torch.Tensor:
    if isinstance(drafter, TandemDrafter):
        return drafter.forward_train(inp, hidden_taps(target_out.hidden_states, drafter.cfg.tap_layers), block)
    if isinstance(drafter, Eagle3Head):  # first draft step; entry i-1 predicts token i+1 like position i
        step0 = drafter.forward_train(inp, hidden_taps(target_out.hidden_states, drafter.cfg.tap_layers), steps=1)[0]
        return torch.cat([target_out.logits[:, :1], step0[:, :-1]], dim=1)
    return drafter(input_ids=inp).logits


@torch.no_grad()
def teacher_forced(
    target: Any, drafter: Any, seqs: list[list[int]], *, scored_from: list[int] | None = None, block: int | None = None
) -> dict[str, Any]:
    """Token-averaged metrics of one drafter (a TandemDrafter or an HF causal LM; None scores the
    target itself) over the labels of each sequence from index ``scored_from[i]`` on, plus agreement
    by block position (blocks of ``block`` from position 0; Tandem's default: its trained gamma)."""
    sums = dict.fromkeys(METRICS, 0.0)
    by_pos: dict[int, list[float]] = {}
    n = 0
    device = next(target.parameters()).device
    for i, seq in enumerate(seqs):
        x = torch.tensor([seq], device=device)
        inp, lab = x[:, :-1], x[:, 1:]
        t_out = target(input_ids=inp, output_hidden_states=isinstance(drafter, (TandemDrafter, Eagle3Head)))
        logits = t_out.logits if drafter is None else _drafter_logits(t_out, drafter, inp, block)
        first = max(0, (scored_from[i] if scored_from else 1) - 1)  # label j is token j + 1
        if isinstance(drafter, Eagle3Head):
            first = max(first, 1)  # EAGLE-3 drafts from a verified state: none before position 0
        logits, t_logits, lab = logits[:, first:], t_out.logits[:, first:], lab[:, first:]
        pred = logits.argmax(-1)
        agree = (pred == t_logits.argmax(-1))[0]
        sums["accuracy"] += (pred == lab).sum().item()
        sums["ce"] += torch.nn.functional.cross_entropy(logits[0].float(), lab[0], reduction="sum").item()
        sums["agreement"] += agree.sum().item()
        sums["tv"] += tv_distance(logits, t_logits).sum().item()
        n += lab.numel()
        if block:
            positions = (torch.arange(first, first + lab.shape[1]) % block).tolist()
            for p, a in zip(positions, agree.tolist()):
                by_pos.setdefault(p, [0.0, 0.0])
                by_pos[p][0] += a
                by_pos[p][1] += 1
    out: dict[str, Any] = {k: v / max(n, 1) for k, v in sums.items()}
    if block:
        out["agreement_by_block_position"] = [round(by_pos[p][0] / by_pos[p][1], 4) for p in sorted(by_pos)]
    return out


def continuations(target: Any, ids: list[list[int]], sampling: Sampling, max_new_tokens: int, seed: int) -> list[list[int]]:
    """The target's own continuations of each prompt (what a drafter is asked to predict when serving)."""
    return generate(target, ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed).tokens


def _proposer(drafter: Any) -> tuple[Proposer, tuple[int, ...]]:
    if drafter == "ngram":
        return ReferenceNgramProposer(**NGRAM), ()
    if isinstance(drafter, TandemDrafter):
        return ReferenceTandemProposer(drafter), drafter.cfg.tap_layers
    if isinstance(drafter, Eagle3Head):
        return ReferenceEagle3Proposer(drafter), drafter.cfg.tap_layers
    return ReferenceDraftModelProposer(drafter), ()


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
    block: int = 3,
    ngram: bool = True,
    eagle3_dir: str | Path | None = None,
    extra: dict[str, str | Path] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``block``: the serving k the block-position agreement is measured at. ``eagle3_dir``: an EAGLE-3
    head (``train --kind eagle3``). ``extra``: more drafters (Tandem, EAGLE-3 or standalone) by name,
    e.g. variants of one recipe, reported beside the others."""
    dev = str(resolve_device(device))
    target = load_causal_lm(target_dir, device=dev)
    drafters: dict[str, Any] = {}
    if baseline_dir:
        drafters["baseline"] = load_baseline_for(target, baseline_dir, device=dev).model
    drafters["tandem"] = load_tandem_for(target, drafter_dir, device=dev)
    if eagle3_dir:
        drafters["eagle3"] = load_eagle3_for(target, eagle3_dir).to(dev)
    for name, path in (extra or {}).items():
        arch = json.loads((Path(path) / "config.json").read_text()).get("architectures", [])
        drafters[name] = (load_tandem_for(target, path, device=dev) if "TandemDrafterForCausalLM" in arch
                          else load_eagle3_for(target, path).to(dev) if EAGLE3_ARCH in arch
                          else load_baseline_for(target, path, device=dev).model)
    prompts = read_prompts(prompts_file)[:max_prompts]
    tok = target.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [s for s in ids if len(s) >= 2]
    if not ids:
        raise TandemError(f"{prompts_file}: no prompt has 2+ tokens to score")

    # teacher-forced: natural text, then the target's greedy and sampled continuations of it
    sources: dict[str, tuple[list[list[int]], list[int] | None]] = {"natural": (ids, None)}
    for mode, sampling in TAU_MODES.items():
        conts = continuations(target.model, ids, sampling, max_new_tokens, seed)
        sources[f"target {mode}"] = ([p + c for p, c in zip(ids, conts)], [len(p) for p in ids])
    tf: dict[str, dict[str, Any]] = {}
    for src, (seqs, starts) in progress_bar(iterable=list(sources.items()), desc="teacher-forced", disable=not progress):
        tf[src] = {"target": teacher_forced(target.model, None, seqs, scored_from=starts)}
        for name, d in drafters.items():
            tf[src][name] = teacher_forced(target.model, d, seqs, scored_from=starts, block=block)

    names = list(drafters) + (["ngram"] if ngram else [])
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {mode: {n: {} for n in names} for mode in TAU_MODES}
    jobs = [(mode, name, g) for mode in TAU_MODES for g in gammas for name in names]
    for mode, name, g in progress_bar(iterable=jobs, desc="tau vs gamma", disable=not progress):
        proposer, taps = _proposer("ngram" if name == "ngram" else drafters[name])
        gen = generate(target.model, ids, max_new_tokens=max_new_tokens, k=g, sampling=TAU_MODES[mode], seed=seed,
                       proposer=proposer, taps=taps)
        runs[mode][name][str(g)] = {"tau": round(gen.stats.tau, 4),
                                    "depth_acceptance": gen.stats.as_dict()["depth_acceptance"]}
    return {
        "target": str(target_dir),
        "tandem": str(drafter_dir),
        "baseline": str(baseline_dir) if baseline_dir else None,
        "eagle3": str(eagle3_dir) if eagle3_dir else None,
        "extra": {k: str(v) for k, v in (extra or {}).items()},
        "prompts": len(ids),
        "scored_tokens": sum(len(s) - 1 for s in ids),
        "block_size": drafters["tandem"].cfg.block_size,
        "tap_layers": list(drafters["tandem"].cfg.tap_layers),
        "block_position_k": block,
        "teacher_forced": tf["natural"],
        "teacher_forced_by_source": tf,
        "tau": {m: {n: {g: r["tau"] for g, r in per.items()} for n, per in by.items()} for m, by in runs.items()},
        "depth_acceptance": {m: {n: {g: r["depth_acceptance"] for g, r in per.items()} for n, per in by.items()}
                             for m, by in runs.items()},
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "ngram": NGRAM if ngram else None,
    }


def _label(name: str) -> str:
    return LABELS.get(name, name)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Held-out: {report['prompts']} prompts, {report['scored_tokens']} scored prompt tokens (plus the target's "
        f"{report['max_new_tokens']}-token continuations of each); Tandem trained with blocks of up to "
        f"{report['block_size']}, taps {report['tap_layers']}.",
    ]
    for src, rows in report.get("teacher_forced_by_source", {"natural": report["teacher_forced"]}).items():
        lines += ["", f"Teacher-forced on {src} text:", "",
                  "| model | next-token acc | cross-entropy | agreement w/ target | TV to target |", "|---|---|---|---|---|"]
        for name, m in rows.items():
            lines.append(f"| {name} | {m['accuracy']:.4f} | {m['ce']:.4f} | {m['agreement']:.4f} | {m['tv']:.4f} |")
    k = report.get("block_position_k")
    if k:
        lines += ["", f"Agreement with the target by block position (blocks of k = {k}; Tandem sees the target's "
                  "states up to its block's start):", "",
                  "| text | model | " + " | ".join(f"pos {p}" for p in range(k)) + " |", "|---|---|" + "---|" * k]
        for src, rows in report["teacher_forced_by_source"].items():
            for name, m in rows.items():
                if "agreement_by_block_position" in m:
                    lines.append(f"| {src} | {name} | " + " | ".join(f"{x:.3f}" for x in m["agreement_by_block_position"]) + " |")
    for mode, taus in report["tau"].items():
        gammas = list(taus["tandem"])
        lines += ["", f"| tau ({mode}) | " + " | ".join(f"gamma={g}" for g in gammas) + " |", "|---|" + "---|" * len(gammas)]
        for name in taus:
            lines.append(f"| {_label(name)} | " + " | ".join(f"{taus[name][g]:.3f}" for g in gammas) + " |")
        if "baseline" in taus:
            lines.append("| Tandem / SPEED | " + " | ".join(f"{taus['tandem'][g] / taus['baseline'][g]:.3f}" for g in gammas) + " |")
    depth = report.get("depth_acceptance", {})
    for mode, by in depth.items():
        g = max(by["tandem"], key=int)
        lines += ["", f"P(draft at depth d accepted | all before it were), {mode}, gamma={g}:", "",
                  "| drafter | " + " | ".join(f"d={d + 1}" for d in range(int(g))) + " | tau |", "|---|" + "---|" * (int(g) + 1)]
        for name, per in by.items():
            cells = " | ".join("—" if x is None else f"{x:.3f}" for x in per[g])
            lines.append(f"| {_label(name)} | {cells} | {report['tau'][mode][name][g]:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax4, ax2, ax3) = plt.subplots(1, 4, figsize=(17, 4), gridspec_kw={"width_ratios": [3, 3, 3, 1.4]})
    names = list(report["tau"]["greedy"])
    for mode, style in (("greedy", "-"), ("sampled", "--")):
        for i, name in enumerate(names):
            taus = report["tau"][mode][name]
            ax1.plot([int(x) for x in taus], list(taus.values()), style, marker="o", color=f"C{i}", label=f"{_label(name)}, {mode}")
    ax1.set_xlabel("gamma (draft tokens per step)")
    ax1.set_ylabel("tau (tokens per target pass)")
    ax1.set_title("Acceptance length")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    for mode, style in (("greedy", "-"), ("sampled", "--")):
        by = report.get("depth_acceptance", {}).get(mode, {})
        for i, name in enumerate(names):
            if name in by:
                g = max(by[name], key=int)
                ys = [float("nan") if y is None else y for y in by[name][g]]
                ax4.plot(range(1, len(ys) + 1), ys, style, marker="o", color=f"C{i}", label=f"{_label(name)}, {mode}")
    ax4.set_xlabel("draft depth d")
    ax4.set_ylabel("P(accept d | 1..d-1 accepted)")
    ax4.set_title("Where drafting fails")
    ax4.set_ylim(0, 1)
    ax4.grid(alpha=0.3)
    rows = {k: v for k, v in report["teacher_forced"].items() if k != "target"}
    unit = ("accuracy", "agreement", "tv")  # metrics in [0, 1]; CE gets its own axis
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows.items()):
        ax2.bar([x + i * width for x in range(len(unit))], [m[k] for k in unit], width, label=name)
        ax3.bar([i], [m["ce"]], 0.6, label=name, color=f"C{i}")
    ax2.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(unit))], ["next-token acc", "agreement", "TV to target"])
    ax2.set_title("Held-out natural text, teacher-forced")
    ax2.legend(fontsize=7)
    ax3.set_xticks(range(len(rows)), list(rows), rotation=30, fontsize=7)
    ax3.set_title("cross-entropy (nats)")
    ax3.axhline(report["teacher_forced"]["target"]["ce"], color="k", ls="--", lw=1, label="target")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], json_out: str | Path, md_out: str | Path | None, png_out: str | Path | None) -> None:
    from tandem_vllm import report as reports

    md = reports.write(json_out, report)
    Path(md_out or md).write_text(markdown(report))
    if png_out:
        plot(report, png_out)
