"""Does a better-trained target widen the Tandem drafter's lead over a standalone drafter?

One run on one machine (made for a GPU with PyTorch alone: gen-data falls back to the reference
decoder). For each target variant it trains the target on the bench corpus, generates the target's
own continuations, trains the standalone and the Tandem drafter with the bench recipe's drafter
settings (same dims, data, budget), and measures both with the reference decoders (tau and
per-depth acceptance at k = 3 and 5, greedy and T=1, 64 held-out prompts x 64 tokens). Variants run
in the order given and the run stops starting new phases at --budget-s; results.json is rewritten
after every phase, so an interrupted run still reports what it finished.

    python scripts/target_study.py --data DIR --work DIR --out DIR [--variants long,short] [--pack long]
    python scripts/target_study.py report RESULTS.json [NAME=EVAL.json ...] > REPORT.md

DIR (--data) holds train.jsonl(.xz), heldout.jsonl, heldout_prompts.jsonl and tokenizer/ (the bench
base's corpus). --pack NAME writes that variant's target (bf16) and drafters as pair.tar.xz.part-*
(15 MiB each) into --out, to bring the pair back for vLLM benchmarks on another machine.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tandem_vllm.demo.build import RECIPES  # noqa: E402
from tandem_vllm.train.args import ModelDims, TrainArgs  # noqa: E402

BENCH = RECIPES["bench"]
# target variants: (dims, steps, batch, lr); "short" is the bench recipe's own target schedule
VARIANTS: dict[str, tuple[ModelDims, int, int, float]] = {
    "short": (BENCH.target, BENCH.target_steps, BENCH.batch_size, BENCH.target_lr),
    "long": (BENCH.target, 3000, 32, 2e-3),
    "xl": (ModelDims(layers=12, hidden=768, heads=12, kv_heads=12), 3000, 32, 1.5e-3),
    "tiny-test": (ModelDims(layers=2, hidden=64, heads=2, kv_heads=2), 4, 4, 2e-3),
}


# seconds a target phase is started with at least (an H200's pace): the run then still evaluates it
TARGET_NEED_S = {"short": 60, "long": 150, "xl": 240}


class Study:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.t0 = a, time.perf_counter()
        self.results: dict[str, Any] = {"budget_s": a.budget_s, "variants": {}}
        a.out.mkdir(parents=True, exist_ok=True)
        a.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.a.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (self.a.out / "results.json").write_text(json.dumps(self.results, indent=2))

    def phase(self, variant: str, name: str, need_s: float, fn: Any) -> Any:
        rec = self.results["variants"].setdefault(variant, {})
        if self.left() < need_s:
            rec[name] = {"skipped": f"{self.left():.0f} s left, phase needs ~{need_s:.0f}"}
            self.save()
            return None
        t = time.perf_counter()
        print(f"[study] {variant}/{name} ({self.left():.0f} s left)", flush=True)
        try:
            out = fn()
            rec[name] = {"seconds": round(time.perf_counter() - t, 1), **(out if isinstance(out, dict) else {})}
        except Exception as e:  # a failed phase is reported, the run goes on
            traceback.print_exc()
            rec[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            out = None
        self.save()
        return out


def corpus(data: Path, work: Path) -> Path:
    plain = data / "train.jsonl"
    if plain.is_file():
        return plain
    out = work / "train.jsonl"
    if not out.is_file():
        out.write_bytes(lzma.decompress((data / "train.jsonl.xz").read_bytes()))
    return out


def run_variant(st: Study, name: str, train_jsonl: Path) -> None:
    from tandem_vllm.quality import quality_report
    from tandem_vllm.train.gen_data import GenSettings, generate
    from tandem_vllm.train.trainer import train

    a, (dims, steps, batch, lr) = st.a, VARIANTS[name]
    base = a.work / name
    held, prompts, tok = a.data / "heldout.jsonl", a.data / "heldout_prompts.jsonl", a.data / "tokenizer"
    common: dict[str, Any] = dict(data=(train_jsonl,), eval_data=(held,), seq_len=BENCH.seq_len, eval_batches=4,
                                  seed=BENCH.seed, progress=False)
    target = base / "target"
    st.phase(name, "target", TARGET_NEED_S.get(name, 30), lambda: {
        "dims": dims.__dict__, "steps": steps, "batch": batch, "tokens": steps * batch * BENCH.seq_len,
        **train(TrainArgs(kind="lm", out=target, tokenizer=tok, dims=dims, steps=steps, batch_size=batch, lr=lr,
                          loss="ce", warmup=max(1, steps // 20), eval_every=max(1, steps // 4),
                          save_every=max(1, steps // 4), **common)).metrics,
        **_throughput(target)})
    if not (target / "config.json").is_file():
        return
    gen = base / "generated"
    drafter_steps = a.drafter_steps or BENCH.drafter_steps
    st.phase(name, "gen_data", 20, lambda: {k: v for k, v in generate(GenSettings(
        target=target, out=gen, corpus=(train_jsonl,), num_prompts=a.gen_prompts or BENCH.gen_prompts,
        prompt_tokens=(16, max(16, BENCH.seq_len // 2)), temperatures=BENCH.gen_temperatures,
        max_tokens=a.gen_tokens or BENCH.gen_tokens, shard_size=256, seed=BENCH.seed, progress=False)).items()
        if k in ("prompts", "shards", "written_tokens", "settings")})
    drafter = TrainArgs(kind="baseline", out=base / "baseline", target=target, dims=BENCH.drafter, steps=drafter_steps,
                        batch_size=a.drafter_batch or BENCH.batch_size, lr=BENCH.drafter_lr, loss="distil", ce_fraction=BENCH.ce_fraction,
                        taps=BENCH.taps, block_size=BENCH.block_size, block_min=BENCH.block_min, gen_data=(gen,),
                        gen_ratio=BENCH.gen_ratio, warmup=max(1, drafter_steps // 20),
                        eval_every=max(1, drafter_steps // 2), save_every=drafter_steps, **common)
    st.phase(name, "baseline", 20, lambda: {**train(drafter).metrics, **_throughput(drafter.out)})

    def tandem() -> dict[str, Any]:
        try:
            return {"attn": "auto", **train(replace(drafter, kind="tandem", out=base / "tandem")).metrics,
                    **_throughput(base / "tandem")}
        except Exception as e:  # flex attention on this machine failed: say so, train with SDPA
            traceback.print_exc()
            shutil.rmtree(base / "tandem", ignore_errors=True)
            return {"attn": "sdpa", "flex_error": f"{type(e).__name__}: {e}"[:1000],
                    **train(replace(drafter, kind="tandem", out=base / "tandem", attn="sdpa")).metrics}
    st.phase(name, "tandem", 20, tandem)
    if a.eagle3:
        st.phase(name, "eagle3", 20, lambda: train(replace(drafter, kind="eagle3", out=base / "eagle3")).metrics)
    if not (base / "tandem" / "config.json").is_file():
        return
    eagle3 = base / "eagle3" if (base / "eagle3" / "config.json").is_file() else None

    def evaluate() -> dict[str, Any]:
        rep = quality_report(target_dir=target, drafter_dir=base / "tandem", baseline_dir=base / "baseline",
                             prompts_file=prompts, gammas=(3, 5), max_new_tokens=64, max_prompts=a.prompts,
                             progress=False, block=3, eagle3_dir=eagle3, device="auto")
        tau = rep["tau"]
        ratios = {m: {g: round(tau[m]["tandem"][g] / tau[m]["baseline"][g], 4) for g in tau[m]["tandem"]} for m in tau}
        return {"tandem_over_baseline": ratios, "tau": tau, "depth_acceptance": rep["depth_acceptance"],
                "teacher_forced_by_source": rep["teacher_forced_by_source"]}
    st.phase(name, "eval", 20, evaluate)


def _throughput(out: Path) -> dict[str, Any]:
    path = out / "train_summary.json"
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    return {k: s[k] for k in ("throughput", "device", "bf16", "attn") if k in s}


def pack(st: Study, name: str) -> None:
    """Target weights in bf16 (half the bytes), drafters as trained, tar.xz split into 15 MiB parts."""
    import torch
    from safetensors.torch import load_file, save_file

    base, stage = st.a.work / name, st.a.work / f"pack-{name}"
    shutil.rmtree(stage, ignore_errors=True)
    for part in ("target", "baseline", "tandem"):  # with EAGLE-3 the parts pass 64 MiB
        src = base / part
        if not (src / "config.json").is_file():
            continue
        shutil.copytree(src, stage / part, ignore=shutil.ignore_patterns("checkpoints", "*.jsonl"))
        if part == "target":
            for f in (stage / part).glob("*.safetensors"):
                save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    tar = st.a.work / f"pair-{name}.tar.xz"
    subprocess.run(["tar", "-C", str(stage), "-cJf", str(tar), "."], check=True, env={**os.environ, "XZ_OPT": "-T0 -1"})
    subprocess.run(["split", "-b", "15M", "-d", str(tar), str(st.a.out / f"pair-{name}.tar.xz.part-")], check=True)
    st.results["packed"] = {"variant": name, "bytes": tar.stat().st_size}


def report(results: Path, evals: list[str]) -> str:
    """Markdown of a study run (held-out metrics the trainer measured) and of reference-decoder reports
    (``tandem-vllm eval`` JSON) of its pairs, by name."""
    r = json.loads(results.read_text())
    out = [f"Study run on {r.get('machine', {}).get('cuda') or 'CPU'} (torch {r.get('machine', {}).get('torch')}), "
           f"{r.get('elapsed_s')} s.", "", "| target | tokens | target CE | drafter | CE | agreement | TV | "
           "agreement on target text | TV on target text |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        t = v.get("target", {})
        if "ce" not in t:
            continue
        for kind in ("baseline", "tandem", "eagle3"):
            d = v.get(kind, {})
            if "ce" in d:
                out.append(f"| {name} | {t['tokens'] / 1e6:.1f}M | {t['ce']:.3f} | {kind} | {d['ce']:.3f} | "
                           f"{d['agreement']:.4f} | {d['tv']:.4f} | {d['gen_agreement']:.4f} | {d['gen_tv']:.4f} |")
    for item in evals:
        name, _, path = item.partition("=")
        e = json.loads(Path(path).read_text())
        out += ["", f"**{name}** (`{path}`): tau with the reference decoders, {e['prompts']} held-out prompts x "
                f"{e['max_new_tokens']} tokens", "", "| mode | k | " + " | ".join(e["tau"]["greedy"]) + " | tandem / baseline |",
                "|---|---|" + "---|" * (len(e["tau"]["greedy"]) + 1)]
        for mode, by in e["tau"].items():
            for g in by["tandem"]:
                ratio = by["tandem"][g] / by["baseline"][g] if "baseline" in by else float("nan")
                out.append(f"| {mode} | {g} | " + " | ".join(f"{by[n][g]:.3f}" for n in by) + f" | {ratio:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        print(report(Path(sys.argv[2]), sys.argv[3:]), end="")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="long,short")
    p.add_argument("--pack", default="", help="variant whose pair is written to --out")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--eagle3", action="store_true")
    p.add_argument("--drafter-steps", type=int, default=0, help="0: the bench recipe's")
    p.add_argument("--drafter-batch", type=int, default=0, help="0: the bench recipe's (a GPU trains 32 rows "
                   "a step in about the time of 8)")
    p.add_argument("--gen-prompts", type=int, default=0, help="0: the bench recipe's")
    p.add_argument("--gen-tokens", type=int, default=0, help="0: the bench recipe's")
    a = p.parse_args()
    st = Study(a)
    import torch

    st.results["machine"] = {"torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    train_jsonl = corpus(a.data, a.work)
    for name in a.variants.split(","):
        run_variant(st, name, train_jsonl)
        if name == a.pack:
            st.phase(name, "pack", 15, lambda n=name: pack(st, n))
    st.save()
    print(json.dumps(st.results["variants"], indent=1)[:6000])


if __name__ == "__main__":
    main()
