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

from tandem_vllm.config import TANDEM_KEYS, TandemConfig, parse_taps
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.eagle3 import Eagle3Head
from tandem_vllm.modeling.reference import AttnBackend, TandemDrafter, random_block_starts
from tandem_vllm.modeling.target import LoadedLM, hidden_taps, load_causal_lm, num_layers, resolve_device
from tandem_vllm.progress import progress_bar
from tandem_vllm.train import distributed
from tandem_vllm.train.args import VLLM_CPU_HEAD_DIMS, TrainArgs
from tandem_vllm.train.data import batch_indices, pack, pack_generated, read_texts
from tandem_vllm.train.loss import TopK, distil_loss, head_ce, head_distil, head_tv, teacher_argmax

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


def build_student(args: TrainArgs, teacher: LoadedLM | None, tok: Any, draft_ids: Tensor | None = None) -> torch.nn.Module:
    """The student at its initial weights. ``draft_ids`` (N,): the target tokens a draft vocabulary keeps."""
    vocab = teacher.identity.vocab_size if teacher else len(tok)
    torch.manual_seed(args.seed)
    if args.kind == "eagle3":
        assert teacher is not None
        return _eagle3(args, teacher, draft_ids)
    base = _llama(vocab, args, tok)
    if teacher is not None and (args.share_target or args.init_layers):
        _start_from_target(base, teacher, args)
    if args.kind != "tandem":
        return base
    assert teacher is not None
    # the baseline's Llama config is the one source of the drafter dims (and its norm eps / RoPE base)
    llama = base.config.to_dict()
    dims = {k: llama[k] for k in TandemConfig.model_fields if llama.get(k) is not None and k not in TANDEM_KEYS}
    rope = (llama.get("rope_parameters") or {}).get("rope_theta", llama.get("rope_theta"))
    cfg = TandemConfig(
        **dims,
        **({"rope_theta": rope} if rope else {}),
        tap_layers=parse_taps(args.taps, args.dims.layers, num_layers(teacher.model)),
        block_size=args.block_size,
        target=teacher.identity,
        draft_vocab_size=None if draft_ids is None else len(draft_ids),
        shared_target_weights=args.share_target,
    )
    drafter = TandemDrafter(cfg)
    state = base.state_dict()
    if draft_ids is not None:  # the head keeps the baseline's rows of the tokens it can propose
        state["lm_head.weight"] = state["lm_head.weight"][draft_ids]
        drafter.get_buffer("draft_token_ids").copy_(draft_ids)
    drafter.load_state_dict({k: v for k, v in state.items() if k not in drafter.shared_keys()}, strict=False)  # the baseline's init
    drafter.bind_target(teacher.model)
    layers: list[Any] = list(drafter.model.layers)
    for layer in layers:
        if cfg.hidden_size == cfg.target.hidden_size and args.init_layers:
            torch.nn.init.eye_(layer.ctx_proj.weight)  # P_j = I: context K/V start as a target layer's own
        else:
            torch.nn.init.normal_(layer.ctx_proj.weight, std=0.02)
    return drafter


def _start_from_target(base: Any, teacher: LoadedLM, args: TrainArgs) -> None:
    """The standalone drafter's (and so the Tandem drafter's) initial weights taken from the target:
    layer j = target layer ``init_layers[j]`` and the final norm; with ``share_target`` the embedding and
    LM head are the target's and stay frozen (a Tandem drafter does not store them)."""
    target = teacher.model
    if base.config.hidden_size != teacher.identity.hidden_size:
        raise TandemError(f"--share-target / --init-layers need the drafter's width (--hidden {base.config.hidden_size}) "
                          f"to equal the target's ({teacher.identity.hidden_size})")
    t_state = target.state_dict()
    copied: dict[str, Tensor] = {}
    for j, i in enumerate(args.init_layers):
        if not 0 <= i < num_layers(target):
            raise TandemError(f"--init-layers {i}: the target has layers 0..{num_layers(target) - 1}")
        prefix = f"model.layers.{i}."
        copied |= {f"model.layers.{j}.{k[len(prefix):]}": v for k, v in t_state.items() if k.startswith(prefix)}
    if args.init_layers:
        copied["model.norm.weight"] = t_state["model.norm.weight"]
    try:
        base.load_state_dict(copied, strict=False)
    except RuntimeError as e:
        raise TandemError(f"--init-layers: the drafter's layer shape differs from the target's ({str(e)[:160]}); use the "
                          "target's --heads / --kv-heads / --intermediate") from None
    if args.share_target:
        base.model.embed_tokens.weight = torch.nn.Parameter(target.get_input_embeddings().weight.detach().clone(),
                                                            requires_grad=False)
        base.tie_weights()
        if base.lm_head.weight is not base.model.embed_tokens.weight:
            base.lm_head.weight = torch.nn.Parameter(target.get_output_embeddings().weight.detach().clone(),
                                                     requires_grad=False)


