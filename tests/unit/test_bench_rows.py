"""Which rows `bench engine` runs, and with what speculative config."""

import json
import re

import pytest

from tandem_vllm.bench.engine import rows_for
from tandem_vllm.bench.schedule import pick
from tandem_vllm.errors import TandemError
from tandem_vllm.speculation import UNBOUNDED, drafter_config, read_k_schedule
from tandem_vllm.vllm_adapter.engine import validate_k_schedule


def validate(raw, where):
    return validate_k_schedule(raw, where)


def read(source):
    return validate_k_schedule(read_k_schedule(source), str(source))


def speculative_config(drafter, schedule):
    return drafter_config(drafter, 0, schedule)


def test_rows_without_and_with_a_router():
    plain = rows_for(tandem="/d/tandem", baseline="/d/base", k=3, fallback_batch_size=8)
    assert [r.name for r in plain] == ["target alone", "n-gram lookup (k=3)", "SPEED (standalone drafter, k=3)",
                                       "Tandem+SPEED (k=3)", "Tandem+SPEED adaptive (k=3, off at batch >= 8)"]
    assert plain[1].speculative_config == {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5,
                                           "num_speculative_tokens": 3}
    assert plain[4].speculative_config["model"] == "/d/tandem"
    assert plain[4].speculative_config["num_speculative_tokens_per_batch_size"] == [(1, 7, 3), (8, 1 << 20, 0)]
    # sampled requests draft from the drafters' distributions (greedy ones still take the argmax)
    assert all(r.speculative_config["draft_sample_method"] == "probabilistic" for r in plain[2:])
    routed = rows_for(tandem="/d/tandem", baseline=None, k=3, fallback_batch_size=8, tandem_router="/d/adaptive",
                      ngram=False)
    assert [r.name for r in routed] == ["target alone", "Tandem+SPEED (k=3)", "Tandem+SPEED router (k<=3)",
                                        "Tandem+SPEED adaptive (router, k<=3, off at batch >= 8)"]
    sampled = {"draft_sample_method": "probabilistic"}
    assert routed[1].speculative_config == {"model": "/d/tandem", "num_speculative_tokens": 3, **sampled}  # stays fixed
    assert routed[2].speculative_config == {"model": "/d/adaptive", "num_speculative_tokens": 3, **sampled}
    assert routed[3].speculative_config["model"] == "/d/adaptive"
    assert [r.name for r in rows_for(tandem="t", baseline=None, k=2, fallback_batch_size=0, ngram=False)] == [
        "target alone", "Tandem+SPEED (k=2)"]


def test_schedule_picks_the_fastest_k_per_batch_size_and_zero_where_target_alone_wins():
    tps = {0: {1: 75.0, 4: 260.0, 16: 460.0, 32: 520.0},
           1: {1: 100.0, 4: 300.0, 16: 510.0, 32: 500.0},
           2: {1: 135.0, 4: 340.0, 16: 505.0, 32: 480.0},
           3: {1: 148.0, 4: 337.0, 16: 490.0, 32: 470.0}}
    # log-midpoints: 1|4 -> 2, 4|16 -> 8, 16|32 -> 22
    assert pick(tps) == [(1, 2, 3), (3, 8, 2), (9, 22, 1), (23, UNBOUNDED, 0)]
    assert validate(pick(tps), "x") == pick(tps)  # vLLM's rules hold for what pick writes
    tps[1][16] = 505.0  # a tie goes to the smaller k
    assert pick(tps)[2] == (9, 22, 1)
    # the same k on neighbouring sizes merges into one range
    assert pick({0: {1: 1.0, 4: 1.0, 16: 1.0}, 1: {1: 2.0, 4: 3.0, 16: 3.0}}) == [(1, UNBOUNDED, 1)]
    with pytest.raises(TandemError, match="target alone"):
        pick({1: {1: 1.0}})
    with pytest.raises(TandemError, match=r"\(2, 4\)"):
        pick({0: {1: 1.0, 4: 1.0}, 2: {1: 2.0}})


def test_schedule_speculative_config_and_row(tmp_path):
    sched = [(1, 2, 3), (3, UNBOUNDED, 1)]
    assert speculative_config("/d/t", sched) == {
        "model": "/d/t", "num_speculative_tokens": 3, "num_speculative_tokens_per_batch_size": [[1, 2, 3], [3, UNBOUNDED, 1]],
        "draft_sample_method": "probabilistic"}
    assert speculative_config("/d/t", [(1, UNBOUNDED, 0)]) == {}  # nothing pays: serve the target alone
    rows = rows_for(tandem="/d/t", baseline=None, k=3, fallback_batch_size=0, ngram=False, schedule=sched)
    assert rows[-1].name == "Tandem+SPEED measured schedule (batch:k 1-2:3, 3-:1)"
    assert rows[-1].speculative_config == speculative_config("/d/t", sched)
    report = tmp_path / "s.json"
    report.write_text(json.dumps({"schedule": [[1, 2, 3], [3, UNBOUNDED, 1]]}))
    assert read(report) == sched


