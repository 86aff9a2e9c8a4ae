"""Adaptive block length: the paper's block-length router (not Ray Serve's request router).

Before the drafter's next token is proposed, a 2-layer MLP reads the drafter's next-token
distribution -- its entropy, its top-k probabilities and the drafter's own embeddings of those
top-k tokens -- and predicts the probability that the target will accept the token. Drafting for a
request stops at the first position predicted below ``threshold``: the target then verifies a
shorter block, and the drafter runs fewer steps.

A router is trained per drafter (``tandem-vllm train-router``) and lives inside the drafter's
directory, in ``router/`` (``router.json`` + ``router.safetensors``; a sub-directory, so loaders that
read every ``*.safetensors`` of a model directory, as vLLM's does, never see it). A drafter
directory with a router drafts adaptively.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tandem_vllm.errors import TandemError

ROUTER_DIR = "router"
ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"


@dataclass(frozen=True)
class BlockLengthRouterConfig:
    embed_dim: int  # the drafter's hidden size (its token embeddings are features)
    top_k: int = 4
    hidden: int = 64
    threshold: float = 0.5  # continue drafting while P(accept) >= threshold

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.hidden < 1 or self.embed_dim < 1:
            raise TandemError(f"router config {self}: top_k, hidden and embed_dim must be >= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise TandemError(f"router threshold={self.threshold}; it is a probability in [0, 1]")

    @property
    def num_features(self) -> int:
        return 1 + self.top_k + self.top_k * self.embed_dim


class BlockLengthRouter(nn.Module):
    def __init__(self, cfg: BlockLengthRouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.num_features, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def features(self, logits: Tensor, embed_weight: Tensor) -> Tensor:
        """(..., V) drafter logits and its (V, D) embedding table -> (..., num_features). A draft
        vocabulary's logits come scattered into the target's with -inf elsewhere; those tokens add
        nothing to the entropy (0 log 0 = 0, where p * log p would be NaN)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1, keepdim=True) / math.log(logits.shape[-1])  # in [0, 1]
        top_p, top_i = p.topk(self.cfg.top_k, dim=-1)
        emb = embed_weight[top_i].float().flatten(-2)  # (..., k*D)
        return torch.cat([entropy, top_p, emb], dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        """Acceptance logits (...,) from features (..., num_features)."""
        return self.net(features.to(next(self.net.parameters()).dtype))[..., 0]

    @torch.no_grad()
    def accept_prob(self, logits: Tensor, embed_weight: Tensor) -> Tensor:
        return torch.sigmoid(self(self.features(logits, embed_weight)))

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, drafter_dir: str | Path) -> None:
        """Into ``<drafter_dir>/router/``."""
        from safetensors.torch import save_file

        directory = Path(drafter_dir) / ROUTER_DIR
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ROUTER_CONFIG).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(directory / ROUTER_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def load(cls, drafter_dir: str | Path, *, device: torch.device | str = "cpu") -> BlockLengthRouter | None:
        """The router stored with a drafter, or None when the drafter has none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(drafter_dir) / ROUTER_DIR
        if not (directory / ROUTER_CONFIG).is_file():
            return None
        try:
            cfg = BlockLengthRouterConfig(**json.loads((directory / ROUTER_CONFIG).read_text()))
            router = cls(cfg)
            router.load_state_dict(load_file(str(directory / ROUTER_WEIGHTS)))
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise TandemError(f"{directory}: the router files are unreadable ({str(e).splitlines()[0]}); "
                              f"retrain it with `tandem-vllm train-router` or delete {directory}") from None
        return router.to(device).eval()


def draft_lengths(accept_prob: Tensor, threshold: float) -> Tensor:
    """(B, K) router probabilities -> (B,) drafts to keep: up to the first below threshold, at least 1."""
    k = accept_prob.shape[1]
    below = accept_prob < threshold
    below[:, 0] = False  # the first draft is always proposed
    positions = torch.arange(k, device=accept_prob.device).expand_as(below)
    return torch.where(below, positions, k).min(1).values
