"""The training loop: one loop for the Tandem drafter, the standalone baseline, an EAGLE-3 head and
plain LMs.

The target is frozen. Tandem and baseline see the same data order, schedule, initial weights
(the Tandem drafter starts from the baseline's init plus fresh P_j) and losses, so their gap is
the effect of attending to the target's representations (the paper's Tandem vs Gecko-Distil). The
EAGLE-3 head (the drafter vLLM users pick today) gets the same data, schedule and losses, averaged
over its unrolled draft steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from tandem_vllm.config import TandemConfig, parse_taps
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.eagle3 import Eagle3Head
from tandem_vllm.modeling.reference import AttnBackend, TandemDrafter, random_block_starts
from tandem_vllm.modeling.target import LoadedLM, hidden_taps, load_causal_lm, num_layers, resolve_device
from tandem_vllm.progress import progress_bar
from tandem_vllm.train import distributed
from tandem_vllm.train.args import VLLM_CPU_HEAD_DIMS, TrainArgs
from tandem_vllm.train.data import batch_indices, pack, pack_generated, read_texts
from tandem_vllm.train.loss import ce_loss, distil_loss, tv_distance

CKPT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    metrics: dict[str, float]  # final held-out evaluation
    rank: int = 0  # this process's rank in a distributed run


FLEX_MIN_HEAD_DIM = 16  # compiled flex attention (torch 2.11, Inductor) refuses smaller heads: "NYI: embedding
# dimension of the query, key, and value must be at least 16"


def attention_backend(attn: str, device: torch.device, head_dim: int) -> AttnBackend:
    """The Tandem drafter's training attention: flex (a fused kernel skipping masked tiles) on CUDA
    where its kernel takes the head size, else SDPA with a dense mask (same result, more memory)."""
    if attn == "flex" and head_dim < FLEX_MIN_HEAD_DIM:
        raise TandemError(f"--attn flex: the drafter's head size is {head_dim} and compiled flex attention needs "
                          f"at least {FLEX_MIN_HEAD_DIM} (fewer --heads or a larger --hidden); or use --attn sdpa")
    if attn == "flex" or (attn == "auto" and device.type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM):
        return "flex"
    return "sdpa"


def _use_bf16(args: TrainArgs, device: torch.device) -> bool:
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if args.bf16 == "on" and not supported:
        raise TandemError("--bf16 on needs a CUDA device with bf16 support; use --bf16 auto")
    return args.bf16 == "on" or (args.bf16 == "auto" and supported)


def _llama(vocab: int, args: TrainArgs, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = args.dims
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d.hidden,
        intermediate_size=d.ffn,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def build_student(args: TrainArgs, teacher: LoadedLM | None, tok: Any) -> torch.nn.Module:
    vocab = teacher.identity.vocab_size if teacher else len(tok)
    torch.manual_seed(args.seed)
    if args.kind == "eagle3":
        assert teacher is not None
        return _eagle3(args, teacher)
    base = _llama(vocab, args, tok)
    if args.kind != "tandem":
        return base
    assert teacher is not None
    # the baseline's Llama config is the one source of the drafter dims (and its norm eps / RoPE base)
    llama = base.config.to_dict()
    dims = {k: llama[k] for k in TandemConfig.model_fields if llama.get(k) is not None and k not in ("tap_layers", "block_size", "target")}
    rope = (llama.get("rope_parameters") or {}).get("rope_theta", llama.get("rope_theta"))
    cfg = TandemConfig(
        **dims,
        **({"rope_theta": rope} if rope else {}),
        tap_layers=parse_taps(args.taps, args.dims.layers, num_layers(teacher.model)),
        block_size=args.block_size,
        target=teacher.identity,
    )
    drafter = TandemDrafter(cfg)
    drafter.load_state_dict(base.state_dict(), strict=False)  # the baseline's exact init
    layers: list[Any] = list(drafter.model.layers)
    for layer in layers:
        torch.nn.init.normal_(layer.ctx_proj.weight, std=0.02)
    return drafter


def _eagle3(args: TrainArgs, teacher: LoadedLM) -> Eagle3Head:
    from tandem_vllm.modeling.eagle3 import Eagle3Config, default_taps, init_like_llama

    n_layers = num_layers(teacher.model)
    taps = default_taps(n_layers) if args.taps in ("span", "uniform", "top") else parse_taps(args.taps, 3, n_layers)
    d = args.dims
    cfg = Eagle3Config(vocab_size=teacher.identity.vocab_size, hidden_size=d.hidden, intermediate_size=d.ffn,
                       num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                       target_hidden_size=teacher.identity.hidden_size, tap_layers=taps, target=teacher.identity,
                       max_position_embeddings=max(2048, args.seq_len), ttt_steps=args.block_size)
    head = Eagle3Head(cfg)
    init_like_llama(head)
    return head


Weigh = Callable[[Tensor, Tensor], Tensor]  # (a masked-mean loss, its mask) -> its share of the global batch's


class Objective(torch.nn.Module):
    """The student's forward beside the frozen target's, as one module: what DDP and FSDP2 wrap.

    The target is held outside the module tree (DDP would broadcast it, FSDP2 shards it on its own),
    and the time spent in its forward is summed in ``target_s`` for the throughput report."""

    def __init__(self, args: TrainArgs, student: torch.nn.Module, teacher: LoadedLM | None):
        super().__init__()
        self.args, self.student = args, student
        self._teacher = (teacher,)
        self.target_s = 0.0

    @property
    def teacher(self) -> LoadedLM | None:
        return self._teacher[0]

    def forward(self, inp: Tensor, starts: Tensor | None = None, eagle3_steps: int = 1) -> tuple[Any, Tensor | None]:
        """Student logits (B, T, V) -- a list of one per unrolled draft step for an EAGLE-3 head with
        ``eagle3_steps`` > 1 -- and the target's logits (B, T, V) when there is a target. ``starts``
        (B, T): each position's block start for a Tandem student (default: fixed blocks)."""
        args, student, teacher = self.args, cast(Any, self.student), self.teacher
        if teacher is None:
            return student(input_ids=inp).logits, None
        t0 = time.perf_counter()
        with torch.no_grad():
            t_out = teacher.model(input_ids=inp, output_hidden_states=args.kind in ("tandem", "eagle3"))
        if inp.is_cuda:
            torch.cuda.synchronize(inp.device)
        self.target_s += time.perf_counter() - t0
        if args.kind == "tandem":
            taps = hidden_taps(t_out.hidden_states, student.cfg.tap_layers)
            return student.forward_train(inp, taps, args.block_size, block_starts=starts), t_out.logits
        if args.kind == "eagle3":
            steps = student.forward_train(inp, hidden_taps(t_out.hidden_states, student.cfg.tap_layers), steps=eagle3_steps)
            if eagle3_steps > 1:
                return steps, t_out.logits
            # draft step 0, aligned: entry i-1 predicts token i+1 like position i
            return torch.cat([t_out.logits[:, :1], steps[0][:, :-1]], dim=1), t_out.logits
        return student(input_ids=inp).logits, t_out.logits