def _eagle3(args: TrainArgs, teacher: LoadedLM, draft_ids: Tensor | None) -> Eagle3Head:
    from tandem_vllm.modeling.eagle3 import Eagle3Config, default_taps, init_like_llama

    n_layers = num_layers(teacher.model)
    taps = default_taps(n_layers) if args.taps in ("span", "uniform", "top") else parse_taps(args.taps, 3, n_layers)
    d = args.dims
    cfg = Eagle3Config(vocab_size=teacher.identity.vocab_size, hidden_size=d.hidden, intermediate_size=d.ffn,
                       num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                       target_hidden_size=teacher.identity.hidden_size, tap_layers=taps, target=teacher.identity,
                       max_position_embeddings=max(2048, args.seq_len), ttt_steps=args.block_size,
                       draft_vocab_size=None if draft_ids is None else len(draft_ids), shared_embedding=args.share_target)
    head = Eagle3Head(cfg)
    init_like_llama(head)
    if draft_ids is not None:
        head.get_buffer("draft_token_ids").copy_(draft_ids)
    if args.share_target:
        head.bind_target(teacher.model, init_head=True)
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

    def forward(self, inp: Tensor, starts: Tensor | None = None, eagle3_steps: int = 1,
                taps: Tensor | None = None) -> tuple[Any, Tensor | None]:
        """Student head logits (B, T, N) -- a list of one per unrolled draft step for an EAGLE-3 head
        with ``eagle3_steps`` > 1 -- and the target's logits (B, T, V) when the target runs here.
        ``starts`` (B, T): each position's block start for a Tandem student (default: fixed blocks).
        ``taps`` (B, T, Ls, Dt): the student's target states from a target pass (the target does not run)."""
        args, student, teacher = self.args, cast(Any, self.student), self.teacher
        t_logits = None
        if teacher is None or (taps is None and args.kind == "baseline" and args.target_pass is not None):
            return student(input_ids=inp).logits, None
        if taps is None and args.target_pass is None:
            t0 = time.perf_counter()
            with torch.no_grad():
                t_out = teacher.model(input_ids=inp, output_hidden_states=args.kind in ("tandem", "eagle3"))
            if inp.is_cuda:
                torch.cuda.synchronize(inp.device)
            self.target_s += time.perf_counter() - t0
            t_logits = t_out.logits
            if args.kind in ("tandem", "eagle3"):
                taps = hidden_taps(t_out.hidden_states, student.cfg.tap_layers)
        if args.kind == "tandem":
            return student.forward_train(inp, taps, args.block_size, block_starts=starts), t_logits
        if args.kind == "eagle3":
            steps = student.forward_train(inp, taps, steps=eagle3_steps)
            if eagle3_steps > 1:
                return steps, t_logits
            # draft step 0, aligned: entry i-1 predicts token i+1 like position i (entry 0 has none: zeros)
            return torch.cat([torch.zeros_like(steps[0][:, :1]), steps[0][:, :-1]], dim=1), t_logits
        return student(input_ids=inp).logits, t_logits


@dataclass(frozen=True)
class Batch:
    """One micro-batch on this rank. ``taps`` / ``topk`` come from a target pass (else the target runs)."""

    inp: Tensor  # (B, T)
    lab: Tensor  # (B, T)
    mask: Tensor  # (B, T) 1 = a label the loss scores
    starts: Tensor | None = None  # (B, T) Tandem block starts
    taps: Tensor | None = None  # (B, T, Ls, Dt)
    topk: TopK | None = None


