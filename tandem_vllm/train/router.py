"""``tandem-vllm train-router``: fit the adaptive block-length router of a Tandem drafter.

Labels come from the frozen pair itself: on packed training text, the target runs once (its logits
and tap states), the drafter runs in its block-causal training form with blocks of ``k`` (the
drafts of one speculative step), and each position is labelled 1 when the drafter's greedy token
equals the target's -- the token the target would accept. The router (2-layer MLP on the drafter's
entropy, top-k probabilities and top-k token embeddings) is fitted to those labels with binary
cross-entropy. The output directory is a complete drafter checkpoint (the drafter's files, linked
or copied) plus ``router/``, so pointing vLLM or the reference decoders
at it turns adaptive drafting on while the original directory keeps drafting fixed blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tandem_vllm.config import TandemConfig, check_target, target_identity
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.reference import TandemDrafter
from tandem_vllm.modeling.router import ROUTER_DIR, BlockLengthRouter, BlockLengthRouterConfig
from tandem_vllm.modeling.target import hidden_taps, load_causal_lm
from tandem_vllm.train.args import doc
from tandem_vllm.train.data import pack, read_texts


@dataclass(frozen=True)
class RouterArgs:
    """A ``train-router`` run; the command's flags are these fields (cli_fields.add_dataclass_flags)."""

    target: Path = doc(help="the target the drafter was trained for")
    drafter: Path = doc(help="Tandem drafter directory")
    data: list[Path] = doc(help="text or JSONL files (training text)")
    out: Path = doc(help="new drafter directory with the router")
    k: int = doc(3, "drafts per step the router will serve (block length)")
    seq_len: int = doc(256, "tokens per training window")
    max_positions: int = doc(60_000, "labelled positions collected (90% train, 10% held out)")
    batch_size: int = doc(512, "positions per router update")
    epochs: int = doc(20, "passes over the labelled positions")
    lr: float = doc(3e-3, "router learning rate")
    top_k: int = doc(4, "top-k probabilities and embeddings used as features")
    hidden: int = doc(64, "router MLP width")
    threshold: float = doc(0.5, "keep drafting while P(accept) >= this")
    seed: int = doc(0, "seed for the position sample and the router's initialisation")

    def __post_init__(self) -> None:
        if self.k < 2:
            raise TandemError(f"--k {self.k}: a router shortens blocks of at least 2 drafts; use --k >= 2")
        if self.out.resolve() == self.drafter.resolve():
            raise TandemError("--out must differ from --drafter: the router is saved into a new drafter directory")
        if self.max_positions < 100:
            raise TandemError(f"--max-positions {self.max_positions}: collect at least 100 labelled positions")


@torch.no_grad()
def collect(args: RouterArgs, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, BlockLengthRouter]:
    """(features (N, F), labels (N,)) from the pair on the data, and an untrained router for them."""
    from tqdm import tqdm

    target = load_causal_lm(args.target)
    drafter = TandemDrafter.load(args.drafter)
    check_target(drafter.cfg, target_identity(str(args.target), target.model.config, target.tokenizer),
                 drafter_path=str(args.drafter))
    router = BlockLengthRouter(BlockLengthRouterConfig(embed_dim=drafter.cfg.hidden_size, top_k=args.top_k, hidden=args.hidden,
                                 threshold=args.threshold))
    rows = pack(read_texts(args.data), target.tokenizer, args.seq_len)
    if len(rows) == 0:
        raise TandemError(f"{', '.join(map(str, args.data))}: not enough text for one {args.seq_len}-token sequence")
    g = torch.Generator().manual_seed(args.seed)
    rows = rows[torch.randperm(len(rows), generator=g)]
    feats, labels, n = [], [], 0
    bar = tqdm(total=args.max_positions, desc="router data", unit="pos", disable=not progress)
    embed = drafter.model.embed_tokens.weight
    for i in range(0, len(rows), 4):
        inp = rows[i : i + 4, :-1]
        out = target.model(input_ids=inp, output_hidden_states=True)
        logits = drafter.forward_train(inp, hidden_taps(out.hidden_states, drafter.cfg.tap_layers), args.k)
        feats.append(router.features(logits, embed).flatten(0, 1))
        labels.append((logits.argmax(-1) == out.logits.argmax(-1)).float().flatten())
        n += labels[-1].numel()
        bar.update(labels[-1].numel())
        if n >= args.max_positions:
            break
    bar.close()
    return torch.cat(feats)[: args.max_positions], torch.cat(labels)[: args.max_positions], router


def fit(router: BlockLengthRouter, x: torch.Tensor, y: torch.Tensor, args: RouterArgs, progress: bool = True) -> dict[str, float]:
    """BCE on 90% of the positions; metrics on the other 10% at the router's threshold."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=g)
    n_eval = max(len(y) // 10, 1)
    ev, tr = order[:n_eval], order[n_eval:]
    # Trained on standardised features; the scaling is folded into the first layer afterwards, so the
    # saved router takes raw features.
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    opt = torch.optim.AdamW(router.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    steps = args.epochs * max(len(tr) // args.batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    xs = (x - mean) / std
    bar = tqdm(total=steps, desc="router fit", unit="step", disable=not progress)
    router.train()
    for _ in range(args.epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for j in range(0, max(len(perm) - args.batch_size, 0) + 1, args.batch_size):
            idx = perm[j : j + args.batch_size]
            loss = loss_fn(router(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()  # exactly `steps` batches: each epoch runs max(len(tr) // batch_size, 1) of them
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    router.eval()
    with torch.no_grad():  # fold the standardisation into the first layer
        first: Any = router.net[0]
        first.bias -= (first.weight * (mean / std)).sum(1)
        first.weight /= std
        prob = torch.sigmoid(router(x[ev]))
    return _metrics(prob, y[ev], args.threshold)


def _metrics(prob: torch.Tensor, y: torch.Tensor, threshold: float) -> dict[str, float]:
    go = prob >= threshold
    acc = y.bool()
    return {
        "heldout_positions": int(len(y)),
        "base_acceptance": round(float(y.mean()), 4),
        "accuracy": round(float((go == acc).float().mean()), 4),
        "kept_of_accepted": round(float(go[acc].float().mean()) if acc.any() else 0.0, 4),
        "stopped_of_rejected": round(float((~go[~acc]).float().mean()) if (~acc).any() else 0.0, 4),
        "auc": round(_auc(prob, acc), 4),
    }


def _auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (rank statistic)."""
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = torch.empty_like(score)
    ranks[score.argsort()] = torch.arange(1, len(score) + 1, dtype=score.dtype)
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def export(args: RouterArgs, router: BlockLengthRouter, metrics: dict[str, float]) -> None:
    """A new drafter directory: the drafter's files (hard-linked where possible) + the router."""
    TandemConfig.load(args.drafter)  # a readable drafter checkpoint, or a clear error
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(args.drafter.iterdir()):
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    router.save(tmp)
    (tmp / ROUTER_DIR / "train.json").write_text(json.dumps({"metrics": metrics, "args": {
        k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()}}, indent=2) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)


def train_router(args: RouterArgs, progress: bool = True) -> dict[str, float]:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    x, y, router = collect(args, progress)
    metrics = fit(router, x, y, args, progress)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    export(args, router, metrics)
    return metrics
