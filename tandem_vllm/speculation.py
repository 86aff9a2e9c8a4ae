"""What a speculative config is made of, shared by serving, benchmarks and the vLLM adapter (no vLLM here).

* ``DRAFT_SAMPLE_METHOD``: drafters sample their drafts and hand their probabilities to vLLM's rejection
  sampler. vLLM 0.32's default, "greedy", verifies a sampled request as if the drafter were certain of its
  argmax and accepts far less (ci pair, T = 1, k = 3: tau 1.21 with greedy drafts, 2.39 with sampled ones).
  Greedy requests still take the drafter's argmax.
* ``NGRAM``: the n-gram prompt lookup every benchmark compares against.
* the **k schedule**: how many tokens to draft at each batch size, vLLM's
  ``num_speculative_tokens_per_batch_size`` -- (first batch size, last batch size, k) triples, inclusive.
  ``bench schedule`` measures one; ``serve --k-schedule`` serves it. vLLM's own validator checks
  it (``vllm_adapter.engine.validate_k_schedule``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from tandem_vllm.errors import TandemError

DRAFT_SAMPLE_METHOD: Final = "probabilistic"
SAMPLED_DRAFTS: Final = {"draft_sample_method": DRAFT_SAMPLE_METHOD}
NGRAM_LOOKUP: Final = {"prompt_lookup_min": 2, "prompt_lookup_max": 5}
NGRAM: Final = {"method": "ngram", **NGRAM_LOOKUP}

KSchedule = list[tuple[int, int, int]]  # (first batch size, last batch size, k), inclusive
UNBOUNDED: Final = 1 << 20  # the last range's end: every larger running batch


def drafter_config(drafter: str, k: int, schedule: KSchedule | None = None) -> dict[str, Any]:
    """The speculative_config serving ``drafter`` with ``k`` drafts (by ``schedule`` when given; k is then
    capped at the schedule's largest k, and a schedule that never drafts gives {})."""
    if schedule is None:
        return {"model": drafter, "num_speculative_tokens": k, **SAMPLED_DRAFTS}
    k_max = max(kk for _, _, kk in schedule)
    if k_max == 0:
        return {}
    return {"model": drafter, "num_speculative_tokens": k_max,
            "num_speculative_tokens_per_batch_size": [list(r) for r in schedule], **SAMPLED_DRAFTS}


def read_k_schedule(source: str | Path) -> Any:
    """The raw k schedule of a ``bench schedule`` report, a file holding a bare JSON list of [first, last, k],
    or that list itself as JSON text (validate it with ``vllm_adapter.engine.validate_k_schedule``)."""
    text = str(source).strip()
    try:
        doc = json.loads(text if text.startswith("[") else Path(source).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TandemError(f"cannot read a k schedule from {source}: {e}") from None
    return doc.get("schedule") if isinstance(doc, dict) else doc
