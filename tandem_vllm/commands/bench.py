"""``tandem-vllm bench engine | suite | schedule | train | serve``: measurements, each a report
(JSON + markdown, a PNG where asked) written through ``common.write_report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem_vllm import report
from tandem_vllm.commands import common
from tandem_vllm.errors import TandemError


def run_engine(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import engine
    from tandem_vllm.prompts import read_workload

    prompts = read_workload(a.prompts)[a.skip_prompts : a.skip_prompts + a.num_prompts]
    engine_kwargs = common.engine_kwargs(a)
    schedule = None
    if a.k_schedule:
        schedule = common.k_schedule(a.k_schedule, "--k-schedule")
    cells = engine.run(target=a.target, tandem=a.tandem, baseline=a.baseline, prompts=prompts, batch_sizes=a.batch_sizes,
                       max_tokens=a.max_tokens, k=a.k, fallback_batch_size=a.fallback_batch_size, engine_kwargs=engine_kwargs,
                       repeat=a.repeat, tandem_router=a.tandem_router, step_times=a.step_times,
                       temperature=a.temperature, ngram=not a.no_ngram, eagle3=a.eagle3, guards=a.guards,
                       schedule=schedule)
    meta = {"target": a.target, "tandem": a.tandem, "tandem_router": a.tandem_router, "baseline": a.baseline,
            "eagle3": a.eagle3, "guards": a.guards, "k_schedule": schedule, "skip_prompts": a.skip_prompts,
            "prompts": len(prompts), "temperature": a.temperature,
            "max_tokens": a.max_tokens, "k": a.k, "repeat": a.repeat, "engine": engine_kwargs}
    table = engine.markdown(cells)
    if a.step_times:
        table += common.step_report([(c.row, c.batch_size, c.steps) for c in cells], a.plot, ("engine", "batch"),
                                    "Where an engine step's time goes")
    if a.plot:
        how = "greedy" if a.temperature == 0 else f"T={a.temperature:g}"
        engine.plot(cells, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, {how}, k={a.k}")
    common.write_report(a.json, {**meta, "cells": report.rows(cells)}, table)


def run_suite(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import suite

    paths = {k: getattr(a, k) for k in ("target", "tandem", "baseline", "eagle3", "tandem_router")}
    if a.pair:
        from tandem_vllm.demo.build import build

        manifest = build(a.pair, progress=True)
        paths = {k: paths[k] or manifest.get(k) for k in paths}
    if not paths["target"] or not paths["tandem"]:
        raise TandemError("bench suite needs --pair, or --target and --tandem (and any of --baseline, --eagle3)")
    schedule = common.k_schedule(a.k_schedule, "--k-schedule") if a.k_schedule else None
    s = suite.Suite(**paths, out=a.out, sets=tuple(a.sets.split(",")), ks=tuple(a.k), temperatures=tuple(a.temperatures),
                    batch_sizes=tuple(a.batch_sizes), num_prompts=a.num_prompts, max_tokens=a.max_tokens, repeat=a.repeat,
                    k_schedule=tuple(schedule) if schedule else None)
    engine_kwargs = dict(dtype="float32", max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                         kv_cache_memory_bytes=a.kv_cache_mib * 2**20, enforce_eager=True, seed=0)
    records = suite.run(s, engine_kwargs)
    print((a.out / "summary.md").read_text() if records else "nothing measured")


def run_schedule(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import schedule as bench
    from tandem_vllm.prompts import read_prompts

    prompts = read_prompts(a.prompts)[a.skip_prompts : a.skip_prompts + a.num_prompts]
    ks = list(range(1, a.max_k + 1))
    found, cells = bench.run(target=a.target, drafter=a.drafter, prompts=prompts, batch_sizes=a.batch_sizes, ks=ks,
                             max_tokens=a.max_tokens, engine_kwargs=common.engine_kwargs(a), repeat=a.repeat,
                             temperature=a.temperature)
    meta = {"target": a.target, "drafter": a.drafter, "prompts": len(prompts), "skip_prompts": a.skip_prompts,
            "temperature": a.temperature, "max_tokens": a.max_tokens, "ks": ks, "repeat": a.repeat}
    if a.plot:
        how = "greedy" if a.temperature == 0 else f"T={a.temperature:g}"
        bench.plot(cells, found, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, {how}")
    doc = bench.report_doc(found, cells, a.drafter, meta)
    common.write_report(a.json, doc, bench.markdown(found, cells))
    print("speculative_config:", json.dumps(doc["speculative_config"]))


def run_train(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import train as bench

    train_argv = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    if not train_argv:
        raise TandemError("give the training arguments after --, e.g. -- --kind tandem --target T --data D --steps 20")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    rows = bench.run(train_argv, modes=modes, nproc=a.nproc, out=Path(a.out))
    common.write_report(a.json, {"train_args": train_argv, "nproc": a.nproc, "rows": rows}, bench.markdown(rows))


def run_serve(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import serve as bench
    from tandem_vllm.prompts import read_prompts
    from tandem_vllm.serve.config import ServeConfig

    prompts = read_prompts(a.prompts)[: a.num_prompts]
    try:
        config = ServeConfig.parse(json.loads(a.config)) if a.config else ServeConfig()
    except ValueError:
        raise TandemError(f"--config is not JSON: {a.config!r}") from None
    if a.api_key:
        config = config.model_copy(update={"api_key": a.api_key})
    compare = a.compare_engine if a.compare_engine is not None else a.url is None
    meta = {"url": a.url or "started by the benchmark", "config": config.model_dump(exclude_none=True),
            "prompts": len(prompts), "max_tokens": a.max_tokens, "repeat": a.repeat, "client": a.client,
            "vllm_server": a.vllm_server, "rounds": a.rounds, "cold": a.cold}

    def partial(cells: list[Any]) -> None:  # what is measured so far, in case a later server fails
        report.write(a.json, {**meta, "complete": False, "cells": report.rows(cells)}, bench.markdown(cells))

    cells = bench.run(url=a.url, config=config, prompts=prompts, concurrencies=a.concurrency, max_tokens=a.max_tokens,
                      model=a.model, compare_engine=compare, repeat=a.repeat, client_kind=a.client,
                      step_times=a.step_times, vllm_server=a.vllm_server, rounds=a.rounds, cold=a.cold,
                      on_cells=partial)
    table = bench.markdown(cells)
    table += ("\nWhere the machine's CPU went (CPU ms per generated token by group of processes, reported pass; "
              "the last column is the machine's core time per token):\n\n" + bench.cpu_markdown(cells))
    if a.step_times:
        table += common.step_report([(c.path, c.concurrency, c.steps) for c in cells], a.plot,
                                    ("path", "concurrency"), "Where the engine's steps' time goes")
    if a.plot:
        bench.plot(cells, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, greedy, streaming")
    common.write_report(a.json, {**meta, "complete": True, "cells": report.rows(cells)}, table)


def add(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    be = b.add_parser("engine", help="target alone vs SPEED vs Tandem+SPEED inside vLLM, one run")
    be.add_argument("--target", required=True)
    be.add_argument("--tandem", required=True, help="Tandem drafter directory")
    be.add_argument("--baseline", help="standalone drafter directory (the SPEED row)")
    be.add_argument("--eagle3", help="EAGLE-3 head directory (`train --kind eagle3`): a row with vLLM's eagle3 method")
    be.add_argument("--tandem-router", help="the Tandem drafter with a router (`train-router --out`): adds a router "
                                            "row and makes the adaptive row use it")
    common.engine_flags(be, batch_sizes=[1, 4, 16])
    be.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    be.add_argument("--no-ngram", action="store_true", help="leave out vLLM's n-gram prompt-lookup row")
    be.add_argument("--guards", help='speculation guards as JSON, e.g. \'{"max_context": 1024, "min_acceptance": 0.3}\': '
                    "adds a guarded Tandem row (fields: max_context, min_acceptance, window, backoff)")
    be.add_argument("--fallback-batch-size", type=int, default=8,
                    help="adaptive row: stop speculating at this many running requests (0: no adaptive row)")
    be.add_argument("--k-schedule", metavar="JSON",
                    help="a `bench schedule` report: adds a Tandem row drafting k by batch size as it measured")
    be.add_argument("--repeat", type=int, default=3, help="passes per cell; the median (by tokens/s) is reported")
    be.add_argument("--step-times", metavar="DIR",
                    help="record every engine step's phases (schedule, target forward, sampler, drafting...) into DIR "
                         "and add a table of where each step's time went")
    be.set_defaults(func=run_engine)

    bsu = b.add_parser("suite", help="MT-Bench (turns 1 and 2) and HumanEval: every drafter, k and temperature, "
                       "through vLLM", description="Rows target alone, n-gram, standalone, EAGLE-3 and Tandem on the "
                       "demo pair given by --pair (or the drafters given one by one), written to --out.")
    bsu.add_argument("--pair", choices=["real", "bench", "ci"], help="a demo pair (built or reused)")
    bsu.add_argument("--target")
    bsu.add_argument("--tandem")
    bsu.add_argument("--baseline")
    bsu.add_argument("--eagle3")
    bsu.add_argument("--tandem-router")
    bsu.add_argument("--out", type=Path, required=True, help="report directory (one file per configuration; rerun resumes)")
    bsu.add_argument("--sets", default="mtbench,mtbench2,humaneval")
    bsu.add_argument("--k", type=common.int_list, default=[3, 5])
    bsu.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    bsu.add_argument("--batch-sizes", type=common.int_list, default=[1, 4, 16])
    bsu.add_argument("--num-prompts", type=int, default=16,
                     help="N prompts of each set, spread evenly over it (MT-Bench: its categories in equal shares)")
    bsu.add_argument("--max-tokens", type=int, default=128)
    bsu.add_argument("--repeat", type=int, default=1)
    bsu.add_argument("--k-schedule", metavar="JSON",
                     help="a `bench schedule` report (measured on other prompts): adds a Tandem row drafting k by batch size")
    bsu.add_argument("--max-model-len", type=int, default=2048)
    bsu.add_argument("--kv-cache-mib", type=int, default=1024)
    bsu.set_defaults(func=run_suite)

    bsc = b.add_parser("schedule", help="measure how many tokens to draft at each batch size (vLLM's dynamic-K schedule)",
                      description="Target alone and the drafter at k = 1..--max-k, every batch size, one run; writes "
                                  "the fastest k per batch size as vLLM's num_speculative_tokens_per_batch_size.")
    bsc.add_argument("--target", required=True)
    bsc.add_argument("--drafter", required=True, help="drafter directory (Tandem or standalone)")
    common.engine_flags(bsc, batch_sizes=[1, 2, 4, 8, 16, 32])
    bsc.add_argument("--max-k", type=int, default=3, help="measure k = 1..max-k")
    bsc.add_argument("--repeat", type=int, default=1, help="passes per cell; the median (by tokens/s) is reported")
    bsc.set_defaults(func=run_schedule)

    bt = b.add_parser("train", help="one training run under each launcher (one process, torchrun DDP / FSDP2, Ray Train)",
                      epilog="Everything after `--` is the `tandem-vllm train` command line, without --out / --ray / --parallel.")
    bt.add_argument("--modes", default="single,ddp,fsdp,ray", help="comma list of single, ddp, fsdp, ray")
    bt.add_argument("--nproc", type=int, default=2, help="processes (torchrun) or workers (Ray Train)")
    bt.add_argument("--out", required=True, help="directory for the runs (one sub-directory per mode)")
    bt.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    bt.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bt.set_defaults(func=run_train)
    bs = b.add_parser("serve", help="streaming clients against the HTTP API, vs the bare engine")
    bs.add_argument("--url", help="server base URL (default: start the app from --config, then stop it)")
    bs.add_argument("--config", help="ServeConfig as JSON (default {}: the demo pair with Tandem); also what the "
                    "bare engine is built from")
    bs.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line')
    bs.add_argument("--num-prompts", type=int, default=32)
    bs.add_argument("--concurrency", type=common.int_list, default=[1, 8, 32])
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--repeat", type=int, default=3, help="passes per cell; the median (by tokens/s) is reported")
    bs.add_argument("--client", choices=["raw", "openai"], default="openai",
                    help="raw: httpx + one json.loads per SSE line (least client CPU); openai: the official client")
    bs.add_argument("--model", help="model name to request (default: the first the server lists)")
    bs.add_argument("--api-key")
    bs.add_argument("--compare-engine", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the bare engine (default: when the benchmark started the app)")
    bs.add_argument("--vllm-server", action="store_true",
                    help="also vLLM's own OpenAI server (python -m vllm.entrypoints.openai.api_server) with the same "
                         "engine flags, after the app; with --rounds N the two alternate N times (A B A B)")
    bs.add_argument("--rounds", type=int, default=1, help="start and measure the app (and vLLM's server) this many times")
    bs.add_argument("--cold", action="store_true",
                    help="also measure each server's first burst after start (before the warm-up): round r sends "
                         "the r-th --concurrency value of requests at once; with --url, the server must be fresh")
    bs.add_argument("--step-times", metavar="DIR",
                    help="record the engines' steps (the app's when the benchmark starts it, and the bare engine's) "
                         "into DIR and add a table of where each step's time went")
    bs.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    bs.add_argument("--plot", help="PNG path")
    bs.set_defaults(func=run_serve)