def _loss(args: TrainArgs, model: torch.nn.Module, inp: Tensor, lab: Tensor, mask: Tensor, starts: Tensor | None,
          distil: bool, weigh: Weigh) -> Tensor:
    """One micro-batch's loss. An EAGLE-3 head's is the mean over its unrolled draft steps s: step s
    at entry i predicts token i + s + 2, i.e. label i + s + 1, against the target's logits there."""
    if args.kind == "eagle3":
        steps, t_logits = model(inp, eagle3_steps=args.block_size)
        assert t_logits is not None
        t = inp.shape[1]
        losses = []
        for s, logits in enumerate(steps):
            sh = s + 1
            lg, y, m, tl = logits[:, : t - sh], lab[:, sh:], mask[:, sh:], t_logits[:, sh:]
            losses.append(weigh(distil_loss(lg, tl, y, m) if distil else ce_loss(lg, y, m), m))
        return torch.stack(losses).mean()
    logits, t_logits = model(inp, starts)
    loss = distil_loss(logits, t_logits, lab, mask) if distil and t_logits is not None else ce_loss(logits, lab, mask)
    return weigh(loss, mask)


def _block_starts(args: TrainArgs, batch: int, seq_len: int, step: int, micro: int, device: torch.device) -> Tensor | None:
    """Variable blocks (``block_min`` > 0): a pure function of (seed, step, micro), so resumes are exact."""
    if not args.block_min or args.kind != "tandem":
        return None
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 64 + micro)
    return random_block_starts(batch, seq_len, args.block_min, args.block_size, gen).to(device)


