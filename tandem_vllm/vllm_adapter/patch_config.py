"""Patches where vLLM builds the engine config: a Tandem drafter is checked against its target and k
there, and kept on the V1 model runner (rows `config`, `v1-runner` of ``patches.PATCHES``)."""

from __future__ import annotations

import functools
from typing import Any

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter.checks import (
    checked_tandem_config,
    is_tandem_checkpoint,
    local_tandem_dir,
    logger,
    refuse_missing_local_drafter,
)
from tandem_vllm.vllm_adapter.marks import mark
from tandem_vllm.vllm_adapter.proposer_v1 import TANDEM_DRAFT_SAMPLING


def check_config_early() -> None:
    from vllm.engine.arg_utils import EngineArgs

    make_spec = EngineArgs.create_speculative_config

    @functools.wraps(make_spec)
    def create_speculative_config(self: Any, target_model_config: Any, *args: Any, **kwargs: Any) -> Any:
        # Runs in the process that builds the engine config, so a bad drafter fails here with our
        # message instead of as "engine core initialization failed" from a worker.
        refuse_missing_local_drafter(self.speculative_config)
        requested = self.speculative_config or {}
        drafter_dir = local_tandem_dir(requested.get("model"))
        if drafter_dir is not None:  # before vLLM's own checks, whose messages say less
            checked_tandem_config(drafter_dir, requested.get("num_speculative_tokens"), target_model_config)
            if "draft_sample_method" not in requested:
                self.speculative_config = {**requested, "draft_sample_method": TANDEM_DRAFT_SAMPLING}
                logger.info("Tandem drafter: draft_sample_method=%r (sampled requests draft from the drafter's "
                            "distribution; pass draft_sample_method to choose)", TANDEM_DRAFT_SAMPLING)
        spec = make_spec(self, target_model_config, *args, **kwargs)
        if drafter_dir is None and spec is not None and is_tandem_checkpoint(spec.draft_model_config):
            checked_tandem_config(spec.draft_model_config.model, spec.num_speculative_tokens, target_model_config)
        return spec

    EngineArgs.create_speculative_config = mark(create_speculative_config, "config")


def _forced_v2() -> TandemError:
    return TandemError(
        "VLLM_USE_V2_MODEL_RUNNER=1 forces vLLM's Model Runner V2, which has no Tandem proposer (the drafter "
        "would draft without the target's context); unset it or set VLLM_USE_V2_MODEL_RUNNER=0"
    )


def keep_tandem_on_v1() -> None:
    import vllm.envs as vllm_envs
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    v2_unsupported = VllmConfig._get_v2_model_runner_unsupported_features
    make_engine_config = EngineArgs.create_engine_config

    @functools.wraps(v2_unsupported)
    def _get_v2_model_runner_unsupported_features(self: Any) -> list[str]:
        # Model Runner V2 (vLLM's choice wherever Triton exists) builds its own speculators and would
        # run a Tandem checkpoint as a plain draft model, without the target's context: name the
        # feature so vLLM picks V1 and says why in its own log line.
        found = v2_unsupported(self)
        spec = self.speculative_config
        if spec is not None and is_tandem_checkpoint(spec.draft_model_config):
            found.append("a Tandem drafter (tandem-vllm's proposer runs on the V1 model runner)")
        return found

    @functools.wraps(make_engine_config)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM itself rejects a forced V2 once the feature above is named, in a pydantic error that does
        # not say what to do; say it first.
        if vllm_envs.VLLM_USE_V2_MODEL_RUNNER and local_tandem_dir((self.speculative_config or {}).get("model")):
            raise _forced_v2()
        config = make_engine_config(self, *args, **kwargs)
        spec = config.speculative_config
        if spec is not None and is_tandem_checkpoint(spec.draft_model_config) and config.use_v2_model_runner:
            raise _forced_v2()
        return config

    VllmConfig._get_v2_model_runner_unsupported_features = mark(
        _get_v2_model_runner_unsupported_features, "v1-runner")
    EngineArgs.create_engine_config = mark(create_engine_config, "v1-runner")
