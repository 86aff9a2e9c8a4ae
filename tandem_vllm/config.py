"""The Tandem drafter checkpoint contract.

A drafter checkpoint is a directory holding ``config.json``, ``model.safetensors`` and (for
convenience) a copy of the target's tokenizer files. ``config.json`` is a Llama-style config --
so ``transformers.AutoConfig`` and vLLM's config loader read it natively -- whose
``architectures`` names ``TandemDrafterForCausalLM`` and which carries ``tandem_format_version``
and a ``tandem_config`` block::

    {
      "architectures": ["TandemDrafterForCausalLM"],
      "model_type": "llama",
      "hidden_size": 128, "num_hidden_layers": 1, ...,          # the drafter's own dims
      "tandem_format_version": 1,
      "tandem_config": {
        "tap_layers": [0],                                       # l(j) for each drafter layer j
        "block_size": 2,                                         # gamma it was trained with
        "target": {"name_or_path": "...", "architectures": ["LlamaForCausalLM"],
                   "hidden_size": 256, "num_hidden_layers": 4, "vocab_size": 2048,
                   "tokenizer_fingerprint": "3f2a..."}
      }
    }

Tap index convention (shared by the reference model and the vLLM path): ``l`` in
``0 .. target_layers - 1`` is the residual stream *entering* target layer ``l`` (``0`` = the
embedding output); ``l == target_layers`` is the target's final, normed hidden state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem_vllm.errors import TandemError

ARCHITECTURE: Final = "TandemDrafterForCausalLM"
FORMAT_VERSION: Final = 1
CONFIG_FILE: Final = "config.json"
WEIGHTS_FILE: Final = "model.safetensors"
# Drafting more than this per target pass never pays at the acceptance rates drafters reach.
MAX_SPECULATIVE_TOKENS: Final = 16


class TargetIdentity(BaseModel):
    """What a drafter was trained against; loading against anything else is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name_or_path: str = Field(description="Where the target was loaded from when the drafter was trained.")
    architectures: tuple[str, ...] = Field(description="The target's `architectures` from its config.json.")
    hidden_size: int = Field(gt=0, description="Target residual width Dt; the P_j projections read it.")
    num_hidden_layers: int = Field(gt=0, description="Target depth; bounds the tap indices.")
    vocab_size: int = Field(gt=0, description="Target vocabulary size; drafts must be target token ids.")
    tokenizer_fingerprint: str = Field(description="sha256 prefix of the target tokenizer's vocabulary.")
    weights: str | None = Field(
        default=None,
        description="Where the weights came from when the target directory records it (an imported GGUF file: its "
        "name, quantization and sha256); a drafter is refused against other weights of the same model.",
    )


# The config.json ``tandem_config`` block; the rest of TandemConfig is Llama-style dims at the top level.
# The optional keys are written only when they differ from their defaults.
OPTIONAL_TANDEM_KEYS: Final = ("draft_vocab_size", "shared_target_weights")
TANDEM_KEYS: Final = ("tap_layers", "block_size", "target", *OPTIONAL_TANDEM_KEYS)