@torch.no_grad()
def evaluate(args: TrainArgs, model: Objective, rows: Tensor, device: torch.device, masks: Tensor | None = None) -> dict[str, float]:
    """Held-out next-token accuracy and CE; with a teacher also agreement with its argmax and TV.
    ``masks`` (N, T): score only these labels (generated data: the completions). Every rank scores
    the same rows (FSDP2 needs them all in each forward)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0.0
    for i in range(0, min(len(rows), args.eval_batches * args.batch_size), args.batch_size):
        batch = rows[i : i + args.batch_size].to(device)
        inp, lab = batch[:, :-1], batch[:, 1:]
        logits, t_logits = model(inp)
        mask = torch.ones_like(lab) if masks is None else masks[i : i + args.batch_size].to(device)
        if args.kind == "eagle3":  # position 0 has no earlier verified state to draft from
            mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)
        m = mask.float()
        pred = logits.argmax(-1)
        parts = {"ce": ce_loss(logits, lab, mask).item(), "accuracy": ((pred == lab).float() * m).sum().item() / m.sum().item()}
        if t_logits is not None:
            parts["agreement"] = ((pred == t_logits.argmax(-1)).float() * m).sum().item() / m.sum().item()
            parts["tv"] = (tv_distance(logits, t_logits) * m).sum().item() / m.sum().item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * m.sum().item()
        n += m.sum().item()
    model.train()
    return {k: v / max(n, 1) for k, v in sums.items()}


def _generated_rows(args: TrainArgs, teacher: LoadedLM | None, tok: Any) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(train rows, train masks, held-out rows, held-out masks) of the generated data: the last 5%
    of sequences (at least one) are held out."""
    if not args.gen_data:
        return None
    from tandem_vllm.train.gen_data import read_generated

    assert teacher is not None
    samples = read_generated(args.gen_data, teacher.identity)
    if len(samples) < 2:
        raise TandemError(f"--gen-data holds {len(samples)} sequence(s); need 2+ to hold one out")
    rows, masks = pack_generated(samples, args.seq_len, tok.eos_token_id or 0)
    order = torch.from_numpy(np.random.default_rng([args.seed, 2]).permutation(len(rows)))
    rows, masks = rows[order], masks[order]  # prompts x temperatures interleave: hold out a mix
    n_eval = max(1, len(rows) // 20)
    return rows[:-n_eval], masks[:-n_eval], rows[-n_eval:], masks[-n_eval:]


def _schedule(args: TrainArgs) -> Any:
    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return factor


def train(args: TrainArgs, *, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training and export the model to ``args.out``: one process, one rank of a
    ``torchrun`` job, or one Ray Train worker (distributed.py).

    ``stop_after`` ends the run after that many optimizer steps without exporting, as if it had
    been killed right after a checkpoint; tests use it to check ``resume``.
    """
    world = distributed.join(args.device)
    try:
        return _train(args, world, stop_after)
    except TandemError:
        raise
    except Exception as e:
        if world.distributed:  # name the rank: torchrun's summary shows only the first failure
            print(f"rank {world.rank}: training failed ({type(e).__name__}: {e}); the last checkpoint in "
                  f"{args.out / CKPT_DIR} resumes it with --resume, on any number of processes", flush=True)
        raise
    finally:
        distributed.leave(world)


def _train(args: TrainArgs, world: distributed.World, stop_after: int | None) -> TrainResult:
    if not args.dims.vllm_cpu_ok and args.progress and world.main:
        print(f"warning: head_dim {args.dims.head_dim} (--hidden/--heads) is not served by vLLM's CPU attention "
              f"(it takes {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}); GPU backends may still serve it", flush=True)
    if args.batch_size < world.size:
        raise TandemError(f"--batch-size {args.batch_size} is the global micro-batch, shared by {world.size} "
                          f"processes: give every process at least one row (--batch-size >= {world.size})")
    docs = read_texts(args.data)  # bad data fails fast, before any model is loaded
    eval_docs = read_texts(args.eval_data) if args.eval_data else None
    device = resolve_device(distributed.device_for(world, args.device))
    bf16 = _use_bf16(args, device)
    teacher = None
    if args.target is not None and args.kind != "lm":
        try:
            teacher = load_causal_lm(args.target, device=str(device), dtype=torch.bfloat16 if bf16 else torch.float32)
        except torch.OutOfMemoryError:
            raise TandemError(f"the target {args.target} does not fit on {device} beside the drafter; use --parallel "
                              "fsdp under torchrun to shard it across the processes' GPUs") from None
        teacher.model.requires_grad_(False)
        tok = teacher.tokenizer
    else:
        tok = _load_tokenizer(args.tokenizer or args.target)
    rows = pack(docs, tok, args.seq_len)
    if eval_docs:
        eval_rows = pack(eval_docs, tok, args.seq_len)
    else:
        n_eval = max(1, len(rows) // 20)
        if len(rows) - n_eval < 1:
            raise TandemError(f"data packs into {len(rows)} sequence(s); need 2+ to hold one out (or pass --eval-data)")
        rows, eval_rows = rows[:-n_eval], rows[-n_eval:]

    generated = _generated_rows(args, teacher, tok)
    student = build_student(args, teacher, tok).to(device)
    if args.attn == "flex" and device.type != "cuda":
        raise TandemError("--attn flex trains on CUDA only (flex attention has no CPU backward); use --attn sdpa")
    if isinstance(student, TandemDrafter):
        student.attn_backend = attention_backend(args.attn, device, student.cfg.head_dim)
    student.train()
    core = Objective(args, student, teacher)
    shard = _layers(student) + (_layers(teacher.model) + [teacher.model] if teacher is not None else [])
    # a Tandem layer's context K/V are computed by its own method, before its forward
    model = distributed.wrap(core, world, args.parallel, device, shard, methods=("context_kv",))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(args))
    ckpts = args.out / CKPT_DIR
    start = _prepare_run_dir(args, world, ckpts, core, opt, sched)

    log = (args.out / "train_log.jsonl").open("a") if world.main else None
    bar = progress_bar(total=args.steps, initial=start, desc=f"train {args.kind}", disable=not (args.progress and world.main),
                       unit="step")
    def weigh(loss: Tensor, mask: Tensor) -> Tensor:
        return distributed.weigh(world, loss, mask, device)

    clock = _Clock(device)
    metrics: dict[str, float] = {}
    n_gen = args.gen_rows
    for step in range(start, args.steps):
        distil = teacher is not None and args.loss == "distil" and step >= args.ce_fraction * args.steps
        total = 0.0
        clock.start(core)
        for micro in range(args.grad_accum):
            idx = batch_indices(len(rows), args.batch_size - n_gen, step, micro, args.grad_accum, args.seed)
            batch, mask = rows[torch.from_numpy(idx)], torch.ones(len(idx), args.seq_len, dtype=torch.long)
            if generated is not None and n_gen:
                g_idx = torch.from_numpy(batch_indices(len(generated[0]), n_gen, step, micro, args.grad_accum, args.seed + 1))
                batch, mask = torch.cat([batch, generated[0][g_idx]]), torch.cat([mask, generated[1][g_idx]])
            starts = _block_starts(args, len(batch), args.seq_len, step, micro, device)
            mine = world.share(len(batch))  # the global micro-batch is the same on every rank; keep this rank's rows
            batch, mask = batch[mine].to(device), mask[mine].to(device)
            starts = starts[mine] if starts is not None else None
            inp, lab = batch[:, :-1], batch[:, 1:]
            with distributed.sync_gradients(model, world, args.parallel, micro == args.grad_accum - 1), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _loss(args, model, inp, lab, mask, starts, distil, weigh)
                (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        total = distributed.all_sum(world, total, device) / world.size  # each rank's share of the global mean
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.stop(core, args.batch_size * args.grad_accum * args.seq_len)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{clock.tokens_per_s:.0f}", stage="distil" if distil else "ce", refresh=False)
        done = step + 1
        record: dict[str, Any] = {"step": done, "loss": total, "lr": sched.get_last_lr()[0], **clock.last}
        if done % args.eval_every == 0 or done == args.steps:
            metrics = _evaluate_all(args, core, eval_rows, generated, device)
            record["eval"] = metrics
            bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if done % args.save_every == 0 or done == args.steps:
            _save_checkpoint(world, ckpts, done, core, opt, sched)
        if stop_after is not None and done >= stop_after:
            bar.close()
            if log is not None:
                log.close()
            return TrainResult(out=args.out, steps=done, metrics=metrics, rank=world.rank)
    bar.close()
    if log is not None:
        log.close()
    if not metrics:
        metrics = _evaluate_all(args, core, eval_rows, generated, device)
    throughput = clock.summary(world, args)
    if args.parallel == "fsdp" and world.distributed:
        full, _ = distributed.full_state(core)  # every rank gathers; rank 0 exports an unsharded copy
        if world.main:
            student = build_student(args, teacher, tok)
            student.load_state_dict(_strip(full, "student."))
    if world.main:
        _export(args, student.float(), tok, metrics, throughput)
    distributed.barrier(world)
    return TrainResult(out=args.out, steps=args.steps, metrics=metrics, rank=world.rank)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a student or target (FSDP2's units): the children of its outermost
    ModuleLists (a block's own lists stay inside the block's unit)."""
    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():  # pre-order: a list is met before anything it holds
        if id(m) in inside or not isinstance(m, torch.nn.ModuleList):
            continue
        for block in m:
            if any(True for _ in block.parameters()):
                units.append(block)
            inside.update(id(x) for x in block.modules())
    return units


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


class _Clock:
    """Training throughput: tokens/s of the whole job and the share of each step's time spent in the
    frozen target's forward vs the student's forward and backward (plus the optimizer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tokens = 0
        self.seconds = self.target_s = 0.0
        self.last: dict[str, float] = {}

    def start(self, core: Objective) -> None:
        core.target_s = 0.0
        self.t0 = time.perf_counter()

    def stop(self, core: Objective, tokens: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        self.tokens += tokens
        self.seconds += dt
        self.target_s += core.target_s
        self.last = {"step_s": round(dt, 4), "target_s": round(core.target_s, 4)}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self, world: distributed.World, args: TrainArgs) -> dict[str, Any]:
        target = self.target_s / self.seconds if self.seconds else 0.0
        return {"tokens_per_s": round(self.tokens_per_s, 1), "target_forward_share": round(target, 3),
                "student_share": round(1 - target, 3), "world_size": world.size,
                "parallel": args.parallel if world.distributed else "none", "device": str(self.device),
                "steps_timed": round(self.seconds, 2)}


def _evaluate_all(args: TrainArgs, model: Objective, eval_rows: Tensor, generated: Any, device: torch.device) -> dict[str, float]:
    """Held-out metrics on natural text, and (prefixed ``gen_``) on held-out generated sequences."""
    metrics = evaluate(args, model, eval_rows, device)
    if generated is not None:
        metrics |= {f"gen_{k}": v for k, v in evaluate(args, model, generated[2], device, generated[3]).items()}
    return metrics


def _load_tokenizer(path: Path | None) -> Any:
    from transformers import AutoTokenizer

    if path is None or not Path(path).is_dir():
        raise TandemError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TandemError(f"cannot load a tokenizer from {path}: {' '.join(str(e).split())[:200]}") from None


# ---- checkpoints: written atomically by rank 0, full (unsharded), resumed exactly at any world size ----
CHECKPOINT_FORMAT = 2  # 2: optimizer state keyed by parameter name (1: by position, single process)


def _prepare_run_dir(args: TrainArgs, world: distributed.World, ckpts: Path, core: Objective, opt: Any, sched: Any) -> int:
    latest = ckpts / "latest"
    if args.resume == "auto" and not latest.exists():
        args = replace(args, resume=False)
    if not args.resume:
        if latest.exists():
            raise TandemError(f"{args.out} already holds a training run; pass --resume to continue it or pick another --out")
        distributed.barrier(world)  # every rank has looked before rank 0 writes the new run
        if world.main:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "run.json").write_text(json.dumps(args.identity(), indent=2))
            (args.out / "train_log.jsonl").unlink(missing_ok=True)
        distributed.barrier(world)
        return 0
    if not latest.exists():
        raise TandemError(f"--resume: {args.out} has no checkpoint to resume; drop --resume to start a run")
    saved = json.loads((args.out / "run.json").read_text())
    diffs = [k for k, v in args.identity().items() if saved.get(k) != v]
    if diffs:
        raise TandemError(f"--resume: {', '.join(diffs)} differ from the run in {args.out}; resume with the same settings")
    from safetensors.torch import load_file

    ck = ckpts / latest.read_text().strip()
    state = torch.load(ck / "trainer.pt", weights_only=False)
    if state.get("format", 1) >= 2:
        weights = load_file(str(ck / "student.safetensors"))
        distributed.load_full_state(core, opt, {f"student.{k}": v for k, v in weights.items()}, state["optimizer"])
    else:  # a single-process checkpoint of format 1
        from safetensors.torch import load_model

        load_model(core.student, str(ck / "student.safetensors"))
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_checkpoint(world: distributed.World, ckpts: Path, step: int, core: Objective, opt: Any, sched: Any) -> None:
    """Write to a temp dir, rename it into place, then flip ``latest``: a kill at any point leaves
    the previous checkpoint intact and pointed to. Every rank gathers (FSDP2); rank 0 writes."""
    from safetensors.torch import save_file

    model, optim = distributed.full_state(core, opt)
    if world.main:
        ckpts.mkdir(parents=True, exist_ok=True)
        tmp = ckpts / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        seen: set[int] = set()
        weights = {}
        for k, v in _strip(model, "student.").items():  # every name, tied weights as copies (safetensors shares none)
            weights[k] = v.clone() if v.data_ptr() in seen else v.contiguous()
            seen.add(v.data_ptr())
        save_file(weights, str(tmp / "student.safetensors"))
        torch.save({"format": CHECKPOINT_FORMAT, "optimizer": optim, "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(), "step": step, "world_size": world.size}, tmp / "trainer.pt")
        final = ckpts / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(ckpts / "latest", final.name)
        for old in sorted(ckpts.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(world)


def _export(args: TrainArgs, student: Any, tok: Any, metrics: dict[str, float], throughput: dict[str, Any]) -> None:
    if args.kind in ("tandem", "eagle3"):
        student.save(args.out)
    else:
        student.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    summary = {"kind": args.kind, "steps": args.steps, "schedule": {k: getattr(args, k) for k in args.SCHEDULE},
               "eval": metrics, "throughput": throughput}
    _atomic_write(args.out / "train_summary.json", json.dumps(summary, indent=2))
