"""Prompt files and JSONL, read one way everywhere (benchmarks, quality reports, gen-data, training data).

A prompts file is JSONL: one object per line with "prompt" (or "text" / "content"), and for benchmark
workloads optionally "regex" (vLLM structured outputs for that request) and "temperature". Every bad
line is a one-line error naming the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_vllm.errors import TandemError

JSONL_KEYS = ("text", "prompt", "content")


def read_utf8(path: Path, what: str) -> str:
    """The file's text; a file that is not UTF-8 is a one-line error naming ``what`` and the path."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TandemError(f"{what} {path} is not UTF-8 (byte {e.start}); convert it with iconv -t utf-8") from None


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line; a line that is not JSON is a one-line error."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise TandemError(f"{path}:{n} is not valid JSON ({e.msg}); one JSON object per line") from None


def jsonl_text(obj: Any) -> str | None:
    """A row's document: its first string field among JSONL_KEYS."""
    return next((obj[k] for k in JSONL_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)


@dataclass(frozen=True)
class Prompt:
    """One request of a workload: its text and, optionally, a regular expression its output must match
    (vLLM's structured outputs; a prompts line's "regex" field) and a temperature of its own (the
    line's "temperature"; else the run's)."""

    text: str
    regex: str | None = None
    temperature: float | None = None


def read_workload(path: str | Path) -> list[Prompt]:
    """A prompts file: one JSON object per line with "prompt" (or "text"/"content") and optionally "regex"
    and "temperature"."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise TandemError(f"--prompts {path}: expected an existing .jsonl file with one {{\"prompt\": ...}} per line")
    out = []
    for n, obj in jsonl_rows(path, read_utf8(path, "--prompts")):
        text = jsonl_text(obj)
        if not text or not text.strip():
            raise TandemError(f"{path}:{n} has no \"prompt\" string")
        regex = obj.get("regex")
        if regex is not None:
            try:
                re.compile(regex)
            except (re.error, TypeError) as e:
                raise TandemError(f"{path}:{n}: \"regex\" is not a regular expression ({e})") from None
        temperature = obj.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not 0 <= temperature <= 10):
            raise TandemError(f"{path}:{n}: \"temperature\" must be a number from 0 to 10, not {temperature!r}")
        out.append(Prompt(text, regex, None if temperature is None else float(temperature)))
    if not out:
        raise TandemError(f"{path} has no prompts; one {{\"prompt\": ...}} per line")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """The prompt texts of a prompts file (its regex and temperature fields ignored)."""
    return [p.text for p in read_workload(path)]