class TandemConfig(BaseModel):
    """A Tandem drafter: a small Llama whose layer j also attends to P_j(target state at tap l(j))."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0, description="Drafter vocabulary; equals the target's.")
    hidden_size: int = Field(gt=0, description="Drafter width D.")
    intermediate_size: int = Field(gt=0, description="SwiGLU hidden width.")
    num_hidden_layers: int = Field(gt=0, description="Drafter depth L_S.")
    num_attention_heads: int = Field(gt=0, description="Query heads H.")
    num_key_value_heads: int = Field(gt=0, description="K/V heads (grouped-query attention).")
    rms_norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon.")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base.")
    max_position_embeddings: int = Field(default=2048, gt=0, description="Longest sequence supported.")
    tie_word_embeddings: bool = Field(default=True, description="lm_head shares the embedding matrix.")
    bos_token_id: int | None = Field(default=None, description="Copied from the target's config.")
    eos_token_id: int | None = Field(default=None, description="Copied from the target's config.")
    tap_layers: tuple[int, ...] = Field(description="l(j): the target tap each drafter layer attends to.")
    block_size: int = Field(default=2, ge=1, description="gamma used in training (block-causal rule).")
    target: TargetIdentity
    draft_vocab_size: int | None = Field(
        default=None, gt=0,
        description="Tokens the drafter can propose (its LM head's rows); None = the whole vocabulary. The ids are "
        "the checkpoint's `draft_token_ids` tensor (target token ids, most frequent in training first).",
    )
    shared_target_weights: bool = Field(
        default=False,
        description="The token embedding and LM head are the target's (frozen, not stored in the checkpoint; bound "
        "when the drafter is loaded beside its target). Needs hidden_size equal to the target's.",
    )

    @model_validator(mode="after")
    def _check(self) -> TandemConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.tap_layers) != self.num_hidden_layers:
            raise ValueError(
                f"tap_layers has {len(self.tap_layers)} entries; need one per drafter layer "
                f"({self.num_hidden_layers})"
            )
        top = self.target.num_hidden_layers
        bad = [t for t in self.tap_layers if not 0 <= t <= top]
        if bad:
            raise ValueError(f"tap_layers {bad} out of range 0..{top} for a {top}-layer target")
        if self.vocab_size != self.target.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} differs from the target's {self.target.vocab_size}")
        if self.draft_vocab_size is not None and self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} exceeds vocab_size={self.vocab_size}")
        if self.shared_target_weights and self.hidden_size != self.target.hidden_size:
            raise ValueError(f"shared_target_weights needs hidden_size equal to the target's {self.target.hidden_size}; "
                             f"got {self.hidden_size}")
        return self

    @property
    def lm_head_rows(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- config.json <-> TandemConfig -------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        dims = self.model_dump(exclude=set(TANDEM_KEYS))
        extra = {k: getattr(self, k) for k in OPTIONAL_TANDEM_KEYS if getattr(self, k) != type(self).model_fields[k].default}
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            **dims,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "tandem_format_version": FORMAT_VERSION,
            "tandem_config": {
                "tap_layers": list(self.tap_layers),
                "block_size": self.block_size,
                "target": self.target.model_dump(mode="json"),
                **extra,
            },
        }

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> TandemConfig:
        if ARCHITECTURE not in raw.get("architectures", []):
            raise TandemError(
                f"{source} is not a Tandem drafter (architectures={raw.get('architectures')}); "
                f"export one with `tandem-vllm train --kind tandem`"
            )
        version = raw.get("tandem_format_version")
        if version != FORMAT_VERSION:
            raise TandemError(
                f"{source} has tandem_format_version={version}; this tandem-vllm reads version "
                f"{FORMAT_VERSION}. Re-export the drafter with this version."
            )
        fields = {k: raw[k] for k in cls.model_fields if k in raw and k not in TANDEM_KEYS}
        try:
            return cls(**fields, **raw["tandem_config"])
        except (ValidationError, KeyError, TypeError) as e:
            raise TandemError(f"{source} is not a valid Tandem drafter config: {_first_error(e)}") from None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TandemConfig:
        path = Path(directory) / CONFIG_FILE
        return cls.from_hf_dict(read_config_json(Path(directory)), source=str(path))


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        return f"{where}: {err['msg']}"
    return f"missing or malformed field {e}"


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory, or a TandemError naming what is wrong."""
    if not directory.is_dir():
        raise TandemError(f"model directory {directory} does not exist; pass a local Hugging Face model directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise TandemError(f"{directory} has no {CONFIG_FILE}; it is not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TandemError(f"{path} is not valid JSON ({e}); re-export or re-download the model") from None
    if not isinstance(raw, dict):
        raise TandemError(f"{path} does not hold a JSON object; re-export the model")
    return raw


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens: equal iff token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


IMPORT_KEY: Final = "tandem_import"  # config.json record written by `tandem-vllm import-gguf`


def weights_source(hf_config: Any) -> str | None:
    """``file quantization sha256:prefix`` of an imported target (config.json's ``tandem_import``), else None."""
    record = getattr(hf_config, IMPORT_KEY, None)
    if not isinstance(record, dict):
        return None
    return f"{record.get('file')} {record.get('quantization')} sha256:{str(record.get('sha256'))[:16]}"


def target_identity(name_or_path: str, hf_config: Any, tokenizer: Any) -> TargetIdentity:
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    return TargetIdentity(
        name_or_path=str(name_or_path),
        architectures=tuple(hf_config.architectures or ()),
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        weights=weights_source(hf_config),
    )


IDENTITY_CHECKS: Final = ("hidden_size", "num_hidden_layers", "vocab_size", "tokenizer_fingerprint")


def identity_differences(want: Any, got: Any) -> list[str]:
    """What differs between two target identities (TargetIdentity or its JSON dict) that makes states or
    token ids of one meaningless for the other; ``weights`` only when both record theirs."""
    def get(obj: Any, name: str) -> Any:
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name)

    diffs = [f"{k} {get(want, k)} != {get(got, k)}" for k in IDENTITY_CHECKS if get(want, k) != get(got, k)]
    if get(want, "weights") and get(got, "weights") and get(want, "weights") != get(got, "weights"):
        diffs.append(f"weights {get(want, 'weights')} != {get(got, 'weights')}")
    return diffs


