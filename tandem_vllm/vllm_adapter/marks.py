"""What every function the adapter installs in vLLM carries (``MARK``: the names of the patch-table rows
in it), and the per-engine test the patches share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from tandem_vllm.vllm_adapter.checks import is_tandem_checkpoint

MARK: Final = "_tandem_patches"


def serves_tandem(obj: Any) -> bool:
    """Whether a scheduler, engine core or model runner belongs to an engine with a Tandem drafter
    (read once per object from its ``vllm_config``)."""
    cached = obj.__dict__.get("_tandem_engine")
    if cached is None:
        spec = getattr(getattr(obj, "vllm_config", None), "speculative_config", None)
        cached = spec is not None and is_tandem_checkpoint(spec.draft_model_config)
        obj.__dict__["_tandem_engine"] = cached
    return cached


def mark(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    # functools.wraps copied the wrapped function's names (two patches may wrap one method): add ours
    setattr(fn, MARK, (*getattr(fn, MARK, ()), name))
    return fn
