"""Training text: plain-text files or JSONL, tokenized and packed into fixed-length sequences."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tandem_vllm.errors import TandemError
from tandem_vllm.prompts import JSONL_KEYS, jsonl_rows, jsonl_text, read_utf8


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Documents from files: a .jsonl line is one document (its "text"/"prompt"/"content" field);
    any other file is one document. Raises TandemError naming the file for every bad input."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TandemError(f"data file {path} does not exist; pass text or JSONL files")
        text = read_utf8(path, "data file")
        found = _jsonl_docs(path, text) if path.suffix == ".jsonl" else [text]
        found = [d for d in found if d.strip()]
        if not found:
            raise TandemError(f"data file {path} has no text; remove it or fill it")
        docs.extend(found)
    if not docs:
        raise TandemError("no data files given; pass at least one text or JSONL file")
    return docs


def _jsonl_docs(path: Path, text: str) -> list[str]:
    docs = []
    for n, obj in jsonl_rows(path, text):
        doc = jsonl_text(obj)
        if doc is None:
            raise TandemError(f"{path}:{n} has no string field {' / '.join(JSONL_KEYS)}")
        docs.append(doc)
    return docs


def pack(docs: list[str], tokenizer: Any, seq_len: int) -> Tensor:
    """Concatenate documents (EOS between them) into rows of seq_len + 1 tokens: (N, seq_len + 1).
    Row r trains inputs r[:-1] against labels r[1:]."""
    return pack_ids(tokenizer(docs, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, seq_len)


def pack_ids(seqs: Iterable[list[int]], eos: int | None, seq_len: int) -> Tensor:
    """``pack`` for documents already tokenized."""
    ids: list[int] = []
    for enc in seqs:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise TandemError(f"data holds {len(ids)} tokens, fewer than one sequence of {seq_len + 1}; add text or lower --seq-len")
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def batch_indices(n_rows: int, batch_size: int, step: int, micro: int, accum: int, seed: int) -> np.ndarray:
    """Rows of micro-batch ``micro`` of optimizer step ``step``: a pure function of its arguments,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    start = (step * accum + micro) * batch_size
    idx = np.arange(start, start + batch_size)
    epochs, offsets = idx // n_rows, idx % n_rows
    return np.array([_epoch_order(n_rows, seed, int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


@lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def pack_generated(samples: list[Any], seq_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Generated sequences (``gen_data.Generated``: prompt ids + the target's completion) -> rows
    (N, seq_len + 1) and a loss mask (N, seq_len) that is 1 where the label is a completion token.

    The prompt is context only; a sequence too long keeps the prompt's tail (at least one token)
    and the completion's head, one too short is padded (masked out)."""
    rows = torch.full((len(samples), seq_len + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), seq_len, dtype=torch.long)
    for r, s in enumerate(samples):
        n_c = min(len(s.completion_ids), seq_len)
        n_p = min(len(s.prompt_ids), seq_len + 1 - n_c)
        seq = s.prompt_ids[len(s.prompt_ids) - n_p :] + s.completion_ids[:n_c]
        rows[r, : len(seq)] = torch.tensor(seq)
        mask[r, n_p - 1 : n_p - 1 + n_c] = 1  # label j is token j + 1
    return rows, mask
