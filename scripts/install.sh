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
"$venv/bin/python" -c "import torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
