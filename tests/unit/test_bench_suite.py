"""`bench suite`: which rows each configuration runs, what a rerun reuses, and what the summary says."""

import json

import pytest

from tandem_vllm.bench import engine, suite
from tandem_vllm.bench.engine import rows_for
from tandem_vllm.errors import TandemError
from tandem_vllm.prompts import Prompt

SCHEDULE = ((1, 2, 2), (3, 8, 1), (9, 1 << 20, 0))


def make(tmp_path, **over):
    kw = dict(target="/d/target", tandem="/d/tandem", baseline="/d/base", eagle3=None, tandem_router=None,
              out=tmp_path, sets=("mtbench",), ks=(3,), temperatures=(0.0,), batch_sizes=(1, 4))
    return suite.Suite(**{**kw, **over})


def fake_engine(calls):
    def run(**kw):
        calls.append(kw)
        rows = rows_for(tandem=kw["tandem"], baseline=kw["baseline"], k=kw["k"], fallback_batch_size=None,
                        eagle3=kw["eagle3"], schedule=kw["schedule"])
        return [engine.Cell(row=r.name, batch_size=b, requests=1, tokens=8, seconds=1.0, tokens_per_s=10.0 * (i + 1),
                            ttft_ms_mean=1.0, itl_ms_p50=1.0, itl_ms_p95=1.0, tau=1.0 + i / 10, acceptance_rate=None,
                            drafts=0, lossless=i != 2, speedup=float(i + 1))
                for i, r in enumerate(rows) for b in kw["batch_sizes"]]
    return run


@pytest.fixture
def measured(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(engine, "run", fake_engine(calls))
    monkeypatch.setattr(suite, "workloads", lambda s, kw: {n: [Prompt("p")] for n in s.sets})
    monkeypatch.setattr(suite, "plot", lambda rows, path: None)
    return calls


def test_a_schedule_adds_its_row_and_the_summary_names_it(tmp_path, measured):
    records = suite.run(make(tmp_path, k_schedule=SCHEDULE), {})
    assert measured[0]["schedule"] == list(SCHEDULE)
    drafters = [c["row"] for c in records[0]["cells"] if c["batch_size"] == 4]
    assert [suite.short(r) for r in drafters] == ["target", "n-gram", "standalone", "Tandem", "Tandem k schedule"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| Tandem τ / speed-up | Tandem k schedule τ / speed-up |" in summary and "### batch 4" in summary
    # the standalone row (third) was not identical to target alone: the summary says so
    assert "| NO |" in summary


def test_a_rerun_reuses_what_was_measured_with_the_same_settings(tmp_path, measured):
    suite.run(make(tmp_path), {})
    suite.run(make(tmp_path), {})
    assert len(measured) == 1
    suite.run(make(tmp_path, temperatures=(0.0, 1.0)), {})  # a new configuration is measured, the old one kept
    assert len(measured) == 2 and measured[1]["temperature"] == 1.0
    records = suite.run(make(tmp_path, ks=(5,), sets=("humaneval",)), {})
    # the summary covers what every run measured into the directory
    assert [(r["set"], r["k"], r["temperature"]) for r in records] == [
        ("mtbench", 3, 0.0), ("mtbench", 3, 1.0), ("humaneval", 5, 0.0)]
    assert "| humaneval | 5 | 0 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("change,named", [
    (dict(baseline=None), "baseline '/d/base' -> None"),
    (dict(k_schedule=SCHEDULE), "k_schedule None -> [[1, 2, 2]"),
    (dict(batch_sizes=(1, 4, 16)), "batch_sizes [1, 4] -> [1, 4, 16]"),
])
def test_a_file_measured_with_other_settings_is_refused_not_mixed_in(tmp_path, measured, change, named):
    suite.run(make(tmp_path), {})
    with pytest.raises(TandemError, match="mtbench-k3-t0.json was measured with other settings") as e:
        suite.run(make(tmp_path, **change), {})
    assert named in str(e.value) and "another --out" in str(e.value)
    assert len(measured) == 1


def test_records_written_by_an_older_suite_without_a_schedule_field_are_reused(tmp_path, measured):
    suite.run(make(tmp_path), {})
    path = tmp_path / "mtbench-k3-t0.json"
    doc = json.loads(path.read_text())
    del doc["suite"]["k_schedule"]
    path.write_text(json.dumps(doc))
    suite.run(make(tmp_path), {})
    assert len(measured) == 1


def test_unknown_sets_and_prompt_counts_are_refused(tmp_path):
    with pytest.raises(TandemError, match="choose from mtbench, mtbench2, humaneval"):
        make(tmp_path, sets=("mtbench3",))
    with pytest.raises(TandemError, match="take 1..80"):
        make(tmp_path, num_prompts=81)


def test_questions_spread_over_every_mtbench_category():
    from tandem_vllm.evalsets import mtbench_questions, second_turns

    chosen = suite.questions("mtbench", 8)
    categories = [mtbench_questions()[i]["category"] for i in chosen]
    assert len(set(categories)) == 8  # the first 8 would all be writing
    assert suite.questions("humaneval", 4) == [0, 41, 82, 123]
    chats = second_turns(["answer a", "answer b"], chosen[:2])
    assert chats[1][0]["content"] == mtbench_questions()[chosen[1]]["turns"][0]
    assert chats[1][1] == {"role": "assistant", "content": "answer b"}
    with pytest.raises(TandemError, match="2 turn-1 answers for MT-Bench questions"):
        second_turns(["a", "b"], [0])


def test_a_file_measured_on_other_questions_is_refused(tmp_path, measured):
    suite.run(make(tmp_path), {})
    path = tmp_path / "mtbench-k3-t0.json"
    doc = json.loads(path.read_text())
    doc["questions"] = list(range(16))  # the first 16, as the suite once chose
    path.write_text(json.dumps(doc))
    with pytest.raises(TandemError, match="questions"):
        suite.run(make(tmp_path), {})
