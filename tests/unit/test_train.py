import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tandem_vllm.config import TandemConfig
from tandem_vllm.demo.corpus import read_sources, stdlib_files, train_tokenizer
from tandem_vllm.errors import TandemError
from tandem_vllm.modeling.pairing import load_baseline_for, load_tandem_for
from tandem_vllm.modeling.target import load_causal_lm
from tandem_vllm.train.args import ModelDims, TrainArgs
from tandem_vllm.train.data import pack, read_texts
from tandem_vllm.train.loss import ce_loss, distil_loss, soft_ce, tv_distance
from tandem_vllm.train.trainer import train


# ---- losses on hand-computed cases ------------------------------------------------------------
def test_ce_loss_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    labels = torch.tensor([[0, 2]])
    want = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.8))) / 2
    torch.testing.assert_close(ce_loss(logits, labels, torch.ones(1, 2)), want)
    # the mask drops position 1
    torch.testing.assert_close(ce_loss(logits, labels, torch.tensor([[1, 0]])), -torch.log(torch.tensor(0.5)))


def test_soft_ce_and_distil_hand_computed():
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.9, 0.1]]]))
    want_soft = -(0.9 * torch.log(torch.tensor(0.5)) + 0.1 * torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(soft_ce(s, t, torch.ones(1, 1)), want_soft)
    want = 0.5 * -torch.log(torch.tensor(0.5)) + 0.5 * want_soft
    torch.testing.assert_close(distil_loss(s, t, torch.tensor([[1]]), torch.ones(1, 1)), want)
    torch.testing.assert_close(tv_distance(s, t), torch.tensor([[0.4]]))


# ---- the tiny tokenizer + target: conftest's train_workdir ------------------------------------
@pytest.fixture(scope="module")
def workdir(train_workdir):
    return train_workdir


def _args(root, kind, out, **kw):
    base = dict(kind=kind, out=root / out, data=(root / "data.txt",), target=root / "target", dims=ModelDims(layers=1, hidden=32),
                seq_len=32, batch_size=4, steps=6, warmup=2, eval_every=3, eval_batches=2, save_every=2, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def test_tandem_checkpoint_round_trip_and_target_check(workdir):
    res = train(_args(workdir, "tandem", "tandem"))
    assert {"ce", "accuracy", "agreement", "tv"} <= res.metrics.keys()
    cfg = TandemConfig.load(workdir / "tandem")
    assert cfg.tap_layers == (2,) and cfg.block_size == 2  # span: one layer reads the final state and cfg.target.num_hidden_layers == 2
    raw = json.loads((workdir / "tandem" / "config.json").read_text())
    assert raw["architectures"] == ["TandemDrafterForCausalLM"] and raw["tandem_format_version"] == 1
    target = load_causal_lm(workdir / "target")
    drafter = load_tandem_for(target, workdir / "tandem")
    saved = load_file(str(workdir / "tandem" / "model.safetensors"))
    for name, tensor in saved.items():
        torch.testing.assert_close(drafter.state_dict()[name], tensor)
    # a different target (other width) is refused with a message naming both
    other = workdir / "other-target"
    LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    target.tokenizer.save_pretrained(other)
    with pytest.raises(TandemError, match=r"trained for target .*target.* but got .*other-target.*hidden_size 48 != 64"):
        load_tandem_for(load_causal_lm(other), workdir / "tandem")


def test_baseline_trains_and_refuses_another_tokenizer(workdir):
    args = _args(workdir, "baseline", "baseline")
    train(args)
    schedule = json.loads((workdir / "baseline" / "train_summary.json").read_text())["schedule"]
    assert (schedule["lr"], schedule["loss"], schedule["ce_fraction"]) == (args.lr, args.loss, args.ce_fraction)
    target = load_causal_lm(workdir / "target")
    assert load_baseline_for(target, workdir / "baseline").identity.vocab_size == target.identity.vocab_size
    texts = list(read_sources(stdlib_files()[40:60]))
    alien = workdir / "alien"
    tok = train_tokenizer(texts, 320, alien)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(alien)
    with pytest.raises(TandemError, match="different tokenizers"):
        load_baseline_for(target, alien)


def test_resume_after_interruption_reaches_the_uninterrupted_state(workdir):
    train(_args(workdir, "tandem", "full", steps=6))
    train(_args(workdir, "tandem", "cut", steps=6), stop_after=4)  # "killed" right after step 4's checkpoint
    assert not (workdir / "cut" / "model.safetensors").exists()
    train(_args(workdir, "tandem", "cut", steps=6, resume=True))
    a = load_file(str(workdir / "full" / "model.safetensors"))
    b = load_file(str(workdir / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (workdir / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


def test_a_second_run_into_the_same_dir_needs_resume(workdir):
    train(_args(workdir, "baseline", "twice", steps=2))
    with pytest.raises(TandemError, match="--resume"):
        train(_args(workdir, "baseline", "twice", steps=2))


def test_bad_data_files_get_one_line_errors(tmp_path, workdir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"text": "ok"}\n{nope\n')
    for path, msg in [(empty, "has no text"), (latin, "not UTF-8"), (badjson, "bad.jsonl:2 is not valid JSON"),
                      (tmp_path / "missing.txt", "does not exist")]:
        with pytest.raises(TandemError, match=msg):
            read_texts([path])
    tok = load_causal_lm(workdir / "target").tokenizer
    with pytest.raises(TandemError, match="fewer than one sequence"):
        pack(["tiny"], tok, 64)


def test_bad_train_args_are_refused(workdir):
    with pytest.raises(TandemError, match="gamma must be at least 1"):
        _args(workdir, "tandem", "x", block_size=0)
    with pytest.raises(TandemError, match="needs --target"):
        TrainArgs(kind="tandem", out=workdir / "x", data=())
    with pytest.raises(TandemError, match="multiple of heads"):
        ModelDims(hidden=30, heads=4)
    with pytest.raises(TandemError, match="does not exist"):
        train(_args(workdir, "tandem", "y", target=workdir / "nope"))


def test_gradient_accumulation_equals_the_larger_batch(workdir):
    train(_args(workdir, "baseline", "acc1", batch_size=4, grad_accum=1, steps=3))
    train(_args(workdir, "baseline", "acc2", batch_size=2, grad_accum=2, steps=3))
    a = load_file(str(workdir / "acc1" / "model.safetensors"))
    b = load_file(str(workdir / "acc2" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_tandem_trains_against_a_qwen2_target_and_decodes_losslessly(workdir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tandem_vllm.decoding.speculate import ReferenceTandemProposer, generate

    tok = load_causal_lm(workdir / "target").tokenizer
    qdir = workdir / "qwen-target"
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(qdir)
    tok.save_pretrained(qdir)
    train(_args(workdir, "tandem", "qwen-tandem", target=qdir, dims=ModelDims(layers=2, hidden=32), steps=3))
    target = load_causal_lm(qdir)
    drafter = load_tandem_for(target, workdir / "qwen-tandem")
    assert drafter.cfg.tap_layers == (0, 3) and drafter.cfg.target.architectures == ("Qwen2ForCausalLM",)
    prompts = [tok("def main():\n", add_special_tokens=False)["input_ids"], tok("import os", add_special_tokens=False)["input_ids"]]
    want = generate(target.model, prompts, max_new_tokens=12).tokens
    got = generate(target.model, prompts, max_new_tokens=12, proposer=ReferenceTandemProposer(drafter), k=3, taps=drafter.cfg.tap_layers)
    assert got.tokens == want


def test_corrupt_or_mismatched_weights_are_refused(workdir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    if not (workdir / "tandem" / "model.safetensors").exists():
        train(_args(workdir, "tandem", "tandem"))
    target = load_causal_lm(workdir / "target")
    bad = tmp_path / "tandem"
    shutil.copytree(workdir / "tandem", bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TandemError, match="not a readable safetensors file"):
        load_tandem_for(target, bad)
    state = load_file(str(workdir / "tandem" / "model.safetensors"))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, :16].contiguous()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(TandemError, match="does not match its config.json"):
        load_tandem_for(target, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(TandemError, match="has no model.safetensors"):
        load_tandem_for(target, bad)
    broken_target = tmp_path / "target"
    shutil.copytree(workdir / "target", broken_target)
    (broken_target / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TandemError, match="cannot load the weights"):
        load_causal_lm(broken_target)


def test_served_demo_recipes_use_head_sizes_vllm_cpu_supports():
    from tandem_vllm.demo.build import RECIPES

    for name in ("ci", "bench"):
        assert RECIPES[name].target.vllm_cpu_ok and RECIPES[name].drafter.vllm_cpu_ok, name


# ---- training on the target's own continuations ------------------------------------------------
def _fake_generated(root, out, *, target="target", n=24, seed=0):
    """A gen-data directory as `tandem-vllm gen-data` writes it, with random completions (no vLLM)."""
    from tandem_vllm.modeling.target import load_identity
    from tandem_vllm.train.gen_data import MANIFEST, shard_name

    identity, tok = load_identity(root / target)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"index": i, "temperature": 0.0, "top_p": 1.0, "seed": i, "target": identity.tokenizer_fingerprint,
             "finish": "length", "prompt_ids": torch.randint(0, len(tok), (5 + i % 7,), generator=g).tolist(),
             "completion_ids": torch.randint(0, len(tok), (20 + i % 30,), generator=g).tolist()} for i in range(n)]
    (out / shard_name(0)).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / MANIFEST).write_text(json.dumps({"target": identity.model_dump(mode="json"), "shards": 1, "settings": {}}))
    return out


def test_pack_generated_scores_only_completion_tokens():
    from tandem_vllm.train.data import pack_generated
    from tandem_vllm.train.gen_data import Generated

    rows, mask = pack_generated([Generated([1, 2, 3], [4, 5], 0.0), Generated([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], 1.0)],
                                seq_len=6, pad_id=0)
    # short: prompt + completion + padding; labels 4 and 5 (inputs 3 and 4) are scored
    assert rows[0].tolist() == [1, 2, 3, 4, 5, 0, 0] and mask[0].tolist() == [0, 0, 1, 1, 0, 0]
    # long: the prompt's tail (>= 1 token) and the completion's head fill the row
    assert rows[1].tolist() == [5, 6, 7, 8, 9, 10, 11] and mask[1].tolist() == [0, 1, 1, 1, 1, 1]


def test_tandem_trains_on_mixed_generated_data_with_variable_blocks_and_resumes_exactly(workdir):
    gen = _fake_generated(workdir, workdir / "gen")
    kw = dict(gen_data=(gen,), gen_ratio=0.5, block_min=1, block_size=3, steps=6)
    res = train(_args(workdir, "tandem", "mixed-full", **kw))
    assert {"gen_ce", "gen_agreement", "gen_tv"} <= res.metrics.keys()
    train(_args(workdir, "tandem", "mixed-cut", **kw), stop_after=4)
    train(_args(workdir, "tandem", "mixed-cut", **kw, resume=True))
    a = load_file(str(workdir / "mixed-full" / "model.safetensors"))
    b = load_file(str(workdir / "mixed-cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the data mix is part of the run's identity
    with pytest.raises(TandemError, match="gen_ratio differ"):
        train(_args(workdir, "tandem", "mixed-cut", **{**kw, "gen_ratio": 0.25}, resume=True))
    # and it changes what is learned: natural text alone ends elsewhere
    train(_args(workdir, "tandem", "natural-only", block_min=1, block_size=3, steps=6))
    c = load_file(str(workdir / "natural-only" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_generated_data_of_another_target_or_broken_shards_are_refused(workdir, tmp_path):
    from tandem_vllm.train.gen_data import read_generated

    other = workdir / "gen-other-target"
    if not other.exists():
        LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
        load_causal_lm(workdir / "target").tokenizer.save_pretrained(other)
    alien = _fake_generated(workdir, tmp_path / "alien", target="gen-other-target")
    with pytest.raises(TandemError, match=r"generated by target .*gen-other-target.* not by .*hidden_size 64 != 48"):
        train(_args(workdir, "tandem", "refused", gen_data=(alien,)))
    target = load_causal_lm(workdir / "target")
    broken = _fake_generated(workdir, tmp_path / "broken")
    (broken / "shard-00000.jsonl").write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(TandemError, match=r"shard-00000.jsonl:1 is not a generated record"):
        read_generated([broken], target.identity)
    partial = _fake_generated(workdir, tmp_path / "partial")
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "shards": 2}))
    with pytest.raises(TandemError, match="holds 1 of 2 shards"):
        read_generated([partial], target.identity)
    with pytest.raises(TandemError, match="has no manifest.json"):
        read_generated([tmp_path], target.identity)
    with pytest.raises(TandemError, match="trains drafters"):
        _args(workdir, "lm", "lm-gen", gen_data=(partial,), tokenizer=workdir / "tok")
    with pytest.raises(TandemError, match="need 1 <= min <= max"):
        _args(workdir, "tandem", "bad-blocks", block_min=4, block_size=3)


def test_eagle3_head_trains_exports_and_drafts_losslessly(workdir):
    """The EAGLE-3 peer: trained by the same loop (draft steps unrolled), exported in vLLM's eagle3
    layout, and lossless in the reference decoder."""
    from tandem_vllm.decoding.speculate import ReferenceEagle3Proposer, generate
    from tandem_vllm.modeling.eagle3 import ARCHITECTURE, Eagle3Head

    res = train(_args(workdir, "eagle3", "eagle3", block_size=3, gen_data=(_fake_generated(workdir, workdir / "gen-e3"),)))
    assert {"ce", "agreement", "gen_agreement"} <= res.metrics.keys()
    raw = json.loads((workdir / "eagle3" / "config.json").read_text())
    assert raw["architectures"] == [ARCHITECTURE] and raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 1, 1]
    names = set(load_file(str(workdir / "eagle3" / "model.safetensors")))
    assert {"fc.weight", "fc_norm.2.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight",
            "embed_tokens.weight", "norm.weight"} <= names
    head = Eagle3Head.load(workdir / "eagle3").double()
    assert head.midlayer.self_attn.q_proj.weight.shape == (32, 64)  # attention reads [embedding ; state]
    target = load_causal_lm(workdir / "target")
    target.model.double()
    tok = target.tokenizer
    prompts = [tok("def main():\n    x = 1\n", add_special_tokens=False)["input_ids"], tok("import os", add_special_tokens=False)["input_ids"]]
    want = generate(target.model, prompts, max_new_tokens=16).tokens
    got = generate(target.model, prompts, max_new_tokens=16, proposer=ReferenceEagle3Proposer(head), k=3, taps=head.cfg.tap_layers)
    assert got.tokens == want


def test_eagle3_incremental_drafting_equals_the_training_form():
    """The TTT training form and step-by-step drafting compute the same logits (a mismatch would
    silently train the head for something decoding never asks)."""
    import torch

    from tandem_vllm.config import TargetIdentity
    from tandem_vllm.modeling.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, init_like_llama

    ident = TargetIdentity(name_or_path="t", architectures=("LlamaForCausalLM",), hidden_size=24, num_hidden_layers=4,
                           vocab_size=50, tokenizer_fingerprint="x")
    torch.manual_seed(0)
    head = Eagle3Head(Eagle3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, target_hidden_size=24, tap_layers=(1, 2, 3), target=ident))
    init_like_llama(head, std=0.3)
    head.double()
    tokens = torch.randint(0, 50, (1, 12))
    taps = torch.randn(1, 12, 3, 24, dtype=torch.float64)
    steps = head.forward_train(tokens, taps, steps=3)
    anchor = 6  # verified 0..6; drafts follow token 7
    d = Eagle3Drafter(head)
    logits, state = d.first_pass(tokens[0, 1 : anchor + 2], taps[0, : anchor + 1], torch.arange(anchor + 1))
    torch.testing.assert_close(logits, steps[0][0, anchor])
    own: list = []
    for s in (1, 2):  # teacher-forced tokens, as in training
        logits, state = d.step(tokens[0, anchor + s + 1], state, anchor + s, own)
        torch.testing.assert_close(logits, steps[s][0, anchor])


def test_a_target_that_does_not_fit_is_one_line(workdir, monkeypatch):
    import tandem_vllm.train.trainer as trainer

    def out_of_memory(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(trainer, "load_causal_lm", out_of_memory)
    with pytest.raises(TandemError, match="does not fit on cpu beside the drafter; use --parallel fsdp") as e:
        train(_args(workdir, "tandem", "oom", device="cpu"))
    assert "\n" not in str(e.value)


def test_flex_attention_is_chosen_only_where_its_cuda_kernel_takes_the_head_size():
    """Compiled flex attention refuses heads under 16 (seen on an H200 with torch 2.11: "NYI: embedding
    dimension ... must be at least 16"): auto falls back to SDPA there, --attn flex says why."""
    from tandem_vllm.train.trainer import attention_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_backend("auto", cuda, 16) == "flex"
    assert attention_backend("auto", cuda, 8) == "sdpa"
    assert attention_backend("auto", cpu, 64) == "sdpa"
    assert attention_backend("sdpa", cuda, 64) == "sdpa"
    with pytest.raises(TandemError, match="head size is 8 and compiled flex attention needs at least 16"):
        attention_backend("flex", cuda, 8)
