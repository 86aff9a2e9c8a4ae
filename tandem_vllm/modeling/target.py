"""Hugging Face causal LMs (targets and standalone drafters) for the reference path.

``CausalLMRunner`` decodes a batch incrementally with a KV cache in which columns may be
invalid: left padding of prompts, and draft tokens the target rejected. Each step appends the
same number of columns to every row; a (B, S) validity mask hides dead columns, and positions
are counted per row, so rows may accept different numbers of drafts without re-layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tandem_vllm.config import TargetIdentity, read_config_json, target_identity
from tandem_vllm.errors import TandemError


@dataclass(frozen=True)
class LoadedLM:
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    identity: TargetIdentity


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; a CUDA device without one is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TandemError(f"--device {name} but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def load_causal_lm(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedLM:
    """Load a local HF causal LM directory (no downloads) with its tokenizer, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    read_config_json(path)  # clear errors for a missing dir / config / bad JSON
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TandemError(f"cannot load the model config or tokenizer in {path}: {_one_line(e)}") from None
    if not getattr(config, "architectures", None) or not config.architectures[0].endswith("ForCausalLM"):
        raise TandemError(f"{path} holds {config.architectures}, not a causal LM (…ForCausalLM)")
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise TandemError(f"cannot load the weights in {path}: {_one_line(e)}") from None
    model.to(device).eval()
    return LoadedLM(model=model, tokenizer=tokenizer, identity=target_identity(str(path), config, tokenizer))


def load_identity(path: str | Path) -> tuple[TargetIdentity, Any]:
    """A model directory's identity and tokenizer, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    read_config_json(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TandemError(f"cannot load the model config or tokenizer in {path}: {_one_line(e)}") from None
    return target_identity(str(path), config, tokenizer), tokenizer


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def num_layers(model: Any) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def hidden_taps(hidden_states: tuple[Tensor, ...], taps: tuple[int, ...]) -> Tensor:
    """HF ``hidden_states`` (L+1 tensors of (B,T,Dt)) -> (B, T, Ls, Dt) at the tap indices.

    HF's tuple holds the input to layer l at index l and the final *normed* state at index L,
    which is exactly the tap convention of ``tandem_vllm.config``.
    """
    return torch.stack([hidden_states[t] for t in taps], dim=2)


@dataclass(frozen=True)
class StepOutput:
    logits: Tensor  # (B, n, V)
    taps: Tensor | None  # (B, n, Ls, Dt) when the runner was built with taps
    positions: Tensor  # (B, n) sequence positions of the new columns


class CausalLMRunner:
    """Incremental batched forward passes over an HF causal LM with a holey KV cache."""

    def __init__(self, model: Any, batch: int, *, taps: tuple[int, ...] = ()) -> None:
        from transformers import DynamicCache

        self.model = model
        self.taps = taps
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # (B, S)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)

    @torch.no_grad()
    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> StepOutput:
        """Append n columns (B, n); ``valid`` (B, n) marks real tokens (default: all)."""
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        positions = (self.next_pos[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
        self.valid = torch.cat([self.valid, valid], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.valid.long(),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=bool(self.taps),
        )
        self.next_pos = self.next_pos + valid.sum(1)
        taps = hidden_taps(out.hidden_states, self.taps) if self.taps else None
        return StepOutput(logits=out.logits, taps=taps, positions=positions)

    def reject(self, keep: Tensor) -> None:
        """Invalidate the last n columns where ``keep`` (B, n) is False (rejected drafts)."""
        n = keep.shape[1]
        dropped = self.valid[:, -n:] & ~keep
        self.valid[:, -n:] &= keep
        self.next_pos = self.next_pos - dropped.sum(1)