@dataclass(frozen=True)
class Head:
    """How the student's head rows map to target tokens (identity without a draft vocabulary)."""

    t2d: Tensor | None = None  # (V,) target id -> head row, -1 = none
    d2t: Tensor | None = None  # (N,) head row -> target id

    @classmethod
    def of(cls, student: Any) -> Head:
        if getattr(getattr(student, "cfg", None), "draft_vocab_size", None) is None:
            return cls()
        d2t = student.draft_ids()
        t2d = torch.full((student.cfg.vocab_size,), -1, dtype=torch.long, device=d2t.device)
        return cls(t2d=t2d.index_copy(0, d2t, torch.arange(len(d2t), device=d2t.device)), d2t=d2t)

    def to_target(self, rows: Tensor) -> Tensor:
        return rows if self.d2t is None else self.d2t[rows]


def _objective(logits: Tensor, teacher: Any, lab: Tensor, mask: Tensor, distil: bool, head: Head) -> Tensor:
    if distil and teacher is not None:
        if isinstance(teacher, Tensor) and head.t2d is None:
            return distil_loss(logits, teacher, lab, mask)
        return head_distil(logits, teacher, lab, mask, head.t2d, head.d2t)
    return head_ce(logits, lab, mask, head.t2d)


def _loss(args: TrainArgs, model: torch.nn.Module, b: Batch, distil: bool, weigh: Weigh, head: Head) -> Tensor:
    """One micro-batch's loss. An EAGLE-3 head's is the mean over its unrolled draft steps s: step s
    at entry i predicts token i + s + 2, i.e. label i + s + 1, against the target's logits there."""
    if args.kind == "eagle3":
        steps, t_logits = model(b.inp, eagle3_steps=args.block_size, taps=b.taps)
        teacher = b.topk if b.topk is not None else t_logits
        assert teacher is not None
        t = b.inp.shape[1]
        losses = []
        for s, logits in enumerate(steps):
            sh = s + 1
            lg, y, m = logits[:, : t - sh], b.lab[:, sh:], b.mask[:, sh:]
            losses.append(weigh(_objective(lg, teacher[:, sh:], y, m, distil, head), m))
        return torch.stack(losses).mean()
    logits, t_logits = model(b.inp, b.starts, taps=b.taps)
    return weigh(_objective(logits, b.topk if b.topk is not None else t_logits, b.lab, b.mask, distil, head), b.mask)


def _block_starts(args: TrainArgs, batch: int, seq_len: int, step: int, micro: int, device: torch.device) -> Tensor | None:
    """Variable blocks (``block_min`` > 0): a pure function of (seed, step, micro), so resumes are exact."""
    if not args.block_min or args.kind != "tandem":
        return None
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 64 + micro)
    return random_block_starts(batch, seq_len, args.block_min, args.block_size, gen).to(device)


