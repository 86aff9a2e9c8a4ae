"""Models the integration tests derive from the demo pair."""

from __future__ import annotations

from pathlib import Path

from tandem_vllm.modeling.target import load_causal_lm


def other_target(demo: dict, tmp_path: Path) -> str:
    """A Llama target with the demo tokenizer but a different width: the drafter's P_j cannot read it."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    src = load_causal_lm(demo["target"]).model.config
    cfg = LlamaConfig(**{**src.to_dict(), "hidden_size": 128, "intermediate_size": 256, "head_dim": 32})
    out = tmp_path / "other-target"
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{demo['target']}/{f}", out / f)
    return str(out)
