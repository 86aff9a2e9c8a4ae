"""Speculation statistics a replica exposes: vLLM's own spec-decode counts, totalled, plus tau.

vLLM's Prometheus logger already exports ``vllm:spec_decode_num_drafts`` & co. on /metrics. This
logger sees the same per-step ``SpecDecodingStats`` and keeps running totals so the replica can
answer ModelInfo over gRPC and export ``tandem:spec_decode_mean_acceptance_length`` (tau = tokens
emitted per target pass = 1 + accepted / drafts) as a gauge next to vLLM's counters, and
``tandem:spec_decode_steps_without_drafts`` (engine steps that decoded without verifying any draft:
the batch-size fallback, n-gram misses, opted-out requests). Per request: ``observe_requests`` puts each
finished request's own tau (vLLM's per-request spec-decode metrics) into the histogram
``tandem:request_mean_acceptance_length``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from tandem_vllm.vllm_adapter.marks import MARK


@dataclass
class SpecTotals:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


_TOTALS = SpecTotals()
_LOCK = threading.Lock()
_GAUGE: Any = None
_RAY_GAUGE: Any = None
_REQUEST_TAU: Any = None
_NO_DRAFT_STEPS: Any = None
# tau of one request: 1 (nothing accepted) .. k + 1 (every draft accepted, k <= 8)
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 9.0)
TAU_HELP = "Mean tokens emitted per target forward pass (tau) since the replica started."


def totals() -> SpecTotals:
    with _LOCK:
        return SpecTotals(_TOTALS.num_drafts, _TOTALS.num_draft_tokens, _TOTALS.num_accepted_tokens)


def _tau_gauge() -> Any:
    """One gauge per process (a replica may build more than one engine over its life)."""
    global _GAUGE
    if _GAUGE is None:
        import prometheus_client

        _GAUGE = prometheus_client.Gauge(
            "tandem:spec_decode_mean_acceptance_length",
            TAU_HELP,
            ["model_name"],
        )
    return _GAUGE


def _request_metrics() -> tuple[Any, Any]:
    global _REQUEST_TAU, _NO_DRAFT_STEPS
    if _REQUEST_TAU is None:
        import prometheus_client

        _REQUEST_TAU = prometheus_client.Histogram(
            "tandem:request_mean_acceptance_length",
            "tau of each finished speculated request: tokens emitted per verification step it took part in.",
            ["model_name"], buckets=TAU_BUCKETS)
        _NO_DRAFT_STEPS = prometheus_client.Counter(
            "tandem:spec_decode_steps_without_drafts",
            "Engine steps that decoded tokens without verifying any draft.", ["model_name"])
    return _REQUEST_TAU, _NO_DRAFT_STEPS


def spec_metrics_of(completion: Any) -> dict[str, Any] | None:
    """A finished completion's per-request spec-decode metrics (vLLM's ``to_dict()``), or None when
    speculation did not run for it or per-request metrics are off."""
    metrics = getattr(completion, "spec_decode_metrics", None)
    return metrics.to_dict() if metrics is not None else None


def observe_requests(engine: Any, model_name: str) -> None:
    """Every request this engine finishes puts its tau into ``tandem:request_mean_acceptance_length``:
    the engine's ``generate`` (which vLLM's OpenAI app and the gRPC methods both call) is wrapped on
    this instance only."""
    generate = engine.generate
    histogram = _request_metrics()[0].labels(model_name=model_name)

    async def observed(*args: Any, **kwargs: Any) -> Any:
        async for out in generate(*args, **kwargs):
            if out.finished:
                for completion in out.outputs:
                    if (spec := spec_metrics_of(completion)) and spec["num_spec_steps"]:
                        histogram.observe(spec["mean_acceptance_length"])
            yield out

    setattr(observed, MARK, ("request-tau",))  # a row of patches.PATCHES (per instance, not per class)
    engine.generate = observed


def _ray_tau_gauge() -> Any:
    """tau through Ray's metrics agent too (Prometheus names allow no ':' there)."""
    global _RAY_GAUGE
    if _RAY_GAUGE is None:
        from ray.util import metrics

        _RAY_GAUGE = metrics.Gauge("tandem_spec_decode_mean_acceptance_length", TAU_HELP, tag_keys=("model_name",))
    return _RAY_GAUGE


def stat_loggers(ray_metrics: bool) -> list[Any]:
    """The vLLM stat loggers a replica's engine gets.

    With ``ray_metrics`` vLLM's metrics are also recorded through Ray's metrics agent (every Ray node
    exports them on its metrics port, tagged by replica, which is what a cluster's Prometheus
    scrapes). vLLM drops its default Prometheus logger once any Prometheus logger is passed, so
    it is passed explicitly, after Ray's: its constructor re-registers the ``vllm:`` collectors that
    serve /metrics.
    """
    if not ray_metrics:
        return [SpecStatsLogger]
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RaySpecStatsLogger, RayPrometheusStatLogger, PrometheusStatLogger]


class SpecStatsLogger(StatLoggerBase):
    """Per-engine vLLM stat logger: totals spec-decode work and publishes tau."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.model_name = str(vllm_config.model_config.served_model_name)
        self.gauge = _tau_gauge().labels(model_name=self.model_name)
        self.gauge.set(1.0)
        self.speculating = vllm_config.speculative_config is not None
        self.no_draft_steps = _request_metrics()[1].labels(model_name=self.model_name)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        # a step that decoded (some request past its first token) yet verified no draft
        decoded = bool(getattr(iteration_stats, "inter_token_latencies_iter", None))
        if self.speculating and decoded and (spec is None or not spec.num_drafts):
            self.no_draft_steps.inc()
        if spec is None:
            return
        with _LOCK:
            _TOTALS.num_drafts += spec.num_drafts
            _TOTALS.num_draft_tokens += spec.num_draft_tokens
            _TOTALS.num_accepted_tokens += spec.num_accepted_tokens
            self.gauge.set(_TOTALS.mean_acceptance_length)

    def log_engine_initialized(self) -> None:
        pass


class RaySpecStatsLogger(SpecStatsLogger):
    """SpecStatsLogger that also publishes tau through Ray's metrics agent."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        super().__init__(vllm_config, engine_index)
        self.ray_gauge = _ray_tau_gauge()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
        if getattr(scheduler_stats, "spec_decoding_stats", None) is not None:
            self.ray_gauge.set(totals().mean_acceptance_length, tags={"model_name": self.model_name})
