"""Bad input at the command line: exit code 2 and one line naming the problem, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from tandem_vllm.errors import TandemError


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tandem_vllm.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--target", "/no/such/model", "--prompt", "hi"], "model directory /no/such/model does not exist"),
        (["train", "--kind", "tandem", "--data", "x.txt", "--out", "o"], "--kind tandem needs --target"),
        (["train", "--kind", "lm", "--tokenizer", "t", "--data", "x.txt", "--out", "o", "--block-size", "0"], "gamma must be at least 1"),
        (["eval", "--target", "/nope", "--drafter", "/nope", "--prompts", "p.txt", "--json", "o.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tandem-vllm: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_non_utf8_data_is_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "tok").mkdir()
    r = run_cli("train", "--kind", "lm", "--tokenizer", "tok", "--data", "bad.txt", "--out", "o", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data file bad.txt is not UTF-8" in r.stderr and "iconv" in r.stderr


def test_every_serve_config_field_is_a_serve_flag_that_reaches_the_config():
    """One source: the serve flags are ServeConfig's fields (help from their descriptions)."""
    from tandem_vllm.cli import parser
    from tandem_vllm.cli_fields import flag, passed
    from tandem_vllm.serve.config import ServeConfig

    serve = next(a for a in parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" serve"))
    flags = {s for act in serve._actions for s in act.option_strings}
    assert {flag(n) for n in ServeConfig.model_fields} - {"--vllm-args"} <= flags
    a = parser().parse_args(["serve", "--model", "/m", "--num-replicas", "2", "--ray-metrics", "--extra-chat-roles", "tool",
                             "x", "--autoscaling", '{"min_replicas": 1, "max_replicas": 3}', "--demo", "chat",
                             "--speculation-guards", '{"max_context": 512}', "--num-cpus", "1.5"])
    cfg = ServeConfig.parse(passed(a, ServeConfig.model_fields))
    assert (cfg.model, cfg.num_replicas, cfg.ray_metrics, cfg.extra_chat_roles, cfg.demo) == ("/m", 2, True, ["tool", "x"], "chat")
    assert cfg.autoscaling is not None and cfg.autoscaling.max_replicas == 3
    assert cfg.speculation_guards == {"max_context": 512} and cfg.num_cpus == 1.5
    assert passed(parser().parse_args(["serve"]), set(ServeConfig.model_fields) - {"vllm_args"}) == {}  # defaults apply
    help_text = serve.format_help()
    assert "Draft tokens proposed per verification step. (default: 3)" in " ".join(help_text.split())


def test_every_router_args_field_is_a_train_router_flag_and_left_out_flags_keep_its_defaults():
    """One source: the train-router flags are RouterArgs' fields (help from their metadata)."""
    import dataclasses

    from tandem_vllm.cli import parser
    from tandem_vllm.cli_fields import flag
    from tandem_vllm.commands.train_router import router_args
    from tandem_vllm.train.router import RouterArgs

    router = next(a for a in parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train-router"))
    flags = {s for act in router._actions for s in act.option_strings}
    assert {flag(f.name) for f in dataclasses.fields(RouterArgs)} <= flags
    base = ["train-router", "--target", "t", "--drafter", "d", "--data", "a.txt", "b.jsonl", "--out", "o"]
    a = parser().parse_args(base)
    assert router_args(a) == RouterArgs(target=Path("t"), drafter=Path("d"),
                                                                 data=(Path("a.txt"), Path("b.jsonl")), out=Path("o"))
    a = parser().parse_args(["train-router", "--target", "t", "--drafter", "d", "--gen-data", "g1", "g2", "--out", "o"])
    assert router_args(a).gen_data == (Path("g1"), Path("g2"))
    a = parser().parse_args(base + ["--k", "4", "--threshold", "0.7", "--batch-size", "64"])
    got = router_args(a)
    assert (got.k, got.threshold, got.batch_size, got.epochs) == (4, 0.7, 64, 20)
    assert "keep drafting while P(accept) >= this (default: 0.5)" in " ".join(router.format_help().split())
    a = parser().parse_args(["train-router", "--target", "t", "--drafter", "d", "--out", "o"])
    with pytest.raises(TandemError, match="--data .* --gen-data"):  # text from one or the other
        router_args(a)


def test_every_gen_settings_field_is_a_gen_data_flag_and_left_out_flags_keep_its_defaults():
    """One source: the gen-data flags are GenSettings' fields (help from their metadata)."""
    import dataclasses

    from tandem_vllm.cli import parser
    from tandem_vllm.cli_fields import flag
    from tandem_vllm.commands.gen_data import gen_settings
    from tandem_vllm.train.gen_data import GenSettings

    gen = next(a for a in parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" gen-data"))
    flags = {s for act in gen._actions for s in act.option_strings}
    assert {flag(f.name) for f in dataclasses.fields(GenSettings) if f.name != "progress"} <= flags
    base = ["gen-data", "--target", "t", "--out", "o"]
    assert gen_settings(parser().parse_args(base + ["--prompts", "p.jsonl"])) == GenSettings(
        target=Path("t"), out=Path("o"), prompts=Path("p.jsonl"))
    got = gen_settings(parser().parse_args(base + ["--corpus", "a.txt", "b.txt", "--prompt-tokens", "64", "--temperatures",
                                                   "0", "--engine-args", '{"dtype": "bfloat16"}']))
    assert (got.corpus, got.prompt_tokens, got.temperatures, got.engine_args) == (
        (Path("a.txt"), Path("b.txt")), (64, 64), (0.0,), {"dtype": "bfloat16"})
    with pytest.raises(TandemError, match="either --corpus"):
        gen_settings(parser().parse_args(base))


