"""``tandem-vllm eval``: the quality report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tandem_vllm.errors import TandemError


def run(a: argparse.Namespace) -> None:
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


def add(sub: Any) -> None:
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
    e.set_defaults(func=run)
