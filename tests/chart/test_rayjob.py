"""deploy/kuberay/rayjob-train.yaml: KubeRay's RayJob fields, Kubernetes pod templates, and commands
that tandem-vllm's own parser accepts and that fit the cluster the job asks for."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tandem_vllm.cli import gen_settings, parser, train_args
from tests.chart.test_chart import pod_validator

RAYJOB = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "rayjob-train.yaml"


def rayjob_schema() -> dict:
    """KubeRay ray.io/v1 RayJob: the spec fields of KubeRay 1.1-1.4's rayjob_types.go, with its
    rayClusterSpec checked by the RayClusterSpec of the RayService schema beside this file (unknown
    fields fail: the CRD would prune them silently)."""
    service = json.loads((Path(__file__).parent / "kuberay_rayservice_v1.schema.json").read_text())
    defs = service["$defs"]
    spec = {
        "type": "object", "additionalProperties": False, "required": ["entrypoint"],
        "properties": {
            "entrypoint": {"type": "string", "minLength": 1}, "metadata": {"$ref": "#/$defs/stringMap"},
            "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
            "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"$ref": "#/$defs/int32"},
            "activeDeadlineSeconds": {"$ref": "#/$defs/int32"}, "backoffLimit": {"$ref": "#/$defs/int32"},
            "rayClusterSpec": {"$ref": "#/$defs/RayClusterSpec"}, "clusterSelector": {"$ref": "#/$defs/stringMap"},
            "submitterPodTemplate": {"type": "object"}, "submitterConfig": {"type": "object"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
            "entrypointNumGpus": {"type": "number"}, "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
            "deletionStrategy": {"type": "object"},
        },
        "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
    }
    return {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": {"type": "object"},
                       "spec": {"$ref": "#/$defs/RayJobSpec"}},
        "$defs": {**defs, "RayJobSpec": spec},
    }


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


def test_rayjob_matches_kuberay_fields_and_kubernetes_pod_templates(job):
    jsonschema.Draft202012Validator(rayjob_schema()).validate(job)
    cluster = job["spec"]["rayClusterSpec"]
    validator = pod_validator()
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        validator.validate(template)
    # the schema is not a rubber stamp
    bad = json.loads(json.dumps(job))
    bad["spec"]["entrypiont"] = bad["spec"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(rayjob_schema()).validate(bad)


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
