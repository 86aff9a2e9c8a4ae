"""`tandem-vllm gen-data` on the ci target through vLLM's offline engine: shards, manifest, resume,
and one-line refusals of bad input."""

import json

import pytest
import vllm  # noqa: F401  (required: a missing package fails the suite)

from tandem_vllm.cli import main
from tandem_vllm.demo.build import build
from tandem_vllm.modeling.target import load_causal_lm
from tandem_vllm.train.gen_data import read_generated

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    return build("ci", progress=False)


def _gen(demo, out, *extra):
    main(["gen-data", "--target", demo["target"], "--out", str(out), "--corpus", demo["train_corpus"],
          "--num-prompts", "24", "--prompt-tokens", "8-24", "--max-tokens", "16", "--shard-size", "8",
          "--temperatures", "0", "1", *extra])


def test_generates_resumable_shards_of_the_targets_own_text(demo, tmp_path, capsys):
    out = tmp_path / "gen"
    _gen(demo, out)
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["shards"] == 3 and done["written_shards"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    target = load_causal_lm(demo["target"])
    assert manifest["target"]["tokenizer_fingerprint"] == target.identity.tokenizer_fingerprint
    assert manifest["settings"]["temperatures"] == [0.0, 1.0]
    rows = [json.loads(line) for line in (out / "shard-00001.jsonl").read_text().splitlines()]
    assert [(r["index"], r["temperature"]) for r in rows] == [(i, t) for i in range(8, 16) for t in (0.0, 1.0)]
    # greedy rows are the target's own greedy continuation (checked against the reference model)
    import torch

    r = rows[0]
    ids = torch.tensor([r["prompt_ids"]])
    want = target.model.generate(ids, max_new_tokens=len(r["completion_ids"]), do_sample=False)[0, ids.shape[1]:]
    assert r["completion_ids"] == want.tolist()
    assert len(read_generated([out], target.identity)) == 48

    # a run killed mid-way: the missing shard is generated again, identically; the others are kept
    before = (out / "shard-00001.jsonl").read_text()
    kept = (out / "shard-00000.jsonl").stat().st_mtime_ns
    (out / "shard-00001.jsonl").unlink()
    _gen(demo, out)
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["written_shards"] == 1
    assert (out / "shard-00001.jsonl").read_text() == before
    assert (out / "shard-00000.jsonl").stat().st_mtime_ns == kept


def test_chat_prompts_and_bad_input(demo, tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "write a loop"}]}) + "\n"
                     + json.dumps({"prompt": "import os\n"}) + "\n")
    main(["gen-data", "--target", demo["target"], "--out", str(tmp_path / "chat"), "--prompts", str(chats),
          "--max-tokens", "8", "--temperatures", "0"])
    rows = [json.loads(line) for line in (tmp_path / "chat" / "shard-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["completion_ids"]) > 0 for r in rows)
    tok = load_causal_lm(demo["target"]).tokenizer
    assert tok.decode(rows[0]["prompt_ids"]).startswith("<|user|>\nwrite a loop")

    capsys.readouterr()
    cases = [
        ("empty.jsonl", "", "has no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{nope\n', "bad.jsonl:2 is not valid JSON"),
        ("odd.jsonl", '{"text": 3}\n', 'odd.jsonl:1 needs a non-empty string "prompt"'),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            main(["gen-data", "--target", demo["target"], "--out", str(tmp_path / f"o-{name}"), "--prompts", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # the same --out with other settings is refused before any engine starts
    with pytest.raises(SystemExit):
        main(["gen-data", "--target", demo["target"], "--out", str(tmp_path / "chat"), "--prompts", str(chats),
              "--max-tokens", "9", "--temperatures", "0"])
    assert "other settings (max_tokens)" in capsys.readouterr().err


def test_the_ray_data_form_writes_the_same_shards(demo, tmp_path, capsys):
    """`--ray`: the pending shards map over ray.data actors (one vLLM engine each) through the same
    ShardWriter as the local loop, so both write identical shards."""
    import ray

    args = ["--num-prompts", "16", "--prompt-tokens", "8-16", "--max-tokens", "8", "--shard-size", "8"]
    base = ["gen-data", "--target", demo["target"], "--corpus", demo["train_corpus"], *args]
    main([*base, "--out", str(tmp_path / "local")])
    try:
        main([*base, "--out", str(tmp_path / "ray"), "--ray"])
    finally:
        ray.shutdown()
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["written_shards"] == 2
    for name in ("shard-00000.jsonl", "shard-00001.jsonl"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text()


def test_the_torch_backend_writes_the_same_greedy_text_without_vllm(demo, tmp_path, capsys, monkeypatch):
    """`--backend torch` (what `auto` picks where vLLM is not installed, e.g. a PyTorch-only GPU
    box): the reference decoder writes shards in the same format, greedy rows identical to vLLM's."""
    from tandem_vllm.train import gen_data

    args = ["--num-prompts", "12", "--prompt-tokens", "8-24", "--max-tokens", "16", "--shard-size", "8",
            "--temperatures", "0", "1"]
    base = ["gen-data", "--target", demo["target"], "--corpus", demo["train_corpus"], *args]
    main([*base, "--out", str(tmp_path / "vllm")])
    assert "backend" not in json.loads((tmp_path / "vllm" / "manifest.json").read_text())["settings"]  # old shards resume
    monkeypatch.setattr(gen_data, "_vllm_installed", lambda: False)
    main([*base, "--out", str(tmp_path / "torch")])  # auto: no vLLM here now
    assert json.loads((tmp_path / "torch" / "manifest.json").read_text())["settings"]["backend"] == "torch"
    target = load_causal_lm(demo["target"])
    rows = {b: read_generated([tmp_path / b], target.identity) for b in ("vllm", "torch")}
    assert len(rows["torch"]) == len(rows["vllm"]) == 24
    for v, t in zip(rows["vllm"], rows["torch"]):
        assert (v.prompt_ids, v.temperature) == (t.prompt_ids, t.temperature)
        if v.temperature == 0:
            assert t.completion_ids == v.completion_ids
        else:
            assert 0 < len(t.completion_ids) <= 16
    capsys.readouterr()
    with pytest.raises(SystemExit):  # resuming torch shards with vLLM would mix two generators' text
        main([*base, "--out", str(tmp_path / "torch"), "--backend", "vllm"])
    err = capsys.readouterr().err
    assert "vLLM is not installed here" in err  # (the patched machine has none)
    monkeypatch.setattr(gen_data, "_vllm_installed", lambda: True)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "torch"), "--backend", "vllm"])
    assert "other settings (backend)" in capsys.readouterr().err
