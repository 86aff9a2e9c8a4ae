"""Chat prompts for a chat target's training data, from sources that never overlap MT-Bench or HumanEval.

Two sources, both built here without downloads:

* **questions the target writes itself**: the chat template rendered up to the opening of a user turn
  (``user_turn_prefix``), continued by the target at T = 1 until it closes the turn -- an instruct
  model asked to play the user writes the requests its own training taught it to expect (the Magpie
  recipe). ``gen-data`` generates them (resumable shards), ``questions_from`` keeps the complete ones;
* **code requests** made from this Python's standard library (the training half of the demo corpus's
  split): complete a function from its signature and docstring, explain a function, write tests for it.

``decontaminated`` drops every prompt that shares an 8-word run with an MT-Bench turn or a HumanEval
prompt, and duplicates. Each row is ``{"messages": [{"role": "user", "content": ...}], "source": ...}``,
the shape ``gen-data --prompts`` reads.
"""

from __future__ import annotations

import ast
import json
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np

from tandem_vllm.errors import TandemError

SENTINEL: Final = "\x00"
CODE_TEMPLATES: Final = {
    "code-complete": "Complete the following Python function.\n\n```python\n{stub}```",
    "code-explain": "Explain what this Python function does.\n\n```python\n{source}```",
    "code-test": "Write unit tests with pytest for this Python function.\n\n```python\n{source}```",
}
MIN_WORDS, MAX_WORDS = 4, 200


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template's text up to where a user's first message begins (system prompt included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TandemError("the target's tokenizer has no chat template; self-written questions need a chat model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise TandemError("the target's chat template drops the user's message; cannot find where a user turn begins")
    return str(text[: text.index(SENTINEL)])


def questions_from(records: Iterable[dict[str, Any]], tokenizer: Any) -> list[str]:
    """The user turns the target finished (closed with its end-of-turn token) and of a sane length."""
    out = []
    for r in records:
        if r.get("finish") != "stop":
            continue  # cut off at max_tokens: a rambling turn, not a request
        text = tokenizer.decode(r["completion_ids"], skip_special_tokens=True).strip()
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            out.append(text)
    return out


def _functions(source: str) -> Iterable[tuple[str, str]]:
    """(stub, source) of each top-level or method function with a docstring: the stub is its
    signature and docstring (as HumanEval poses a problem), the source the whole definition."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        first = node.body[0]
        if node.end_lineno is None or first.end_lineno is None or len(node.body) < 2:
            continue
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        length = node.end_lineno - start + 1
        if not 4 <= length <= 40:
            continue
        yield (textwrap.dedent("".join(lines[start - 1 : first.end_lineno])),
               textwrap.dedent("".join(lines[start - 1 : node.end_lineno])))


def code_requests(sources: Iterable[str], n: int, seed: int) -> list[dict[str, Any]]:
    """n requests about the documented functions of Python ``sources`` (texts), templates in turn,
    functions in a seeded order."""
    found = [f for text in sources for f in _functions(text)]
    if not found:
        raise TandemError("no documented functions found in the corpus files for code requests")
    order = np.random.default_rng([seed, 3]).permutation(len(found))
    names = list(CODE_TEMPLATES)
    rows = []
    for i, j in enumerate(order[:n]):
        stub, source = found[int(j)]
        kind = names[i % len(names)]
        rows.append(chat_row(CODE_TEMPLATES[kind].format(stub=stub, source=source), kind))
    return rows


def chat_row(content: str, source: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "source": source}


def decontaminated(rows: list[dict[str, Any]], references: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Rows without an 8-word overlap with the references and without repeats; and how many were dropped."""
    from tandem_vllm.evalsets import overlaps

    texts = [r["messages"][-1]["content"] for r in rows]
    bad = overlaps(texts, references)
    seen: set[str] = set()
    kept = []
    for row, text, hit in zip(rows, texts, bad):
        key = " ".join(text.lower().split())
        if not hit and key not in seen:
            kept.append(row)
        seen.add(key)
    return kept, len(rows) - len(kept)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
