"""Load drafters against a target, refusing any pair whose token ids or states would not line up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem_vllm.config import check_target, identity_differences
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.reference import TandemDrafter
from tandem_vllm.modeling.target import LoadedLM, load_causal_lm


def load_tandem_for(target: LoadedLM, path: str | Path, *, device: str = "cpu") -> TandemDrafter:
    drafter = TandemDrafter.load(path, device=device)
    check_target(drafter.cfg, target.identity, drafter_path=str(path))
    return drafter.to(next(target.model.parameters()).dtype).bind_target(target.model).eval()


def load_baseline_for(target: LoadedLM, path: str | Path, *, device: str = "cpu") -> LoadedLM:
    dtype = next(target.model.parameters()).dtype
    draft = load_causal_lm(path, device=device, dtype=dtype)
    want, got = target.identity, draft.identity
    if (want.vocab_size, want.tokenizer_fingerprint) != (got.vocab_size, got.tokenizer_fingerprint):
        raise TandemError(
            f"drafter {path} and target {want.name_or_path} use different tokenizers "
            f"(vocab {got.vocab_size} vs {want.vocab_size}, fingerprint {got.tokenizer_fingerprint} vs "
            f"{want.tokenizer_fingerprint}); a drafter must share the target's tokenizer"
        )
    return draft


def load_eagle3_for(target: LoadedLM, path: str | Path) -> Any:
    """An EAGLE-3 head exported by ``tandem-vllm train --kind eagle3``, refused unless it was trained
    against this target (its fc reads the target's states, its ids are the target's tokens)."""
    from tandem_vllm.modeling.eagle3 import Eagle3Head

    head = Eagle3Head.load(path)
    want, got = head.cfg.target, target.identity
    diffs = identity_differences(want, got)
    if diffs:
        raise TandemError(f"EAGLE-3 head {path} was trained for target {want.name_or_path!r} but got "
                          f"{got.name_or_path!r} ({'; '.join(diffs)}); train a head for this target")
    return head.to(next(target.model.parameters()).dtype).bind_target(target.model).eval()
