"""The engine-step clock behind `bench engine --step-times`: what it records, what it leaves out, and
how a benchmark cell's steps are summarised."""

from __future__ import annotations

import itertools

import pytest

from tandem_vllm.bench import steps
from tandem_vllm.vllm_adapter import profiler


class Ticks:
    """A perf_counter that advances by one millisecond per reading."""

    def __init__(self) -> None:
        self.n = itertools.count()

    def __call__(self) -> float:
        return next(self.n) * 1e-3


def one_step(clock: profiler.StepClock, *, tokens: int, drafts: int = 0, passes: int = 0) -> None:
    """An engine step as the hooks drive it: schedule, the runner's execute + sample (with drafting),
    update, post."""
    with clock.engine_step():
        with clock.phase("schedule"):
            clock.note("engine", reqs=1, tokens=tokens, drafts=drafts)
        clock.worker_begin()
        with clock.phase("execute"), clock.phase("target"):
            pass
        with clock.phase("sample"):
            with clock.phase("sampler"):
                pass
            with clock.phase("draft"):
                for _ in range(passes):
                    clock.add("worker", drafter=2e-3, passes=1)
        clock.worker_end()
        with clock.phase("update"):
            pass
        with clock.phase("post"):
            pass


def test_steps_are_recorded_per_process_and_summarised(tmp_path, monkeypatch):
    monkeypatch.setenv(steps.ENV, str(tmp_path))
    clock = profiler.StepClock(now=Ticks())
    one_step(clock, tokens=4, drafts=3, passes=3)
    # on disk as the step ends: vLLM kills an engine's worker processes when it stops at once
    assert sorted(r["kind"] for r in steps.read(tmp_path)) == ["engine", "worker"]
    one_step(clock, tokens=0)  # a poll that ran nothing: no engine record
    one_step(clock, tokens=4, drafts=3, passes=3)

    records = steps.read(tmp_path)
    assert [r["kind"] for r in records].count("engine") == 2
    assert [r["kind"] for r in records].count("worker") == 3  # the runner ran for the poll too
    s = steps.summary(records)
    assert s["steps"] == 2 and s["tokens"] == 4 and s["drafts"] == 3 and s["passes"] == 2  # (3 + 0 + 3) / 3
    assert s["drafter"] == 4.0  # ms: (6 + 0 + 6) / 3
    # nested phases read one tick more outside than inside
    assert s["execute"] > s["target"] > 0 and s["sample"] > s["draft"] > 0
    assert s["ipc"] == pytest.approx(s["total"] - sum(s[p] for p in ("schedule", "update", "post", "execute", "sample")))
    assert s["gap"] > 0


def test_a_window_selects_one_cells_steps(tmp_path):
    (tmp_path / "steps-1.jsonl").write_text(
        '{"kind": "engine", "t": 10.0, "total": 0.010, "tokens": 1}\n'
        '{"kind": "engine", "t": 20.0, "total": 0.030, "tokens": 1}\n'
    )
    (tmp_path / "steps-2.jsonl").write_text('{"kind": "worker", "t": 20.5, "execute": 0.020, "target": 0.018}\n')
    assert steps.summary(steps.read(tmp_path, 15.0, 30.0))["total"] == 30.0
    assert steps.summary(steps.read(tmp_path, 15.0, 30.0))["target"] == 18.0
    assert steps.summary(steps.read(tmp_path, 0.0, 15.0))["target"] == 0.0
    assert steps.per_window(tmp_path, [(15.0, 30.0), (0.0, 15.0)]) == [
        steps.summary(steps.read(tmp_path, 15.0, 30.0)), steps.summary(steps.read(tmp_path, 0.0, 15.0))]
    assert steps.summary([]) == {"steps": 0}


def test_no_directory_in_the_environment_records_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(steps.ENV, raising=False)
    clock = profiler.StepClock(now=Ticks())
    one_step(clock, tokens=4)
    assert clock.directory is None and not list(tmp_path.iterdir())


def test_the_table_has_a_line_per_cell():
    s = steps.summary([{"kind": "engine", "t": 1.0, "total": 0.02, "tokens": 16, "reqs": 16}])
    table = steps.markdown([("target alone", 16, s), ("Tandem", 16, s)])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| target alone | 16 | 1 | 16.00 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_recording_sets_the_variable_for_engines_started_inside_and_restores_it(tmp_path, monkeypatch):
    monkeypatch.setenv(steps.ENV, "/elsewhere")
    with steps.recording(tmp_path / "a"):
        assert steps.os.environ[steps.ENV] == str((tmp_path / "a").resolve())
    assert steps.os.environ[steps.ENV] == "/elsewhere"
    monkeypatch.delenv(steps.ENV)
    with pytest.raises(RuntimeError), steps.recording(tmp_path / "b"):
        raise RuntimeError("an engine failed")
    assert steps.ENV not in steps.os.environ
    with steps.recording(None):
        assert steps.ENV not in steps.os.environ


def test_the_plot_stacks_every_cells_phases(tmp_path):
    s = steps.summary([{"kind": "engine", "t": 1.0, "total": 0.03, "tokens": 4, "schedule": 0.001},
                       {"kind": "worker", "t": 1.0, "execute": 0.02, "target": 0.018, "sample": 0.008,
                        "sampler": 0.001, "draft": 0.006, "drafter": 0.004, "passes": 3}])
    steps.plot([("Tandem", 1, s), ("no steps", 4, {"steps": 0})], tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").stat().st_size > 0
