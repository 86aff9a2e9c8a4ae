"""Training arguments: one frozen dataclass, validated once, shared by the CLI and the demo builder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from tandem_vllm.errors import TandemError

Kind = Literal["tandem", "baseline", "eagle3", "lm"]
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class ModelDims:
    """Dims of a model trained from scratch (Llama-style)."""

    layers: int = 1
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 0  # 0 = round(8/3 * hidden) up to a multiple of 32 (Llama's SwiGLU ratio)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise TandemError(f"--{name.replace('_', '-')}={getattr(self, name)}; it must be at least 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise TandemError(
                f"--hidden={self.hidden}, --heads={self.heads}, --kv-heads={self.kv_heads}: hidden must be a "
                "multiple of heads and heads a multiple of kv-heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def vllm_cpu_ok(self) -> bool:
        """vLLM's CPU attention kernels take only these head sizes (GPU backends take more)."""
        return self.head_dim in VLLM_CPU_HEAD_DIMS

    @property
    def ffn(self) -> int:
        return self.intermediate or -(-8 * self.hidden // 3 // 32) * 32


@dataclass(frozen=True)
class TrainArgs:
    """``tandem-vllm train``. ``kind``: tandem drafter, standalone baseline drafter, an EAGLE-3 head
    (one layer, ``dims.layers`` ignored; ``block_size`` draft steps unrolled in training), or a plain LM."""

    kind: Kind
    out: Path
    data: tuple[Path, ...]
    target: Path | None = None  # frozen target (teacher; Tandem reads its hidden states)
    tokenizer: Path | None = None  # for kind="lm" only: the tokenizer directory
    eval_data: tuple[Path, ...] = ()  # default: the last 5% of packed sequences
    dims: ModelDims = field(default_factory=ModelDims)
    taps: str = "span"  # 'span', 'uniform', 'top' or a comma list of target tap indices
    block_size: int = 2  # gamma_train (the paper's: 2); with block_min, the longest block
    block_min: int = 0  # > 0: every block's length is drawn from block_min..block_size (variable blocks)
    gen_data: tuple[Path, ...] = ()  # directories from `tandem-vllm gen-data` (the target's own continuations)
    gen_ratio: float = 0.5  # with gen_data: the fraction of every batch drawn from it
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    loss: Literal["ce", "distil"] = "distil"
    ce_fraction: float = 0.5  # distil: stage 1 (CE only) takes this fraction of the steps
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    device: str = "auto"
    bf16: Literal["auto", "on", "off"] = "auto"
    attn: Literal["auto", "sdpa", "flex"] = "auto"  # Tandem training attention; auto = flex on CUDA
    resume: bool | Literal["auto"] = False  # "auto": continue the run in out if it has a checkpoint, else start it
    progress: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun / Ray Train: replicate the student (DDP) or shard
    # the student and the frozen target across the processes (FSDP2)
    target_pass: Path | None = None  # train from a `target-pass` directory instead of running the target
    draft_vocab: int = 0  # > 0: the drafter's head covers the N most frequent training tokens (tandem, eagle3)
    share_target: bool = False  # the student's embedding and LM head are the target's, frozen (width = target's)
    init_layers: tuple[int, ...] = ()  # student layer j starts as target layer init_layers[j] (+ the final norm)

    def __post_init__(self) -> None:
        if self.kind in ("tandem", "baseline", "eagle3") and self.target is None:
            raise TandemError(f"--kind {self.kind} needs --target DIR (the frozen model to distil from)")
        if self.kind == "lm" and self.tokenizer is None and self.target is None:
            raise TandemError("--kind lm needs --tokenizer DIR")
        if self.block_size < 1:
            raise TandemError(f"--block-size={self.block_size}; gamma must be at least 1")
        if not 0 <= self.block_min <= self.block_size:
            raise TandemError(f"--block-size {self.block_min}-{self.block_size}: need 1 <= min <= max")
        if not 0 <= self.gen_ratio <= 1:
            raise TandemError(f"--gen-ratio={self.gen_ratio}; it must lie in [0, 1]")
        if self.gen_data and self.kind == "lm":
            raise TandemError("--gen-data trains drafters (--kind tandem or baseline), not --kind lm")
        if self.target_pass is not None and (self.kind == "lm" or self.gen_data or self.data):
            raise TandemError("--target-pass is a drafter's whole training data: drop --data and --gen-data (and it "
                              "trains drafters, not --kind lm)")
        if self.target_pass is None and not self.data:
            raise TandemError("pass --data FILES (or --target-pass DIR from `tandem-vllm target-pass`)")
        if self.draft_vocab < 0 or (self.draft_vocab and self.kind not in ("tandem", "eagle3")):
            raise TandemError(f"--draft-vocab {self.draft_vocab}: a draft vocabulary is for --kind tandem or eagle3 "
                              "(vLLM's draft_model method serves a standalone drafter with the whole vocabulary)")
        if self.init_layers and self.kind not in ("tandem", "baseline"):
            raise TandemError("--init-layers starts a Llama-shaped drafter (--kind tandem or baseline) from target layers")
        if self.init_layers and len(self.init_layers) != self.dims.layers:
            raise TandemError(f"--init-layers names {len(self.init_layers)} target layers for a {self.dims.layers}-layer drafter")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TandemError(f"--{name.replace('_', '-')}={getattr(self, name)}; it must be at least 1")
        if not self.lr > 0:
            raise TandemError(f"--lr={self.lr}; it must be positive")
        if not 0 <= self.ce_fraction <= 1:
            raise TandemError(f"--ce-fraction={self.ce_fraction}; it must lie in [0, 1]")

    # fields that must match when a run is resumed (the rest may change, e.g. eval cadence)
    RUN_IDENTITY = ("kind", "target", "dims", "taps", "block_size", "block_min", "gen_data", "gen_ratio", "seq_len",
                    "batch_size", "grad_accum", "seed", "target_pass", "draft_vocab", "share_target", "init_layers")
    # what a resumed run may change; train_summary.json records the values that ran
    SCHEDULE = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "loss", "ce_fraction")

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d["gen_data"] = [str(p) for p in self.gen_data]
        d["init_layers"] = list(self.init_layers)
        ident = {k: str(d[k]) if isinstance(d[k], Path) else d[k] for k in self.RUN_IDENTITY}
        # runs recorded before these options existed resume as if they had been recorded with the defaults
        return {k: v for k, v in ident.items() if k not in self.NEWER or v != self.NEWER[k]}

    NEWER: ClassVar[dict[str, Any]] = {"target_pass": None, "draft_vocab": 0, "share_target": False, "init_layers": []}

    @property
    def gen_rows(self) -> int:
        """Rows of each micro-batch drawn from the generated data."""
        return round(self.gen_ratio * self.batch_size) if self.gen_data else 0


def parse_blocks(spec: str) -> tuple[int, int]:
    """``--block-size``: ``"2"`` = fixed blocks of 2 -> (0, 2); ``"1-4"`` = lengths drawn from 1..4 -> (1, 4)."""
    try:
        lo, _, hi = spec.partition("-")
        return (int(lo), int(hi)) if hi else (0, int(lo))
    except ValueError:
        raise TandemError(f"--block-size {spec!r}: expected a length such as 2 or a range such as 1-4") from None
