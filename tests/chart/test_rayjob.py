"""deploy/kuberay/rayjob-train.yaml: KubeRay's RayJob fields, Kubernetes pod templates, and commands
that tandem-vllm's own parser accepts and that fit the cluster the job asks for."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from tandem_vllm.cli import parser
from tandem_vllm.commands.gen_data import gen_settings
from tandem_vllm.commands.train import train_args
from tests.chart import kuberay
from tests.chart.test_chart import pod_validator

RAYJOB = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "rayjob-train.yaml"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def commands(job: dict) -> list[list[str]]:
    """The tandem-vllm command lines of the entrypoint (a `bash -c` script of ';'-separated commands)."""
    shell, flag, script = shlex.split(job["spec"]["entrypoint"])
    assert (shell, flag) == ("bash", "-c")
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    cmds, cur = [], []
    for tok in lexer:
        if tok == ";":
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c[1:] for c in cmds if c and c[0] == "tandem-vllm"]


@pytest.mark.parametrize("version", [kuberay.OLDEST, kuberay.NEWEST])
def test_kuberay_admits_the_rayjob_without_pruning_a_field(job, version):
    _, pruned, errors = kuberay.admit(job, version)
    assert pruned == [] and errors == []
    cluster = job["spec"]["rayClusterSpec"]
    validator = pod_validator()
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        validator.validate(template)
    # not a rubber stamp: a misspelt field is pruned, and backoffLimit (KubeRay 1.2+) is pruned by 1.1
    bad = json.loads(json.dumps(job))
    bad["spec"]["entrypiont"] = bad["spec"].pop("entrypoint")
    assert "spec.entrypiont" in kuberay.admit(bad, version)[1]
    retried = json.loads(json.dumps(job)) | {}
    retried["spec"]["backoffLimit"] = 2
    assert ("spec.backoffLimit" in kuberay.admit(retried, version)[1]) == (version == kuberay.OLDEST)


def test_rayjob_commands_parse_and_fit_the_cluster_it_asks_for(job):
    cmds = commands(job)
    assert [c[0] for c in cmds] == ["gen-data", "train"]
    gen_ns, train_ns = (parser().parse_args(c) for c in cmds)
    settings, args = gen_settings(gen_ns), train_args(train_ns)  # every value passes the same checks as on a CLI
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gen_ns.ray is not None and gen_ns.engines * gen_ns.num_gpus_per_engine <= group["replicas"] * gpus
    assert train_ns.ray is not None and train_ns.use_gpu and train_ns.workers <= group["replicas"] * gpus
    assert args.resume == "auto"  # a retried job continues from its last checkpoint
    assert args.gen_data == (settings.out,)  # training reads what generation wrote
    # every path the commands use is on a volume every pod mounts; what they write is writable
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, worker):
        mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
        for path in (settings.target, settings.prompts, args.target, *args.data):
            assert any(str(path).startswith(m + "/") for m in mounts), path
        for path in (settings.out, args.out):
            assert any(str(path).startswith(m + "/") and not ro for m, ro in mounts.items()), path
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == yaml.safe_load(
        (RAYJOB.parents[2] / "helm" / "tandem-vllm" / "values.yaml").read_text())["rayVersion"]
