"""The compatibility matrix: what a request through the served OpenAI API may ask for while the Tandem
drafter drafts, each row checked against the same request with speculation off.

Tests call ``check(row, ...)`` for a row; its outcome (and what was compared) is recorded, and at the
end of the session ``write()`` renders results/compat/matrix.{json,md}. docs/serving.md's table is that
markdown, and a unit test keeps the two equal, so the table is generated from test results.

The suite runs the matrix on the ci pair. ``TANDEM_COMPAT_PAIR=chat`` runs it on the chat pair
(SmolLM2-135M-Instruct and its shipped Tandem drafter) instead, into results/compat/chat/:
``TANDEM_COMPAT_PAIR=chat .venv/bin/python -m pytest tests/integration/test_compat_matrix.py
tests/integration/test_compat_vllm_server.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PAIR = os.environ.get("TANDEM_COMPAT_PAIR", "ci")
if PAIR not in ("ci", "chat"):
    raise ValueError(f"TANDEM_COMPAT_PAIR={PAIR!r}: choose ci or chat")
RESULTS = Path(__file__).resolve().parents[2] / "results" / "compat" / ("" if PAIR == "ci" else PAIR)
_outcomes: dict[str, dict[str, Any]] = {}

# the rows, in the table's order: feature -> how it is served
ROWS = {
    "plain completion (greedy)": "Serve app",
    "structured outputs: response_format json_schema": "Serve app",
    "structured outputs: choice": "Serve app",
    "structured outputs: regex": "Serve app",
    "tool call (named tool_choice)": "Serve app",
    "prefix caching on (repeated prompt hits the cache)": "Serve app",
    "logprobs (top 3)": "Serve app",
    "n > 1 (n=2, T=1, seeded)": "Serve app",
    "stop strings": "Serve app",
    "seed (T=1, same seed twice)": "Serve app",
    "prompt near max_model_len": "Serve app",
    "prefix caching off": "vLLM's own server",
    "tensor parallel 2": "vLLM's own server",
}


class Row:
    """``with Row(name) as row: ...`` records pass, or fail with the error, and re-raises."""

    def __init__(self, name: str):
        assert name in ROWS, name
        self.name, self.notes = name, ""

    def __enter__(self) -> Row:
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        _outcomes[self.name] = {"passed": kind is None, "how": ROWS[self.name],
                                "checked": self.notes if kind is None else f"FAILED: {' '.join(str(err).split())[:160]}"}
        return False


def markdown(outcomes: dict[str, dict[str, Any]]) -> str:
    lines = ["| feature | served by | with Tandem | what was checked |", "|---|---|---|---|"]
    for name in ROWS:
        o = outcomes.get(name)
        mark = "not run" if o is None else "pass" if o["passed"] else "**FAIL**"
        lines.append(f"| {name} | {ROWS[name]} | {mark} | {'' if o is None else o['checked']} |")
    return "\n".join(lines) + "\n"


def write() -> None:
    """Merge this session's outcomes into the recorded matrix (rows not run keep their last result)."""
    if not _outcomes:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "matrix.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded = {k: v for k, v in {**recorded, **_outcomes}.items() if k in ROWS}
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    (RESULTS / "matrix.md").write_text(markdown(recorded))