@pytest.mark.parametrize("args, message", [(["--prompt-tokens", "many"], "expected a length such as 64"),
                                           (["--engine-args", "[1]"], "must be a JSON object"),
                                           (["--engine-args", "{dtype"], "not a JSON object")])
def test_bad_gen_data_flags_are_one_line(args, message, tmp_path):
    r = run_cli("gen-data", "--target", "t", "--out", "o", "--prompts", "p.jsonl", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [(["--demo", "tiny"], "invalid choice: 'tiny'"),
                                           (["--autoscaling", "{min"], "--autoscaling is not JSON"),
                                           (["--max-n", "two"], "invalid int value")])
def test_bad_serve_flags_are_one_line(args, message, tmp_path):
    r = run_cli("serve", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_every_train_args_field_is_a_train_flag_and_left_out_flags_keep_its_defaults():
    """One source: the train flags are TrainArgs' fields and ModelDims' (help from their metadata)."""
    import dataclasses

    from tandem_vllm.cli import parser
    from tandem_vllm.cli_fields import flag
    from tandem_vllm.commands.train import train_args
    from tandem_vllm.train.args import ModelDims, TrainArgs

    train = next(a for a in parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    flags = {s for act in train._actions for s in act.option_strings}
    fields = [f for f in dataclasses.fields(TrainArgs) if f.metadata.get("flag", True) and f.name != "dims"]
    assert {flag(f.name) for f in fields + list(dataclasses.fields(ModelDims))} <= flags
    base = ["train", "--target", "t", "--data", "a.txt", "--out", "o"]
    a = train_args(parser().parse_args(base))
    assert a == TrainArgs(out=Path("o"), target=Path("t"), data=(Path("a.txt"),))  # every default is TrainArgs' own
    a = train_args(parser().parse_args(base + ["--heads", "8", "--hidden", "256", "--block-size", "1-5", "--resume",
                                               "auto", "--init-layers", "0", "3", "--layers", "2", "--weight-decay", "0"]))
    assert (a.dims, a.block_min, a.block_size, a.resume, a.init_layers, a.weight_decay) == (
        ModelDims(layers=2, hidden=256, heads=8, kv_heads=8), 1, 5, "auto", (0, 3), 0.0)
    assert "the cosine decay's floor, as a fraction of --lr (default: 0.1)" in " ".join(train.format_help().split())


def test_the_build_summary_prints_the_real_pairs_metrics(capsys):
    """The real pair evaluates drafters on the target's own replies (gen_* metrics), the others on text."""
    from tandem_vllm.commands.demo import print_build

    ev = {"gen_ce": 4.0, "gen_accuracy": 0.25, "gen_agreement": 0.3, "gen_tv": 0.7}
    print_build({"size": "real", "build_seconds": 1.0, "target": "T", "tandem": "D", "heldout_prompts": "P",
                  "eval": {"tandem": ev}})
    assert "D  on the target's replies perplexity 54.60, accuracy 0.250, agreement with target 0.300" in capsys.readouterr().out
