"""The demo corpus: this Python's standard-library sources, identical on every machine with the
same Python, split train/held-out by a hash of each file's relative path."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
# A minimal chat template so chat endpoints work with the demo models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_files() -> list[Path]:
    """Sorted .py files of the running interpreter's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def is_heldout(path: Path, heldout_percent: int) -> bool:
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < heldout_percent


def split_corpus(max_train_bytes: int, heldout_percent: int = 5) -> tuple[list[Path], list[Path]]:
    """(train, held-out) file lists; train is capped at max_train_bytes (sorted order, deterministic)."""
    train, held, size = [], [], 0
    for p in stdlib_files():
        if is_heldout(p, heldout_percent):
            held.append(p)
        elif size < max_train_bytes:
            train.append(p)
            size += p.stat().st_size
    return train, held


def read_sources(paths: Iterable[Path]) -> Iterator[str]:
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of stdlib test files are deliberately not UTF-8
        if text.strip():
            yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path) -> Any:
    """Byte-level BPE (GPT-2 style) saved as a Hugging Face fast tokenizer in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def heldout_prompts(paths: Iterable[Path], n: int, max_chars: int) -> list[dict[str, str]]:
    """Prompts cut from held-out files at line boundaries: {"prompt": ...} rows for a JSONL file."""
    rows = []
    for text in read_sources(paths):
        for start in range(0, len(text), 4 * max_chars):
            chunk = text[start : start + max_chars]
            cut = chunk.rfind("\n")
            if cut > max_chars // 2:
                rows.append({"prompt": chunk[: cut + 1]})
            if len(rows) == n:
                return rows
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
