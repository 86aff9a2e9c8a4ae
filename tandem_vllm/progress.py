"""Progress bars that stay readable in CI logs: live on a terminal, a line every 30 s otherwise."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(mininterval=0.5 if sys.stderr.isatty() else 30.0, **kwargs)
