"""``tandem-vllm target-pass``: one pass of the frozen target over the training rows, written to disk,
so that any number of drafters train from it without running the target again.

Against a real target the target's forward is most of a drafter's training step (2 CPU cores: ~400
tok/s for SmolLM2-135M, while a one-layer drafter trains several times faster). Everything the drafters
need from the target is a function of the row alone, so it is computed once:

    OUT/manifest.json        settings, the target's identity, the stored taps, shard count, pass throughput
    OUT/shard-00000/         rows [0, S), written to a temporary name and renamed when complete
        tokens.npy           (S, T+1) int32   the row: inputs [:-1], labels [1:]
        mask.npy             (S, T)   uint8   1 where the label is a reply token (what drafters learn)
        taps.npy             (S, T, U, Dt) float16  hidden states at ``taps`` (0 = embedding output,
                                               L = final normed state), the Tandem and EAGLE-3 inputs
        topk_ids.npy         (S, T, K) int32  the target's K most likely next tokens, most likely first
        topk_logp.npy        (S, T, K) float16  their log-probabilities (softmax over the whole vocabulary)

Rows are ``gen-data`` sequences packed as the trainer packs them (``pack_generated``). A rerun skips
complete shards; another target, tokenizer or setting is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

from tandem_vllm.config import identity_differences
from tandem_vllm.errors import TandemError

FORMAT: Final = "tandem-vllm/target-pass-v1"
MANIFEST: Final = "manifest.json"
ARRAYS: Final = ("tokens", "mask", "taps", "topk_ids", "topk_logp")


@dataclass(frozen=True)
class PassSettings:
    target: Path
    gen_data: tuple[Path, ...]
    out: Path
    taps: tuple[int, ...]  # hidden-state indices to store, ascending
    top_k: int = 64
    seq_len: int = 256
    shard_rows: int = 256
    batch_size: int = 8
    max_rows: int = 0  # > 0: only the first max_rows rows (a quick pass)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.taps or list(self.taps) != sorted(set(self.taps)):
            raise TandemError(f"--taps {list(self.taps)}: give distinct tap indices in ascending order")
        if self.max_rows < 0:
            raise TandemError(f"--max-rows={self.max_rows}; 0 means every row")
        for name in ("top_k", "seq_len", "shard_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise TandemError(f"--{name.replace('_', '-')}={getattr(self, name)}; it must be at least 1")

    def recorded(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out", "progress", "device", "batch_size"):
            d.pop(k)
        return {**d, "target": str(self.target), "gen_data": [str(p) for p in self.gen_data], "taps": list(self.taps)}


def shard_dir(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}"


def run(s: PassSettings) -> dict[str, Any]:
    """Compute every missing shard; returns the manifest."""
    from tandem_vllm.modeling.target import load_causal_lm, num_layers, resolve_device
    from tandem_vllm.progress import progress_bar
    from tandem_vllm.train.data import pack_generated
    from tandem_vllm.train.gen_data import read_generated

    device = resolve_device(s.device)
    lm = load_causal_lm(s.target, device=str(device))
    top = num_layers(lm.model)
    bad = [t for t in s.taps if not 0 <= t <= top]
    if bad:
        raise TandemError(f"--taps {bad} out of range 0..{top} for this {top}-layer target")
    rows, masks = pack_generated(read_generated(s.gen_data, lm.identity), s.seq_len, lm.tokenizer.eos_token_id or 0)
    if s.max_rows:
        rows, masks = rows[: s.max_rows], masks[: s.max_rows]
    shards = -(-len(rows) // s.shard_rows)
    manifest = _manifest(s, lm.identity.model_dump(mode="json"), len(rows), shards)
    pending = [i for i in range(shards) if not (shard_dir(s.out, i) / "taps.npy").is_file()]
    bar = progress_bar(total=len(rows) * s.seq_len, initial=(shards - len(pending)) * s.shard_rows * s.seq_len,
                       desc="target pass", unit="tok", unit_scale=True, disable=not s.progress)
    seconds, tokens = 0.0, 0
    for i in pending:
        lo, hi = i * s.shard_rows, min((i + 1) * s.shard_rows, len(rows))
        t0 = time.perf_counter()
        arrays = _pass(lm.model, rows[lo:hi], s, device, bar)
        arrays["mask"] = masks[lo:hi].numpy().astype(np.uint8)
        _write_shard(shard_dir(s.out, i), arrays)
        seconds += time.perf_counter() - t0
        tokens += (hi - lo) * s.seq_len
    bar.close()
    if pending:  # throughput of this run (a resumed run reports its own part)
        manifest["pass"] = {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
                            "device": str(device), "bytes": disk_bytes(s.out)}
        _atomic_json(s.out / MANIFEST, manifest)
    return manifest


def _manifest(s: PassSettings, identity: dict[str, Any], n_rows: int, shards: int) -> dict[str, Any]:
    manifest: dict[str, Any] = {"format": FORMAT, "target": identity, "settings": s.recorded(), "rows": n_rows,
                                "shards": shards}
    path = s.out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = identity_differences(old.get("target", {}), identity)
        diffs += sorted(k for k in set(old.get("settings", {})) | set(manifest["settings"])
                        if old.get("settings", {}).get(k) != manifest["settings"].get(k))
        if old.get("rows") != n_rows:
            diffs.append(f"rows {old.get('rows')} != {n_rows}")
        if diffs:
            raise TandemError(f"{s.out} holds a target pass with other settings ({'; '.join(diffs)}); use another --out "
                              "or the same settings to resume")
        return dict(old)
    s.out.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, manifest)
    return manifest


@torch.no_grad()
def _pass(model: Any, rows: Tensor, s: PassSettings, device: torch.device, bar: Any) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("tokens", "taps", "topk_ids", "topk_logp")}
    for b in range(0, len(rows), s.batch_size):
        batch = rows[b : b + s.batch_size]
        res = model(input_ids=batch[:, :-1].to(device), output_hidden_states=True)
        taps = torch.stack([res.hidden_states[t] for t in s.taps], dim=2)  # (B, T, U, Dt)
        logp = torch.log_softmax(res.logits.float(), dim=-1)  # (B, T, V)
        top = logp.topk(s.top_k, dim=-1)  # sorted, most likely first
        out["tokens"].append(batch.numpy().astype(np.int32))
        out["taps"].append(taps.to(torch.float16).cpu().numpy())
        out["topk_ids"].append(top.indices.to(torch.int32).cpu().numpy())
        out["topk_logp"].append(top.values.to(torch.float16).cpu().numpy())
        bar.update(batch.shape[0] * s.seq_len)
    return {k: np.concatenate(v) for k, v in out.items()}


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", arrays[name])
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def disk_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*.npy"))


class PassData:
    """A finished target pass, memory-mapped: rows, masks, taps and top-k, refused unless it was
    made by the target ``expect`` (a TargetIdentity) and holds the taps the caller needs."""

    def __init__(self, path: Path, expect: Any, *, need_taps: tuple[int, ...] = ()) -> None:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise TandemError(f"--target-pass {path} has no {MANIFEST}; create it with `tandem-vllm target-pass`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TandemError(f"--target-pass {path} has format {self.manifest.get('format')!r}, not {FORMAT!r}")
        got = self.manifest.get("target", {})
        diffs = identity_differences(got, expect)
        if diffs:
            raise TandemError(f"--target-pass {path} was made by target {got.get('name_or_path')!r}, not by "
                              f"{expect.name_or_path!r} ({'; '.join(diffs)}); run target-pass with this target")
        self.taps: tuple[int, ...] = tuple(self.manifest["settings"]["taps"])
        missing = sorted(set(need_taps) - set(self.taps))
        if missing:
            raise TandemError(f"--target-pass {path} stores taps {list(self.taps)}; this drafter reads {missing} too. "
                              "Run target-pass with those taps (--taps) into another directory")
        shards = [shard_dir(path, i) for i in range(self.manifest["shards"])]
        absent = [d.name for d in shards if not (d / "taps.npy").is_file()]
        if absent:
            raise TandemError(f"--target-pass {path} lacks {len(absent)} of {len(shards)} shards ({absent[0]}...); "
                              "finish it by rerunning the same target-pass command")
        self._shards = [{k: np.load(d / f"{k}.npy", mmap_mode="r") for k in ARRAYS} for d in shards]
        self._starts = np.cumsum([0] + [len(x["tokens"]) for x in self._shards])
        self.top_k = int(self.manifest["settings"]["top_k"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def label_counts(self, idx: np.ndarray) -> np.ndarray:
        """(V,) how often each target token is a scored label in rows ``idx``."""
        counts = np.zeros(int(self.manifest["target"]["vocab_size"]), dtype=np.int64)
        for i in idx.tolist():
            s = int(np.searchsorted(self._starts, i, side="right") - 1)
            shard, r = self._shards[s], i - int(self._starts[s])
            labels = np.asarray(shard["tokens"][r][1:])
            np.add.at(counts, labels[np.asarray(shard["mask"][r]) > 0], 1)
        return counts

    def tap_index(self, taps: tuple[int, ...]) -> list[int]:
        """Positions of ``taps`` in the stored tap axis."""
        return [self.taps.index(t) for t in taps]

    def batch(self, idx: np.ndarray, taps: tuple[int, ...]) -> dict[str, Tensor]:
        """Rows ``idx`` with the taps ``taps`` (in that order): tokens (B, T+1) long, mask (B, T) long,
        taps (B, T, len(taps), Dt) float32, topk_ids (B, T, K) long, topk_logp (B, T, K) float32."""
        cols = self.tap_index(taps)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
        for i in idx.tolist():
            s = int(np.searchsorted(self._starts, i, side="right") - 1)
            shard, r = self._shards[s], i - int(self._starts[s])
            for k in ARRAYS:
                parts[k].append(shard[k][r][:, cols] if k == "taps" else shard[k][r])
        out = {k: torch.from_numpy(np.stack(v)) for k, v in parts.items()}
        return {"tokens": out["tokens"].long(), "mask": out["mask"].long(), "taps": out["taps"].float(),
                "topk_ids": out["topk_ids"].long(), "topk_logp": out["topk_logp"].float()}
