"""vLLM plugin: ``vllm.general_plugins`` entry point, run by vLLM in every process, possibly repeatedly.

Registers ``TandemDrafterForCausalLM`` by a lazy "module:Class" string and installs the proposer hook
(``vllm_adapter/patches.py``, which refuses an unsupported vLLM version with a clear message).
"""

from __future__ import annotations

from tandem_vllm.config import ARCHITECTURE

MODEL_CLASS = "tandem_vllm.vllm_adapter.drafter:TandemDrafterForCausalLM"


def register() -> None:
    from vllm import ModelRegistry  # deferred: `import tandem_vllm` must not import vLLM

    from tandem_vllm.vllm_adapter import patches

    patches.install()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
