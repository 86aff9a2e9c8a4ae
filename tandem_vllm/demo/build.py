"""``tandem-vllm demo build``: the embedded demo pair, built deterministically with no downloads.

corpus (stdlib sources) -> byte-level BPE tokenizer -> Llama target (CE) -> the target's own
continuations of training-text windows, greedy and sampled (``gen-data``, through vLLM) -> standalone
drafter (Gecko-Distil) and Tandem drafter (Tandem-Distil) with the same dims, data, budget and
schedule -> held-out prompts.

The corpus, tokenizer and target land in ``$TANDEM_VLLM_CACHE/demo/<size>-base-<hash of their
settings>``, the generated data and drafters in ``<size>-<hash of the whole recipe>``: a new drafter
recipe reuses the target. Each step is skipped when its output exists, so a rerun reuses a finished
pair and an interrupted build resumes (training from its last checkpoint, generation from its last
complete shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem_vllm.config import FORMAT_VERSION
from tandem_vllm.demo.corpus import heldout_prompts, read_sources, split_corpus, train_tokenizer, write_jsonl
from tandem_vllm.errors import TandemError
from tandem_vllm.train.args import ModelDims, TrainArgs

RECIPE_VERSION = 2
# what decides the corpus, tokenizer and target: a recipe that changes only the drafters reuses them
BASE_FIELDS = ("size", "corpus_bytes", "vocab_size", "seq_len", "batch_size", "target", "target_steps", "target_lr",
               "n_prompts", "prompt_chars", "heldout_percent", "seed")


@dataclass(frozen=True)
class DemoRecipe:
    size: str
    corpus_bytes: int  # cap on training text (sorted stdlib files)
    vocab_size: int
    seq_len: int
    batch_size: int
    target: ModelDims
    target_steps: int
    target_lr: float
    drafter: ModelDims
    drafter_steps: int
    drafter_lr: float
    taps: str  # l(j) for the Tandem drafter
    block_size: int  # the longest training block; blocks are drawn from block_min..block_size
    block_min: int = 0  # 0: fixed blocks of block_size
    ce_fraction: float = 0.0  # Tandem-CE steps before Tandem-Distil (both drafters)
    gen_prompts: int = 0  # training-text windows the target continues (0: natural text only)
    gen_tokens: int = 96  # tokens per continuation
    gen_temperatures: tuple[float, ...] = (0.0, 1.0)
    gen_ratio: float = 0.8  # fraction of each drafter batch drawn from the target's continuations
    eagle3: bool = True  # also train an EAGLE-3 head (block_size draft steps unrolled) as a peer
    n_prompts: int = 64
    prompt_chars: int = 600
    heldout_percent: int = 5
    seed: int = 0

    def key(self) -> str:
        return _hash({"recipe": asdict(self), "v": RECIPE_VERSION, "fmt": FORMAT_VERSION, "py": platform.python_version()})

    def base_key(self) -> str:
        recipe = asdict(self)
        return _hash({"base": {k: recipe[k] for k in BASE_FIELDS}, "py": platform.python_version()})


def _hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


RECIPES = {
    # Tests and `make demo`: about 10 minutes on 2 CPU cores. Small batches and many steps learn
    # far more per second here than large batches (measured: CE 5.2 vs 6.0 at equal tokens).
    # Drafters: 80% of each batch from the target's own continuations, blocks of 1..5 (covers the
    # served k <= 5), distillation from the first step: chosen by measured tau (results/README.md).
    "ci": DemoRecipe(
        size="ci", corpus_bytes=3_000_000, vocab_size=2048, seq_len=128, batch_size=8,
        target=ModelDims(layers=4, hidden=256, heads=4, kv_heads=4), target_steps=900, target_lr=3e-3,
        drafter=ModelDims(layers=2, hidden=64, heads=2, kv_heads=2), drafter_steps=600, drafter_lr=3e-3,
        taps="span", block_size=5, block_min=1, gen_prompts=2048, gen_tokens=96,
    ),
    # Benchmarks: a target big enough that speculation can pay on CPU (with full acceptance at k = 3 a 1.3M-
    # parameter target reached 1.49x, a 28M one 2.46x: below ~30M every engine step is overhead), trained
    # on ~3M tokens; about 2 hours on 2 CPU cores (resumable), minutes on one GPU.
    "bench": DemoRecipe(
        size="bench", corpus_bytes=20_000_000, vocab_size=4096, seq_len=256, batch_size=8,
        target=ModelDims(layers=8, hidden=512, heads=8, kv_heads=8), target_steps=1500, target_lr=2e-3,
        drafter=ModelDims(layers=2, hidden=128, heads=4, kv_heads=4), drafter_steps=600, drafter_lr=3e-3,
        taps="span", block_size=5, block_min=1, gen_prompts=2048, gen_tokens=128,
    ),
    # Under two minutes: exercises every step of the pipeline (head_dim 32: vLLM's CPU attention serves it).
    "tiny": DemoRecipe(
        size="tiny", corpus_bytes=150_000, vocab_size=320, seq_len=32, batch_size=4,
        target=ModelDims(layers=2, hidden=64, heads=2, kv_heads=2), target_steps=4, target_lr=2e-3,
        drafter=ModelDims(layers=1, hidden=32, heads=1, kv_heads=1), drafter_steps=4, drafter_lr=3e-3,
        taps="span", block_size=3, block_min=1, gen_prompts=16, gen_tokens=16, n_prompts=8, prompt_chars=200,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_VLLM_CACHE", Path.home() / ".cache" / "tandem-vllm"))


def demo_dir(recipe: DemoRecipe, root: Path | None = None) -> Path:
    return (root or cache_root()) / "demo" / f"{recipe.size}-{recipe.key()}"


def base_dir(recipe: DemoRecipe, root: Path | None = None) -> Path:
    """Corpus, tokenizer and target: shared by every recipe with the same base settings."""
    return (root or cache_root()) / "demo" / f"{recipe.size}-base-{recipe.base_key()}"


def build(size: str = "ci", *, root: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the demo pair; returns the manifest with the paths it holds."""
    if size == "real":
        from tandem_vllm.demo import real

        return real.build(root or cache_root(), progress=progress)
    if size == "chat":
        from tandem_vllm.demo import chat

        return chat.build(root or cache_root(), progress=progress)
    if size not in RECIPES:
        raise TandemError(f"--size {size!r}: choose one of {', '.join(RECIPES)}, real, chat")
    recipe = RECIPES[size]
    out, base = demo_dir(recipe, root), base_dir(recipe, root)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(progress, f"building the {size} demo pair in {out} (target in {base})")

    train_jsonl, held_jsonl, prompts = base / "corpus" / "train.jsonl", base / "corpus" / "heldout.jsonl", base / "heldout_prompts.jsonl"
    if not prompts.is_file():
        train_files, held_files = split_corpus(recipe.corpus_bytes, recipe.heldout_percent)
        (base / "corpus").mkdir(exist_ok=True)
        write_jsonl([{"text": t} for t in read_sources(train_files)], train_jsonl)
        write_jsonl([{"text": t} for t in read_sources(held_files)], held_jsonl)
        write_jsonl(heldout_prompts(held_files, recipe.n_prompts, recipe.prompt_chars), prompts)
        _say(progress, f"corpus: {len(train_files)} train / {len(held_files)} held-out stdlib files")

    from tandem_vllm.train.trainer import train_once

    tok_dir = base / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [json.loads(line)["text"] for line in train_jsonl.read_text().splitlines()]
        train_tokenizer(texts, recipe.vocab_size, tok_dir)
        _say(progress, f"tokenizer: byte-level BPE, {recipe.vocab_size} tokens")

    common: dict[str, Any] = dict(data=(train_jsonl,), eval_data=(held_jsonl,), seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                  warmup=max(1, recipe.target_steps // 20), eval_every=max(1, recipe.target_steps // 4),
                  eval_batches=4, save_every=max(1, recipe.target_steps // 8), seed=recipe.seed, progress=progress)
    target_args = TrainArgs(kind="lm", out=base / "target", tokenizer=tok_dir, dims=recipe.target, steps=recipe.target_steps,
                            lr=recipe.target_lr, loss="ce", **common)
    results = {"target": train_once(target_args)}

    gen_dirs: tuple[Path, ...] = ()
    if recipe.gen_prompts:
        gen_dirs = (_generate_once(recipe, base / "target", train_jsonl, out / "generated", progress),)
    drafter_common: dict[str, Any] = dict(common, target=base / "target", dims=recipe.drafter, steps=recipe.drafter_steps, lr=recipe.drafter_lr,
                          loss="distil", ce_fraction=recipe.ce_fraction, taps=recipe.taps, block_size=recipe.block_size,
                          block_min=recipe.block_min, gen_data=gen_dirs, gen_ratio=recipe.gen_ratio,
                          warmup=max(1, recipe.drafter_steps // 20), eval_every=max(1, recipe.drafter_steps // 4),
                          save_every=max(1, recipe.drafter_steps // 8))
    results["baseline"] = train_once(TrainArgs(kind="baseline", out=out / "baseline", **drafter_common))
    results["tandem"] = train_once(TrainArgs(kind="tandem", out=out / "tandem", **drafter_common))
    if recipe.eagle3:  # the peer vLLM users pick today: same width, data, budget and losses (one layer)
        results["eagle3"] = train_once(TrainArgs(kind="eagle3", out=out / "eagle3", **drafter_common))

    manifest = {
        "size": size,
        "recipe": asdict(recipe),
        "target": str(base / "target"),
        "baseline": str(out / "baseline"),
        "tandem": str(out / "tandem"),
        "eagle3": str(out / "eagle3") if recipe.eagle3 else None,
        "generated": [str(d) for d in gen_dirs],
        "heldout_prompts": str(prompts),
        "heldout_corpus": str(held_jsonl),
        "train_corpus": str(train_jsonl),
        "eval": results,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    for path in (base / "target", out / "baseline", out / "tandem", out / "eagle3"):
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return manifest


def _generate_once(recipe: DemoRecipe, target: Path, corpus: Path, out: Path, progress: bool) -> Path:
    """The target's continuations of training-text windows (``gen-data``), resumed shard by shard."""
    from tandem_vllm.train.gen_data import GenSettings, generate

    settings = GenSettings(target=target, out=out, corpus=(corpus,), num_prompts=recipe.gen_prompts,
                           prompt_tokens=(16, max(16, recipe.seq_len // 2)), temperatures=recipe.gen_temperatures,
                           max_tokens=recipe.gen_tokens, shard_size=256, seed=recipe.seed, progress=progress)
    done = generate(settings)
    if done["written_shards"]:
        _say(progress, f"generated: {done['written_tokens']} tokens of the target's own continuations in {out}")
    return out


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[demo] {msg}", flush=True)
