"""Every report the commands write: a JSON document and, beside it, its markdown table (same stem, .md).
Benchmarks, the quality report and the suite all write through ``write``, so a report's files are laid
out one way, whatever measured them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

# fields a measured cell carries for the run itself, not for the report (generated token ids, wall-clock windows)
RUN_ONLY = ("outputs", "window")


def rows(cells: Iterable[Any]) -> list[dict[str, Any]]:
    """Dataclass cells as JSON rows, without what only the run needed."""
    return [{k: v for k, v in asdict(c).items() if k not in RUN_ONLY} for c in cells]


def write(path: str | Path, doc: dict[str, Any], table: str | None = None) -> Path:
    """``doc`` as JSON at ``path`` and ``table`` (markdown) beside it; returns the markdown's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    md = path.with_suffix(".md")
    if table is not None:
        md.write_text(table)
    return md