def check_target(cfg: TandemConfig, actual: TargetIdentity, *, drafter_path: str = "the drafter") -> None:
    """Refuse a target the drafter was not trained for: its P_j and token ids would be meaningless."""
    want = cfg.target
    diffs = identity_differences(want, actual)
    if diffs:
        raise TandemError(
            f"{drafter_path} was trained for target {want.name_or_path!r} but got {actual.name_or_path!r} "
            f"({'; '.join(diffs)}). Train or export a drafter for this target."
        )


def uniform_taps(num_drafter_layers: int, num_target_layers: int) -> tuple[int, ...]:
    """l(j) = round(j * L_L / L_S): layer 0 reads the target's embedding output."""
    return tuple(round(j * num_target_layers / num_drafter_layers) for j in range(num_drafter_layers))


def top_taps(num_drafter_layers: int, num_target_layers: int) -> tuple[int, ...]:
    """The deepest taps: the last drafter layer reads the target's final hidden state."""
    return tuple(num_target_layers - num_drafter_layers + 1 + j for j in range(num_drafter_layers))


def span_taps(num_drafter_layers: int, num_target_layers: int) -> tuple[int, ...]:
    """Evenly from the embedding output (layer 0 keeps token identities of context positions, which
    drafting by copying needs) to the final state (layer L_S-1 gets the target's prediction)."""
    if num_drafter_layers == 1:
        return (num_target_layers,)
    return tuple(round(j * num_target_layers / (num_drafter_layers - 1)) for j in range(num_drafter_layers))


TAP_MAPS = {"span": span_taps, "uniform": uniform_taps, "top": top_taps}


def parse_taps(spec: str, num_drafter_layers: int, num_target_layers: int) -> tuple[int, ...]:
    """``span``, ``uniform``, ``top`` or a comma list such as ``0,4,8``."""
    if spec in TAP_MAPS:
        return TAP_MAPS[spec](num_drafter_layers, num_target_layers)
    try:
        taps = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise TandemError(f"--taps {spec!r}: expected {', '.join(TAP_MAPS)} or a comma list of layer indices") from None
    if len(taps) != num_drafter_layers:
        raise TandemError(f"--taps {spec!r} names {len(taps)} layers; the drafter has {num_drafter_layers}")
    return taps
