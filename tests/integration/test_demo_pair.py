"""The ci demo pair, end to end: built once per machine (cached by recipe hash), ~8 min on 2 cores."""

import json
import subprocess
import sys

import pytest

from tandem_vllm.decoding.speculate import ReferenceDraftModelProposer, ReferenceTandemProposer, generate
from tandem_vllm.demo.build import build
from tandem_vllm.modeling.pairing import load_baseline_for, load_tandem_for
from tandem_vllm.modeling.target import load_causal_lm
from tandem_vllm.prompts import read_prompts
from tandem_vllm.quality import quality_report, write_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    m = build("ci", progress=False)
    target = load_causal_lm(m["target"])
    prompts = read_prompts(m["heldout_prompts"])
    ids = [target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return m, target, ids


def test_demo_build_json_names_the_built_paths(pair):
    r = subprocess.run([sys.executable, "-m", "tandem_vllm.cli", "demo", "build", "--size", "ci", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(paths) == {"target", "baseline", "tandem", "eagle3", "heldout_prompts"}
    assert paths["tandem"] == pair[0]["tandem"]


def test_target_is_clearly_better_than_the_standalone_drafter_and_tandem_closes_the_gap(pair):
    """The target beats a same-size drafter that cannot see its states; the Tandem drafter, which
    reads them, predicts better than that drafter (the paper's Table 1 claim, on held-out data)."""
    ev = pair[0]["eval"]
    assert ev["target"]["ce"] < ev["baseline"]["ce"] - 0.1, ev
    assert ev["target"]["accuracy"] > ev["baseline"]["accuracy"], ev
    assert ev["tandem"]["ce"] < ev["baseline"]["ce"] and ev["tandem"]["agreement"] > ev["baseline"]["agreement"], ev


def test_at_least_50_heldout_prompts_longer_than_a_kv_block(pair):
    _, _, ids = pair
    assert len(ids) >= 50 and min(len(s) for s in ids) > 16


@pytest.mark.parametrize("kind", ["speed", "tandem"])
def test_greedy_speculation_on_the_demo_pair_equals_target_alone(pair, kind):
    m, target, ids = pair
    ids = ids[:16]
    want = generate(target.model, ids, max_new_tokens=32)
    if kind == "tandem":
        drafter = load_tandem_for(target, m["tandem"])
        got = generate(target.model, ids, max_new_tokens=32, proposer=ReferenceTandemProposer(drafter), k=5,
                       taps=drafter.cfg.tap_layers)
    else:
        got = generate(target.model, ids, max_new_tokens=32, proposer=ReferenceDraftModelProposer(load_baseline_for(target, m["baseline"]).model), k=5)
    assert got.tokens == want.tokens
    assert got.stats.tau > 1.2  # trained drafters do get drafts accepted


def test_quality_report_files(pair, tmp_path):
    m, _, _ = pair
    rep = quality_report(target_dir=m["target"], drafter_dir=m["tandem"], baseline_dir=m["baseline"],
                         prompts_file=m["heldout_prompts"], gammas=(2, 5), max_new_tokens=16, max_prompts=8, progress=False)
    write_report(rep, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["teacher_forced"]) == {"target", "baseline", "tandem"}
    assert set(saved["teacher_forced_by_source"]) == {"natural", "target greedy", "target sampled"}
    # on the target's own greedy text the target agrees with itself and its "accuracy" is 1
    assert saved["teacher_forced_by_source"]["target greedy"]["target"]["accuracy"] == 1.0
    assert len(saved["teacher_forced_by_source"]["natural"]["tandem"]["agreement_by_block_position"]) == 3
    assert set(saved["tau"]) == {"greedy", "sampled"}
    assert set(saved["tau"]["sampled"]) == {"baseline", "tandem", "ngram"}
    assert set(saved["tau"]["sampled"]["tandem"]) == {"2", "5"}
    depth = saved["depth_acceptance"]["greedy"]["tandem"]["5"]
    assert len(depth) == 5 and all(d is None or 0 <= d <= 1 for d in depth)
    md = (tmp_path / "r.md").read_text()
    assert "| Tandem / SPEED |" in md and "| n-gram lookup |" in md and "P(draft at depth d accepted" in md
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_run_decodes_through_vllm_with_tandem(pair):
    """What `make demo` runs: vLLM with the plugin, its spec-decode counters reporting Tandem's drafts."""
    import vllm  # noqa: F401  (required: a missing package fails the suite)
    r = subprocess.run([sys.executable, "-m", "tandem_vllm.cli", "demo", "run", "--k", "3", "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("vLLM + Tandem+SPEED") and "tau=" in summary, summary
    assert float(summary.split("tau=")[1].split()[0]) > 1.0, summary
