"""Training arguments: one frozen dataclass, validated once, shared by the CLI and the demo builder."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from tandem_vllm.errors import TandemError

Kind = Literal["tandem", "baseline", "eagle3", "lm"]
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def doc(default: Any = MISSING, help: str = "", *, flag: bool = True) -> Any:
    """A field with its description: the ``tandem-vllm train`` flags are generated from these
    (cli_fields.add_dataclass_flags); ``flag=False`` keeps a field off the command line."""
    metadata = {"help": help, "flag": flag}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelDims:
    """Dims of a model trained from scratch (Llama-style)."""

    layers: int = doc(1, "drafter layers (an EAGLE-3 head has one)")
    hidden: int = doc(128, "hidden size (with --share-target: the target's)")
    heads: int = doc(4, "attention heads")
    kv_heads: int = doc(4, "key/value heads (on the command line: --heads unless given)")
    intermediate: int = doc(0, "MLP width; 0 = 8/3 * hidden rounded up to a multiple of 32 (Llama's SwiGLU ratio)")

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

    out: Path = doc(help="run directory; the exported model lands here")
    kind: Kind = doc("tandem", "tandem: a Tandem drafter; baseline: a standalone drafter; eagle3: an EAGLE-3 head (one "
                     "layer for vLLM's eagle3 method, block_size draft steps unrolled in training); lm: a plain LM")
    data: tuple[Path, ...] = doc((), "text or JSONL files (or --target-pass)")
    target: Path | None = doc(None, "frozen target model directory (the teacher; Tandem reads its hidden states)")
    tokenizer: Path | None = doc(None, "tokenizer directory (--kind lm without --target)")
    eval_data: tuple[Path, ...] = doc((), "held-out files (default: the last 5% of the packed sequences)")
    dims: ModelDims = doc(ModelDims(), "the drafter's shape (flags --layers, --hidden, --heads, --kv-heads, --intermediate)")
    taps: str = doc("span", "tap map l(j): 'span' (embedding..final), 'uniform', 'top' or target tap indices such as '0,8'")
    block_size: int = doc(2, "training blocks: a length (2 = the paper's gamma_train) or a range such as 1-4, each "
                             "block's length drawn from it (cover the k you serve)")
    block_min: int = doc(0, "> 0: every block's length is drawn from block_min..block_size (the range's low end)",
                         flag=False)
    gen_data: tuple[Path, ...] = doc((), "directories from `tandem-vllm gen-data` (the target's own text)")
    gen_ratio: float = doc(0.5, "with --gen-data: the fraction of every batch drawn from it")
    seq_len: int = doc(256, "tokens per training row")
    batch_size: int = doc(8, "rows per micro-batch (global, at any number of processes)")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    steps: int = doc(1000, "optimizer steps")
    lr: float = doc(3e-3, "peak learning rate (linear warm-up, cosine decay)")
    warmup: int = doc(50, "warm-up steps")
    min_lr_ratio: float = doc(0.1, "the cosine decay's floor, as a fraction of --lr")
    weight_decay: float = doc(0.01, "AdamW weight decay")
    loss: Literal["ce", "distil"] = doc("distil", "ce: the next token; distil: the target's distribution")
    ce_fraction: float = doc(0.5, "distil: the fraction of steps in the CE-only stage 1")
    eval_every: int = doc(100, "steps between held-out evaluations")
    eval_batches: int = doc(4, "held-out batches per evaluation")
    save_every: int = doc(100, "steps between checkpoints")
    seed: int = doc(0, "data order and initialisation")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N")
    bf16: Literal["auto", "on", "off"] = doc("auto", "bfloat16 autocast (auto: on CUDA)")
    attn: Literal["auto", "sdpa", "flex"] = doc("auto", "Tandem training attention (auto: flex on CUDA)")
    resume: bool | Literal["auto"] = doc(False, "continue the run in --out from its last checkpoint, at any number of "
                                                "processes ('--resume auto': continue if there is one, else start; for "
                                                "jobs that are retried)")
    progress: bool = doc(True, "a progress bar", flag=False)
    parallel: Literal["ddp", "fsdp"] = doc("ddp", "under torchrun or --ray: a copy of the drafter per process (ddp) or "
                                                  "the drafter and the frozen target sharded across them (fsdp, FSDP2); "
                                                  "--batch-size is the global micro-batch either way")
    target_pass: Path | None = doc(None, "a `tandem-vllm target-pass` directory: the whole training data, with the "
                                         "target's states and top-k read from disk (the target does not run)")
    draft_vocab: int = doc(0, "tandem/eagle3: the head covers the N most frequent training tokens (needs "
                              "--target-pass); 0 = the whole vocabulary")
    share_target: bool = doc(False, "the drafter's embedding and LM head are the target's, frozen and not stored "
                                    "(--hidden must equal the target's)")
    init_layers: tuple[int, ...] = doc((), "tandem/baseline: drafter layer j starts as target layer L_j (and the final "
                                           "norm as the target's); needs the target's layer shape")

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


def parse_blocks(spec: str, flag: str = "--block-size", example: tuple[int, int] = (1, 4)) -> tuple[int, int]:
    """``--block-size``: ``"2"`` = fixed blocks of 2 -> (0, 2); ``"1-4"`` = lengths drawn from 1..4 -> (1, 4).
    Other length ranges (``flag``, with an ``example`` for the error) read the same way."""
    try:
        lo, _, hi = spec.partition("-")
        return (int(lo), int(hi)) if hi else (0, int(lo))
    except ValueError:
        least, most = example
        raise TandemError(f"{flag} {spec!r}: expected a length such as {most} or a range such as {least}-{most}") from None
