"""Bad input at the command line: exit code 2 and one line naming the problem, no traceback."""

import subprocess
import sys

import pytest


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
