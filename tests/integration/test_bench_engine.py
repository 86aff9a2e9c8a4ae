"""`tandem-vllm bench engine` end to end on the ci pair: every row runs, reproduces the target's greedy
output, and reports the columns the README table is built from."""

import json
import os

import pytest
import vllm  # noqa: F401  (required: a missing package fails the suite)

from tandem_vllm.bench import steps
from tandem_vllm.cli import main
from tandem_vllm.demo.build import build

pytestmark = pytest.mark.slow


def test_bench_engine_reports_every_row_lossless(tmp_path, capsys):
    demo = build("ci", progress=False)
    out = tmp_path / "engine.json"
    main([
        "bench", "engine", "--target", demo["target"], "--tandem", demo["tandem"], "--baseline", demo["baseline"],
        "--prompts", demo["heldout_prompts"], "--num-prompts", "3", "--batch-sizes", "1,2", "--max-tokens", "12",
        "--repeat", "1", "--fallback-batch-size", "2", "--kv-cache-mib", "128", "--json", str(out), "--plot", str(tmp_path / "e.png"),
        "--step-times", str(tmp_path / "steps"),
    ])
    report = json.loads(out.read_text())
    cells = report["cells"]
    rows = list(dict.fromkeys(c["row"] for c in cells))
    target, ngram, speed, tandem, adaptive = rows
    assert ngram.startswith("n-gram") and len(cells) == 10
    assert all(c["lossless"] for c in cells)
    assert all(c["tokens"] == 3 * 12 for c in cells)
    by = {(c["row"], c["batch_size"]): c for c in cells}
    assert by[(target, 1)]["tau"] == 1.0 and by[(target, 1)]["speedup"] == 1.0
    assert all(by[(r, 1)]["acceptance_rate"] is not None for r in (speed, tandem, adaptive))
    # tau counts every decode step, drafted or not, so the decode steps (tokens - requests) / tau are
    # at least the steps that drafted (less the drafting steps of the last pass whose tokens were cut)
    for c in cells:
        assert c["tau"] >= 1.0 and (c["tokens"] - 3) / c["tau"] >= c["drafts"] - 3, c
    # the adaptive row stops drafting whenever the fallback batch size is running
    assert by[(adaptive, 2)]["drafts"] < by[(tandem, 2)]["drafts"]
    assert by[(adaptive, 1)]["drafts"] == by[(tandem, 1)]["drafts"]
    assert (tmp_path / "e.png").stat().st_size > 0
    assert "| engine | batch |" in capsys.readouterr().out

    # where the steps' time went, measured inside the engine's processes
    assert steps.ENV not in os.environ, "engines started after the benchmark must not time their steps"
    assert all(c["steps"]["steps"] > 0 and c["steps"]["target"] > 0 for c in cells)
    assert all(c["steps"]["passes"] == 0 and c["steps"]["drafts"] == 0 for c in cells if c["row"] == target)
    assert all(c["steps"]["passes"] == 0 for c in cells if c["row"] == ngram)  # lookup, no drafter model
    # k = 3 drafting passes per step with fixed k; the fallback's K = 0 steps run the context pass only
    assert all(2.5 <= by[(r, b)]["steps"]["passes"] <= 3 for r in (speed, tandem) for b in (1, 2))
    assert by[(adaptive, 2)]["steps"]["passes"] < by[(tandem, 2)]["steps"]["passes"]
    assert "↳ target fwd" in (tmp_path / "engine.md").read_text()
    assert (tmp_path / "e_steps.png").stat().st_size > 0


def test_bench_engine_rejects_a_bad_batch_size_list(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "engine", "--target", "t", "--tandem", "d", "--prompts", "p", "--json", "o",
              "--batch-sizes", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
