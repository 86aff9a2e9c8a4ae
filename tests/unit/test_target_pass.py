"""One target pass, many drafters: what the pass stores, resuming it, refusing a foreign one, training
the three drafters from it (draft vocabulary, shared frozen target weights, layers from the target)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem_vllm.config import TandemConfig
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.pairing import load_eagle3_for, load_tandem_for
from tandem_vllm.modeling.target import load_causal_lm
from tandem_vllm.train.args import ModelDims, TrainArgs
from tandem_vllm.train.loss import TopK, distil_loss, head_ce, head_distil, head_tv, tv_distance
from tandem_vllm.train.target_pass import PassData, PassSettings, run
from tandem_vllm.train.trainer import train

TAPS = (0, 1, 2)


@pytest.fixture(scope="module")
def gen_dir(train_workdir, tmp_path_factory):
    from tandem_vllm.train.gen_data import GenSettings, generate

    out = tmp_path_factory.mktemp("gen") / "gen"
    generate(GenSettings(target=train_workdir / "target", out=out, corpus=(train_workdir / "data.txt",), num_prompts=20,
                         prompt_tokens=(8, 16), temperatures=(0.0, 1.0), max_tokens=20, shard_size=10, backend="torch",
                         progress=False))
    return out


def _settings(root, gen, out, **kw):
    base = dict(target=root / "target", gen_data=(gen,), out=out, taps=TAPS, top_k=8, seq_len=32, shard_rows=15,
                batch_size=4, device="cpu", progress=False)
    return PassSettings(**(base | kw))


@pytest.fixture(scope="module")
def pass_dir(train_workdir, gen_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pass") / "pass"
    run(_settings(train_workdir, gen_dir, out))
    return out


def test_the_pass_stores_what_a_live_forward_computes(train_workdir, pass_dir):
    lm = load_causal_lm(train_workdir / "target")
    data = PassData(pass_dir, lm.identity)
    assert len(data) == 40 and data.manifest["shards"] == 3 and data.manifest["pass"]["tokens_per_s"] > 0
    idx = np.array([0, 17, 39])  # rows of three shards
    got = data.batch(idx, (2, 0))
    with torch.no_grad():
        out = lm.model(input_ids=got["tokens"][:, :-1], output_hidden_states=True)
    want_taps = torch.stack([out.hidden_states[2], out.hidden_states[0]], dim=2)
    torch.testing.assert_close(got["taps"], want_taps, atol=2e-3, rtol=2e-3)  # float16 on disk
    top = torch.log_softmax(out.logits, -1).topk(8, -1)
    assert torch.equal(got["topk_ids"][..., 0], top.indices[..., 0])
    torch.testing.assert_close(got["topk_logp"], top.values, atol=2e-2, rtol=2e-3)
    assert got["mask"].sum() > 0 and got["mask"].shape == (3, 32)


def test_a_rerun_redoes_only_missing_shards(train_workdir, gen_dir, pass_dir, tmp_path):
    copy = tmp_path / "pass"
    shutil.copytree(pass_dir, copy)
    before = np.load(copy / "shard-00001" / "taps.npy")
    stamp = (copy / "shard-00000" / "taps.npy").stat().st_mtime_ns
    shutil.rmtree(copy / "shard-00001")
    (copy / ".shard-00002.tmp").mkdir()  # a killed write: ignored, the complete shard 2 stays
    run(_settings(train_workdir, gen_dir, copy))
    np.testing.assert_array_equal(np.load(copy / "shard-00001" / "taps.npy"), before)
    assert (copy / "shard-00000" / "taps.npy").stat().st_mtime_ns == stamp
    with pytest.raises(TandemError, match="other settings.*top_k"):
        run(_settings(train_workdir, gen_dir, copy, top_k=4))


def test_a_pass_of_another_target_or_with_missing_taps_is_refused(train_workdir, pass_dir, tmp_path):
    from tandem_vllm.demo.corpus import EOS  # noqa: F401  (the same tokenizer, another model)

    other = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(train_workdir / "target" / "tokenizer.json", tmp_path / "other")
    shutil.copy(train_workdir / "target" / "tokenizer_config.json", tmp_path / "other")
    with pytest.raises(TandemError, match="hidden_size 48 != 64"):
        PassData(pass_dir, load_causal_lm(tmp_path / "other").identity)
    with pytest.raises(TandemError, match="reads \\[3\\]"):
        PassData(pass_dir, load_causal_lm(train_workdir / "target").identity, need_taps=(0, 3))


def _args(root, pass_dir, kind, out, **kw):
    base = dict(kind=kind, out=out, data=(), target=root / "target", target_pass=pass_dir, seq_len=32, batch_size=4,
                steps=4, warmup=1, eval_every=2, eval_batches=1, save_every=2, ce_fraction=0.0, progress=False,
                dims=ModelDims(layers=2, hidden=48, heads=4, kv_heads=2, intermediate=96), share_target=True)
    return TrainArgs(**(base | kw))


def test_the_three_drafters_train_from_the_pass(train_workdir, pass_dir, tmp_path):
    target = load_causal_lm(train_workdir / "target")
    res = train(_args(train_workdir, pass_dir, "tandem", tmp_path / "tandem", draft_vocab=64, init_layers=(0, 1),
                      block_size=3, block_min=1))
    assert {"gen_ce", "gen_accuracy", "gen_agreement", "gen_tv"} == res.metrics.keys()
    cfg = TandemConfig.load(tmp_path / "tandem")
    assert cfg.draft_vocab_size == 64 and cfg.shared_target_weights
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "tandem" / "model.safetensors"))
    assert "model.embed_tokens.weight" not in stored and "lm_head.weight" not in stored  # the target's, not stored
    drafter = load_tandem_for(target, tmp_path / "tandem")
    ids = drafter.draft_ids()
    torch.testing.assert_close(drafter.lm_head.weight, target.model.get_output_embeddings().weight[ids].float())
    cache = drafter.new_cache(1, "cpu", torch.float32)
    logits = drafter.step(cache, torch.tensor([[5]]), torch.tensor([[0]]))
    assert logits.shape[-1] == 320 and torch.isinf(logits).sum() == 320 - 64  # only the draft vocabulary
    res = train(_args(train_workdir, pass_dir, "baseline", tmp_path / "baseline", init_layers=(1, 0)))
    assert res.metrics["gen_ce"] > 0
    res = train(_args(train_workdir, pass_dir, "eagle3", tmp_path / "eagle3", draft_vocab=64,
                      dims=ModelDims(layers=1, hidden=48, heads=4, kv_heads=2, intermediate=96), taps="0,1,2"))
    head = load_eagle3_for(target, tmp_path / "eagle3")
    assert head.cfg.draft_vocab_size == 64 and not torch.isnan(head.lm_head.weight).any()


def test_a_shared_drafter_used_unbound_is_refused(train_workdir, pass_dir, tmp_path):
    train(_args(train_workdir, pass_dir, "tandem", tmp_path / "t", draft_vocab=64, steps=1))
    from tandem_vllm.modeling.reference import TandemDrafter

    drafter = TandemDrafter.load(tmp_path / "t")
    with pytest.raises(TandemError, match="bind_target"):
        drafter.step(drafter.new_cache(1, "cpu", torch.float32), torch.tensor([[5]]), torch.tensor([[0]]))


def test_target_pass_options_are_checked(train_workdir, pass_dir, tmp_path):
    with pytest.raises(TandemError, match="drop --data"):
        _args(train_workdir, pass_dir, "tandem", tmp_path / "x", data=(train_workdir / "data.txt",))
    with pytest.raises(TandemError, match="draft vocabulary is for"):
        _args(train_workdir, pass_dir, "baseline", tmp_path / "x", draft_vocab=64)
    with pytest.raises(TandemError, match="drafter's width"):
        train(_args(train_workdir, pass_dir, "baseline", tmp_path / "y", dims=ModelDims(layers=1, hidden=32)))


# ---- losses against a top-k teacher and through a draft vocabulary --------------------------------------
def test_a_full_top_k_teacher_gives_the_full_distillation_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels, mask = torch.randint(0, 7, (2, 3)), torch.ones(2, 3)
    logp = torch.log_softmax(t, -1)
    top = logp.topk(7, -1)
    want = distil_loss(s, t, labels, mask)
    torch.testing.assert_close(head_distil(s, TopK(top.indices, top.values), labels, mask), want)
    torch.testing.assert_close(head_tv(s, TopK(top.indices, top.values), 7), tv_distance(s, t))


def test_a_draft_vocabulary_scores_only_the_tokens_it_can_propose():
    d2t = torch.tensor([4, 1])  # head row 0 = token 4, row 1 = token 1
    t2d = torch.tensor([-1, 1, -1, -1, 0])
    s = torch.log(torch.tensor([[[0.75, 0.25]]]))
    # label 4 -> row 0; label 2 has no row and is not scored
    torch.testing.assert_close(head_ce(s, torch.tensor([[4]]), torch.ones(1, 1), t2d), -torch.log(torch.tensor(0.75)))
    torch.testing.assert_close(head_ce(s, torch.tensor([[2]]), torch.ones(1, 1), t2d), torch.tensor(0.0))
    # the teacher's mass on tokens 4 and 1 (0.4, 0.4) renormalised to (0.5, 0.5); token 2's 0.2 dropped
    teacher = TopK(torch.tensor([[[4, 1, 2]]]), torch.log(torch.tensor([[[0.4, 0.4, 0.2]]])))
    want = 0.5 * -torch.log(torch.tensor(0.75)) + 0.5 * -(0.5 * torch.log(torch.tensor(0.75)) + 0.5 * torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(head_distil(s, teacher, torch.tensor([[4]]), torch.ones(1, 1), t2d, d2t), want)
    # TV over {4, 1, 2, rest}: student (0.75, 0.25, 0, 0) vs teacher (0.4, 0.4, 0.2, 0)
    torch.testing.assert_close(head_tv(s, teacher, 5, d2t), torch.tensor([[0.5 * (0.35 + 0.15 + 0.2)]]))