@pytest.mark.parametrize("bad", [[[2, 4, 1]], [[1, 4, 1], [4, 8, 0]], [[1, 4, -1]], [[1, 4]], "x", []])
def test_schedule_refuses_what_vllm_refuses(bad, tmp_path):
    with pytest.raises(TandemError):
        validate(bad, "--k-schedule")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TandemError, match="cannot read a k schedule"):
        read(tmp_path / "bad.json")


def test_cpu_accounting_groups_processes_by_role_and_counts_new_ones_whole():
    import os

    from tandem_vllm.bench.measure import _cpu_group, cpu_by_group

    assert _cpu_group(os.getpid(), "python", []) == "benchmark client"
    assert _cpu_group(1, "ray::ServeReplica", ["ray::ServeReplica:tandem:TandemServer"]).startswith("Serve replica")
    assert _cpu_group(1, "python", ["python", "-m", "vllm.entrypoints.openai.api_server"]).startswith("vLLM API server")
    assert _cpu_group(1, "VLLM::EngineCore", ["VLLM::EngineCore"]) == "vLLM engine core"
    assert _cpu_group(1, "raylet", ["/x/raylet", "--node"]) == "Ray daemons"
    assert _cpu_group(1, "ray::ProxyActor", ["ray::ProxyActor"]) == "Serve proxy"
    assert _cpu_group(1, "ray::ServeController", ["ray::ServeController"]) == "Serve controller"
    before = {1: ("vLLM engine core", 10.0), 2: ("Ray daemons", 1.0)}
    after = {1: ("vLLM engine core", 12.5), 2: ("Ray daemons", 1.0), 3: ("other", 0.25)}
    assert cpu_by_group(before, after) == {"vLLM engine core": 2.5, "other": 0.25}


def test_guards_add_a_guarded_row_for_every_drafter_they_act_on():
    from tandem_vllm.vllm_adapter.guards import ENV

    g = '{"min_acceptance": 0.3}'
    rows = rows_for(tandem="/d/tandem", baseline=None, k=3, fallback_batch_size=0, guards=g)
    assert [r.name for r in rows] == ["target alone", "n-gram lookup (k=3)", f"n-gram lookup guarded (k=3, {g})",
                                      "Tandem+SPEED (k=3)", f"Tandem+SPEED guarded (k=3, {g})"]
    assert rows[2].speculative_config == rows[1].speculative_config and rows[2].env == {ENV: g}
    assert rows[4].speculative_config == rows[3].speculative_config and rows[4].env == {ENV: g}
    assert not rows[1].env and not rows[3].env


def test_a_workload_line_may_constrain_its_output_with_a_regex(tmp_path):
    from tandem_vllm.prompts import Prompt, read_workload

    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "def f():"}\n\n{"prompt": "key = \\"", "regex": "[0-9a-f]{8}", "temperature": 1}\n')
    assert read_workload(path) == [Prompt("def f():"), Prompt('key = "', "[0-9a-f]{8}", 1.0)]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "has no prompts"), ("{oops\n", ":1 is not valid JSON"), ('{"regex": "a"}\n', ':1 has no "prompt" string'),
     ('{"prompt": "x", "regex": "[a-"}\n', ':1: "regex" is not a regular expression'),
     ('{"prompt": "x", "temperature": "hot"}\n', ':1: "temperature" must be a number from 0 to 10')],
)
def test_a_bad_workload_is_one_line_naming_the_line(tmp_path, text, fragment):
    from tandem_vllm.prompts import read_workload

    path = tmp_path / "w.jsonl"
    path.write_text(text)
    with pytest.raises(TandemError, match=re.escape(fragment)):
        read_workload(path)
    with pytest.raises(TandemError, match="expected an existing .jsonl file"):
        read_workload(tmp_path / "w.txt")


def test_the_app_is_compared_with_vllms_server_burst_for_burst():
    """A first burst after start is compared with vLLM's first burst at the same concurrency, a warm
    cell with the warm cells (mean over rounds), never one with the other."""
    from tandem_vllm.bench.serve import Cell, compare_with_vllm_server, markdown

    def cell(path, c, cold, tps, ttft):
        return Cell(path=path, concurrency=c, cold=cold, requests=c, errors=0, tokens=10, seconds=1.0,
                    tokens_per_s=tps, ttft_ms_mean=ttft, ttft_ms_p50=ttft, itl_ms_p50=1.0, itl_ms_p95=2.0)

    cells = [cell("serve (HTTP), round 1", 8, True, 50.0, 600.0), cell("serve (HTTP), round 1", 8, False, 100.0, 90.0),
             cell("vLLM's own server (HTTP), round 1", 8, True, 60.0, 300.0),
             cell("vLLM's own server (HTTP), round 1", 8, False, 100.0, 80.0),
             cell("vLLM's own server (HTTP), round 2", 8, False, 150.0, 100.0)]
    compare_with_vllm_server(cells)
    cold, warm = cells[0], cells[1]
    assert (cold.vs_vllm_server, cold.ttft_vs_vllm_server) == (round(50 / 60, 3), 2.0)
    assert (warm.vs_vllm_server, warm.ttft_vs_vllm_server) == (0.8, 1.0)
    assert cells[2].vs_vllm_server is None  # vLLM's own cells are the reference
    table = markdown(cells)
    assert "| serve (HTTP), round 1 | cold | 8 |" in table and "| 0.83× | 2.00× |" in table
