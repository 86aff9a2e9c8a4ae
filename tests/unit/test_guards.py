"""Per-request speculation guards: settings, the acceptance window and back-off, and the scheduler
patch on stand-in classes (no engine)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter import guards, patch_scheduler
from tandem_vllm.vllm_adapter.guards import Guards, GuardState


def test_server_defaults_and_request_overrides():
    assert not guards.server_defaults("").active
    g = guards.server_defaults('{"max_context": 2048, "min_acceptance": 0.25}')
    assert (g.max_context, g.min_acceptance, g.window, g.backoff) == (2048, 0.25, 32, 16) and g.active
    mine = guards.for_request(g, {"speculate_max_context": "0", "speculate_window": 8, "other": 1})
    assert (mine.max_context, mine.min_acceptance, mine.window) == (0, 0.25, 8)
    assert guards.for_request(g, {"speculate_min_acceptance": "lots"}) == g  # a bad override keeps the defaults
    assert guards.for_request(g, None) is g


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("{", "is not JSON"), ("[1]", "must be a JSON object"), ('{"max_ctx": 5}', "unknown guard max_ctx"),
     ('{"min_acceptance": 2}', "min_acceptance <= 1"), ('{"window": "many"}', "invalid literal")],
)
def test_bad_server_defaults_are_one_line_errors(value, fragment):
    with pytest.raises(TandemError, match=fragment):
        guards.server_defaults(value)


def test_the_context_guard_stops_drafts_at_n_tokens():
    st = GuardState(Guards(max_context=100))
    assert st.allows_drafts(99) and not st.allows_drafts(100) and not st.allows_drafts(500)


def test_the_acceptance_guard_fires_below_the_threshold_backs_off_and_retries():
    st = GuardState(Guards(min_acceptance=0.5, window=9, backoff=2))
    for _ in range(2):
        st.observe(3, 0)
    assert st.allows_drafts(10)  # 6 draft tokens < window: not judged yet
    st.observe(3, 1)  # 1 / 9 accepted
    assert not st.allows_drafts(10) and st.fired == 1
    assert not st.allows_drafts(10)  # back-off step 1 (of 2) ...
    assert st.allows_drafts(10)  # ... and drafting resumes with a fresh window
    for _ in range(4):
        st.observe(3, 3)
    assert len(st.recent) == 3  # the window keeps just enough steps for 9 draft tokens
    assert st.allows_drafts(10) and st.fired == 1


def _scheduler(requests):
    class Scheduler:
        num_spec_tokens = 3

        def __init__(self):
            self.running = list(requests.values())
            self.requests = requests
            self.scheduled = []

        def schedule(self):
            self.scheduled.append({r.request_id: list(r.spec_token_ids) for r in self.running})
            for r in self.running:
                r.spec_token_ids = [7, 7, 7]  # the drafter drafts again for the next step
            return SimpleNamespace(num_spec_tokens_to_schedule=3)

        def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                     num_invalid_spec_tokens, request_id):
            return None

        def update_draft_token_ids(self, draft_token_ids):  # vLLM's: a grammar keeps its longest valid prefix (9: invalid)
            for rid, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
                r = self.requests[rid]
                r.spec_token_ids = list(itertools.takewhile(lambda t: t != 9, ids)) if r.use_structured_output else ids

    patch_scheduler.speculation_guards(Scheduler)
    return Scheduler()


def _request(rid, num_tokens, structured=False, **extra):
    return SimpleNamespace(request_id=rid, num_tokens=num_tokens, spec_token_ids=[7, 7, 7],
                           sampling_params=SimpleNamespace(extra_args=extra or None),
                           use_structured_output=structured, is_prefill_chunk=False)


def test_the_scheduler_patch_applies_each_requests_guards(monkeypatch):
    monkeypatch.setenv(guards.ENV, '{"min_acceptance": 0.5, "window": 6, "backoff": 2}')
    reqs = {"poor": _request("poor", 10), "good": _request("good", 10),
            "long": _request("long", 900, speculate_max_context=512), "free": _request("free", 10, speculate_min_acceptance=0)}
    s = _scheduler(reqs)
    for _ in range(2):  # two verified steps: "poor" and "free" accept nothing, "good" everything
        s.schedule()
        for rid, accepted in (("poor", 0), ("good", 3), ("free", 0)):
            s.make_spec_decoding_stats(None, 3, accepted, None, request_id=rid)
    s.schedule()  # the guard fires for "poor": scheduled without drafts, for 2 steps
    s.schedule()
    s.schedule()  # drafting again
    drafted = {rid: [bool(step[rid]) for step in s.scheduled] for rid in reqs}
    assert drafted["poor"] == [True, True, False, False, True]
    assert drafted["good"] == drafted["free"] == [True] * 5
    assert drafted["long"] == [False] * 5  # its own max_context


def test_guards_are_off_without_settings(monkeypatch):
    monkeypatch.delenv(guards.ENV, raising=False)
    reqs = {"a": _request("a", 10_000)}
    s = _scheduler(reqs)
    for _ in range(3):
        s.schedule()
        s.make_spec_decoding_stats(None, 3, 0, None, request_id="a")
    assert all(step["a"] for step in s.scheduled)


def test_a_batch_that_may_not_verify_drafts_drafts_nothing(monkeypatch):
    """Every running request past its max_context: the step drafts nothing (K = 0), so a Tandem
    drafter only writes context K/V instead of drafting drafts nobody will verify."""
    monkeypatch.setenv(guards.ENV, '{"max_context": 100}')
    s = _scheduler({"a": _request("a", 50), "b": _request("b", 97)})
    assert s.schedule().num_spec_tokens_to_schedule == 3  # "a" may still verify next step
    s.running = [s.requests["b"]]
    assert s.schedule().num_spec_tokens_to_schedule == 0  # "b" reaches 100 within this step


def test_drafts_a_grammar_refuses_count_as_rejected(monkeypatch):
    """A structured-output request whose grammar refuses its drafts never has them verified, so vLLM's
    spec-decode counts leave them out; the acceptance guard counts them as drafted and rejected and
    stops the drafter paying for them. Drafts the grammar allows count as vLLM verifies them."""
    monkeypatch.setenv(guards.ENV, '{"min_acceptance": 0.5, "window": 6, "backoff": 2}')
    reqs = {"refused": _request("refused", 10, structured=True), "allowed": _request("allowed", 10, structured=True),
            "free": _request("free", 10)}
    s = _scheduler(reqs)
    s.requests["refused"].spec_token_ids = []
    drafts = SimpleNamespace(req_ids=["refused", "allowed", "free"], draft_token_ids=[[9, 9, -1], [7, 7, 7], [9, 9, 9]])
    for _ in range(3):
        s.update_draft_token_ids(SimpleNamespace(req_ids=drafts.req_ids, draft_token_ids=[list(d) for d in drafts.draft_token_ids]))
        s.schedule()
        for rid in ("allowed", "free"):
            s.make_spec_decoding_stats(None, 3, 3, None, request_id=rid)
    states = {rid: r._tandem_guard for rid, r in reqs.items()}
    assert states["refused"].fired == 1  # after 3 steps of 2 refused drafts each (the -1 pad is no draft)
    assert states["allowed"].fired == states["free"].fired == 0


def test_a_back_off_ends_when_every_request_sat_it_out_without_drafts(monkeypatch):
    """One running request, paused by the acceptance guard: its steps run with K = 0, so it has no
    drafts to withhold -- the back-off must still count those steps and drafting resume after them
    (it stayed off for the rest of the request before)."""
    monkeypatch.setenv(guards.ENV, '{"min_acceptance": 0.5, "window": 3, "backoff": 3}')
    s = _scheduler({"a": _request("a", 10)})
    ks = []
    for step in range(7):
        out = s.schedule()
        ks.append(out.num_spec_tokens_to_schedule)
        if step == 0:
            s.make_spec_decoding_stats(None, 3, 0, None, request_id="a")
        for r in s.running:  # what the drafter hands back: k drafts, none after a K = 0 step
            r.spec_token_ids = [7] * out.num_spec_tokens_to_schedule
    assert ks == [3, 0, 0, 3, 3, 3, 3], ks