@torch.no_grad()
def evaluate(args: TrainArgs, model: Objective, batches: list[Batch], head: Head) -> dict[str, float]:
    """Held-out next-token accuracy and CE; with a teacher also agreement with its argmax and TV. Every
    rank scores the same rows (FSDP2 needs them all in each forward)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0.0
    vocab = None if model.teacher is None else model.teacher.identity.vocab_size
    for b in batches:
        logits, t_logits = model(b.inp, taps=b.taps)
        teacher = b.topk if b.topk is not None else t_logits
        mask = b.mask
        if args.kind == "eagle3":  # position 0 has no earlier verified state to draft from
            mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)
        m = mask.float()
        pred = head.to_target(logits.argmax(-1))
        parts = {"ce": head_ce(logits, b.lab, mask, head.t2d).item(),
                 "accuracy": ((pred == b.lab).float() * m).sum().item() / m.sum().item()}
        if teacher is not None and vocab is not None:
            parts["agreement"] = ((pred == teacher_argmax(teacher)).float() * m).sum().item() / m.sum().item()
            parts["tv"] = (head_tv(logits, teacher, vocab, head.d2t) * m).sum().item() / m.sum().item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * m.sum().item()
        n += m.sum().item()
    model.train()
    return {k: v / max(n, 1) for k, v in sums.items()}


def _row_batches(args: TrainArgs, rows: Tensor, device: torch.device, masks: Tensor | None = None) -> list[Batch]:
    """Held-out rows (N, T+1) as evaluation batches; ``masks`` (N, T): score only these labels."""
    out = []
    for i in range(0, min(len(rows), args.eval_batches * args.batch_size), args.batch_size):
        batch = rows[i : i + args.batch_size].to(device)
        mask = torch.ones_like(batch[:, 1:]) if masks is None else masks[i : i + args.batch_size].to(device)
        out.append(Batch(inp=batch[:, :-1], lab=batch[:, 1:], mask=mask))
    return out


def _pass_batch(data: Any, idx: np.ndarray, taps: tuple[int, ...], device: torch.device) -> Batch:
    got = data.batch(idx, taps)
    tokens = got["tokens"].to(device)
    return Batch(inp=tokens[:, :-1], lab=tokens[:, 1:], mask=got["mask"].to(device),
                 taps=got["taps"].to(device) if taps else None,
                 topk=TopK(got["topk_ids"].to(device), got["topk_logp"].to(device)))


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


def _lr_schedule(args: TrainArgs) -> Any:
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
    docs = read_texts(args.data) if args.data else []  # bad data fails fast, before any model is loaded
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
    source = _Source(args, teacher, tok, docs, eval_docs, device)
    student = build_student(args, teacher, tok, source.draft_ids(args)).to(device)
    source.bind(getattr(getattr(student, "cfg", None), "tap_layers", ()) if args.kind != "baseline" else ())
    head = Head.of(student)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(args))
    ckpts = args.out / CKPT_DIR
    start = _prepare_run_dir(args, world, ckpts, core, opt, sched)

    log = (args.out / "train_log.jsonl").open("a") if world.main else None
    bar = progress_bar(total=args.steps, initial=start, desc=f"train {args.kind}", disable=not (args.progress and world.main),
                       unit="step")
    def weigh(loss: Tensor, mask: Tensor) -> Tensor:
        return distributed.weigh(world, loss, mask, device)

    clock = _Clock(device)
    metrics: dict[str, float] = {}
    for step in range(start, args.steps):
        distil = teacher is not None and args.loss == "distil" and step >= args.ce_fraction * args.steps
        total = 0.0
        clock.start(core)
        for micro in range(args.grad_accum):
            b = source.train_batch(step, micro, world)
            with distributed.sync_gradients(model, world, args.parallel, micro == args.grad_accum - 1), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _loss(args, model, b, distil, weigh, head)
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
            metrics = _evaluate_all(args, core, source, head)
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
        metrics = _evaluate_all(args, core, source, head)
    throughput = clock.summary(world, args)
    if args.parallel == "fsdp" and world.distributed:
        full, _ = distributed.full_state(core)  # every rank gathers; rank 0 exports an unsharded copy
        if world.main:
            student = build_student(args, teacher, tok, source.draft_ids(args))
            student.load_state_dict(_strip(full, "student."))
    if world.main:
        _export(args, student.float(), tok, metrics, throughput)
    distributed.barrier(world)
    return TrainResult(out=args.out, steps=args.steps, metrics=metrics, rank=world.rank)


def train_once(args: TrainArgs) -> dict[str, float]:
    """Train unless ``args.out`` already holds the export (its held-out metrics are returned); resume a
    run an earlier attempt left unfinished. What a pipeline of resumable stages calls."""
    summary = args.out / "train_summary.json"
    if summary.is_file():
        return dict(json.loads(summary.read_text())["eval"])
    resume = (args.out / "checkpoints" / "latest").is_file()
    return train(replace(args, resume=resume)).metrics


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


def _evaluate_all(args: TrainArgs, model: Objective, source: _Source, head: Head) -> dict[str, float]:
    """Held-out metrics on natural text, and (prefixed ``gen_``) on held-out generated sequences (a target
    pass is generated sequences only)."""
    metrics = evaluate(args, model, source.eval_text, head) if source.eval_text else {}
    if source.eval_gen:
        metrics |= {f"gen_{k}": v for k, v in evaluate(args, model, source.eval_gen, head).items()}
    return metrics


class _Source:
    """Where the training rows come from: natural text and generated sequences (the target runs in the
    step), or a target pass (rows, taps and top-k read from disk). Batches are pure functions of
    (seed, step, micro), so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, args: TrainArgs, teacher: LoadedLM | None, tok: Any, docs: list[str],
                 eval_docs: list[str] | None, device: torch.device) -> None:
        self.args, self.device = args, device
        self.taps: tuple[int, ...] = ()
        self.eval_text: list[Batch] = []
        self.eval_gen: list[Batch] = []
        if args.target_pass is not None:
            from tandem_vllm.train.target_pass import PassData

            assert teacher is not None
            self.data = PassData(args.target_pass, teacher.identity)
            order = np.random.default_rng([args.seed, 2]).permutation(len(self.data))
            n_eval = max(1, len(order) // 20)
            if len(order) - n_eval < 1:
                raise TandemError(f"--target-pass {args.target_pass} holds {len(order)} row(s); need 2+ to hold one out")
            self.train_idx, self.eval_idx = order[:-n_eval], order[-n_eval:]
            return
        self.rows = pack(docs, tok, args.seq_len)
        if eval_docs:
            eval_rows = pack(eval_docs, tok, args.seq_len)
        else:
            n_eval = max(1, len(self.rows) // 20)
            if len(self.rows) - n_eval < 1:
                raise TandemError(f"data packs into {len(self.rows)} sequence(s); need 2+ to hold one out (or pass --eval-data)")
            self.rows, eval_rows = self.rows[:-n_eval], self.rows[-n_eval:]
        self.eval_text = _row_batches(args, eval_rows, device)
        self.generated = _generated_rows(args, teacher, tok)
        if self.generated is not None:
            self.eval_gen = _row_batches(args, self.generated[2], device, self.generated[3])

    def draft_ids(self, args: TrainArgs) -> Tensor | None:
        """The ``draft_vocab`` most frequent label tokens of the training rows, most frequent first."""
        if not args.draft_vocab:
            return None
        if args.target_pass is None:
            raise TandemError("--draft-vocab picks the most frequent tokens of a target pass; pass --target-pass")
        counts = self.data.label_counts(self.train_idx)
        if args.draft_vocab > len(counts):
            raise TandemError(f"--draft-vocab {args.draft_vocab} exceeds the vocabulary ({len(counts)})")
        order = np.lexsort((np.arange(len(counts)), -counts))  # by count, then by id
        return torch.from_numpy(order[: args.draft_vocab].copy())

    def bind(self, taps: tuple[int, ...]) -> None:
        """The student's taps are known: check the pass holds them and cut the held-out batches."""
        if self.args.target_pass is None:
            return
        self.taps = taps
        missing = sorted(set(taps) - set(self.data.taps))
        if missing:
            raise TandemError(f"--target-pass {self.args.target_pass} stores taps {list(self.data.taps)}; this drafter "
                              f"reads {missing} too: run target-pass with them (--taps) into another directory")
        n = self.args.eval_batches * self.args.batch_size
        idx = self.eval_idx[:n]
        self.eval_gen = [_pass_batch(self.data, idx[i : i + self.args.batch_size], taps, self.device)
                         for i in range(0, len(idx), self.args.batch_size)]

    def train_batch(self, step: int, micro: int, world: distributed.World) -> Batch:
        args = self.args
        if args.target_pass is not None:
            pos = batch_indices(len(self.train_idx), args.batch_size, step, micro, args.grad_accum, args.seed)
            idx = self.train_idx[pos][world.share(len(pos))]
            b = _pass_batch(self.data, idx, self.taps, self.device)
            starts = _block_starts(args, len(pos), args.seq_len, step, micro, self.device)
            return replace(b, starts=starts[world.share(len(pos))] if starts is not None else None)
        n_gen = args.gen_rows
        idx = batch_indices(len(self.rows), args.batch_size - n_gen, step, micro, args.grad_accum, args.seed)
        batch, mask = self.rows[torch.from_numpy(idx)], torch.ones(len(idx), args.seq_len, dtype=torch.long)
        if self.generated is not None and n_gen:
            g_idx = torch.from_numpy(batch_indices(len(self.generated[0]), n_gen, step, micro, args.grad_accum, args.seed + 1))
            batch, mask = torch.cat([batch, self.generated[0][g_idx]]), torch.cat([mask, self.generated[1][g_idx]])
        starts = _block_starts(args, len(batch), args.seq_len, step, micro, self.device)
        mine = world.share(len(batch))  # the global micro-batch is the same on every rank; keep this rank's rows
        batch, mask = batch[mine].to(self.device), mask[mine].to(self.device)
        return Batch(inp=batch[:, :-1], lab=batch[:, 1:], mask=mask, starts=starts[mine] if starts is not None else None)


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
    mine, newer = args.identity(), TrainArgs.NEWER
    diffs = [k for k in TrainArgs.RUN_IDENTITY if saved.get(k, newer.get(k)) != mine.get(k, newer.get(k))]
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
