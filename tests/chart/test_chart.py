"""The Helm chart, rendered and linted from Python through Helm's own Go SDK (helm-python-sdk; no
`helm` binary here), for the default values, the CPU demo and the GPU production examples:
Kubernetes resources checked against the Kubernetes API schemas (kubernetes-validate), the
RayService against KubeRay's v1 fields, its Ray Serve config against Ray's own schema and the
application args against tandem-vllm's ServeConfig."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.chart import kuberay

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem-vllm"
KUBE_VERSION = "1.30.0"
MINIMAL = {"model": {"target": "/models/target", "drafter": "/models/tandem",
                     "storage": {"pvc": {"claimName": "models"}}}}
EXAMPLES = {"defaults": MINIMAL,
            "cpu-demo": yaml.safe_load((ROOT / "deploy" / "values-cpu-demo.yaml").read_text()),
            "cpu-smollm2": yaml.safe_load((ROOT / "deploy" / "values-cpu-smollm2.yaml").read_text()),
            "gpu-production": yaml.safe_load((ROOT / "deploy" / "values-gpu-production.yaml").read_text())}


@pytest.fixture(scope="module")
def chart() -> Any:
    c = helm_python.Chart.load(str(CHART))
    yield c
    c.close()


def render(chart: Any, values: dict) -> dict[str, list[dict]]:
    """template file name -> the manifests it rendered."""
    out = chart.render(values, name="llm", namespace="serving", is_install=True)
    docs = {}
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs[Path(path).name] = [d for d in yaml.safe_load_all(text) if d]
    return docs


def manifests(chart: Any, values: dict) -> list[dict]:
    return [d for ds in render(chart, values).values() for d in ds]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {len(found)} rendered"
    return found[0]


def rayservice(chart: Any, values: dict) -> dict:
    return one(manifests(chart, values), "RayService")


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(rs: dict) -> dict:
    return serve_config(rs)["applications"][0]["args"]


def pod_validator() -> Any:
    """jsonschema validator for Kubernetes' PodTemplateSpec (strict: unknown fields fail)."""
    import importlib.resources

    import jsonschema
    from referencing import Registry, Resource

    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    version = max(p.name for p in base.iterdir() if p.name.startswith("v1.30.") and p.name.endswith("-local-strict"))
    schema = json.loads((base / version / "podtemplatespec-v1.json").read_text())
    defs = json.loads((base / version / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pod_templates(rs: dict) -> list[dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def containers(rs: dict) -> dict[str, dict]:
    return {c["name"]: c for t in pod_templates(rs) for c in t["spec"]["containers"]}


# ---------------------------------------------------------------- lint and structure


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_lint_is_clean(example):
    report = helm_python.lint(str(CHART), EXAMPLES[example], strict=True, namespace="serving",
                              kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # The only remark strict lint makes is Chart.yaml's optional icon.
    assert [m["error"] for m in report["messages"] if m["error"] != "icon is recommended"] == []


def test_every_template_renders_one_resource(chart):
    everything = {**MINIMAL, "serviceMonitor": {"enabled": True},
                  "serve": {"apiKey": {"enabled": True, "value": "k"}}}
    for name, docs in render(chart, everything).items():
        assert len(docs) == 1, f"{name} renders {len(docs)} resources"
    kinds = sorted(d["kind"] for d in manifests(chart, everything))
    assert kinds == ["PodDisruptionBudget", "RayService", "Secret", "Service", "Service", "Service", "ServiceMonitor"]
    assert sorted(t["name"] for t in chart.templates) == sorted(
        ["templates/_helpers.tpl", "templates/NOTES.txt", "templates/rayservice.yaml", "templates/service-http.yaml",
         "templates/service-grpc.yaml", "templates/service-metrics.yaml", "templates/servicemonitor.yaml",
         "templates/poddisruptionbudget.yaml", "templates/secret-api-key.yaml"])


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_standard_resources_match_the_kubernetes_api(chart, example):
    checked = 0
    for doc in manifests(chart, EXAMPLES[example]):
        if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue  # CRDs: checked below against their own fields
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 2  # at least the HTTP and gRPC Services


@pytest.mark.parametrize("version", [kuberay.OLDEST, kuberay.NEWEST])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_kuberay_admits_the_rayservice_without_pruning_a_field(chart, example, version):
    """KubeRay's own CRD schema, as the API server applies it: nothing the chart sets is pruned, the
    defaulted object validates; the pod templates match Kubernetes' PodTemplateSpec."""
    rs = rayservice(chart, EXAMPLES[example])
    _, pruned, errors = kuberay.admit(rs, version)
    assert pruned == [] and errors == []
    validator = pod_validator()
    for template in pod_templates(rs):
        validator.validate(template)


@pytest.mark.parametrize("version", [kuberay.OLDEST, kuberay.NEWEST])
def test_kuberay_admission_catches_what_it_should(chart, version):
    """Negative controls: a misspelt field is pruned, a field newer than the operator is pruned by the
    older one, a wrong type and a missing required field fail validation; a bad probe fails the pod schema."""
    import jsonschema

    rs = rayservice(chart, MINIMAL)
    typo = copy.deepcopy(rs)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert kuberay.admit(typo, version)[1] == ["spec.rayClusterConfig.workerGroupSpecs[0].maxReplica"]
    newer = copy.deepcopy(rs)
    newer["spec"]["upgradeStrategy"] = {"type": "NewCluster"}  # KubeRay 1.3+
    assert bool(kuberay.admit(newer, version)[1]) == (version == kuberay.OLDEST)
    wrong = copy.deepcopy(rs)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in kuberay.admit(wrong, version)[2])
    missing = copy.deepcopy(rs)
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in kuberay.admit(missing, version)[2])
    template = copy.deepcopy(pod_templates(rs)[1])
    template["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        pod_validator().validate(template)


@pytest.mark.parametrize("version", [kuberay.OLDEST, kuberay.NEWEST])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_the_operator_builds_a_serve_service_from_the_head_ports(chart, example, version):
    """KubeRay builds the RayService's Serve Service from head ports named serve (serve-* from 1.6) and
    never marks the RayService ready without one; container ports must be unique."""
    rs = rayservice(chart, EXAMPLES[example])
    assert kuberay.head_port_problems(rs, version) == []
    want = {"serve": 8000} if version == kuberay.OLDEST else {"serve": 8000, "serve-grpc": 9000}
    assert kuberay.serve_service_ports(rs, version) == want
    # the chart's own Services and the readiness probe point at the same named ports
    docs = manifests(chart, EXAMPLES[example])
    assert one(docs, "Service", "-http")["spec"]["ports"][0]["targetPort"] == "serve"
    assert one(docs, "Service", "-grpc")["spec"]["ports"][0]["targetPort"] == "serve-grpc"


def test_the_operator_rules_fail_on_what_the_old_chart_rendered(chart):
    """Negative controls: the head ports the chart used to name http/grpc give no Serve Service on any
    version; a duplicated port name or number is caught."""
    rs = rayservice(chart, MINIMAL)
    old = copy.deepcopy(rs)
    for port in old["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]:
        port["name"] = {"serve": "http", "serve-grpc": "grpc"}.get(port["name"], port["name"])
    for version in (kuberay.OLDEST, kuberay.NEWEST):
        assert "Serve Service is never built" in " ".join(kuberay.head_port_problems(old, version))
    dup = copy.deepcopy(rs)
    ports = dup["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": 8000, "name": "serve"})
    problems = " ".join(kuberay.head_port_problems(dup, kuberay.NEWEST))
    assert "duplicate port name serve" in problems and "duplicate port containerPort 8000" in problems


@pytest.mark.parametrize("values,field", [
    ({"service": {"grpcPort": 8000}}, "service.grpcPort"),
    ({"serviceMonitor": {"port": 9000}}, "serviceMonitor.port"),
    ({"service": {"httpPort": 8265}}, "service.httpPort"),
])
def test_colliding_ports_fail_at_template_time_naming_the_value(chart, values, field):
    merged = {**MINIMAL, **values}
    with pytest.raises(Exception, match=field.replace(".", "\\.")):
        render(chart, merged)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_serve_config_is_valid_for_ray_and_for_tandem_vllm(chart, example):
    from ray.serve.schema import ServeDeploySchema

    from tandem_vllm.serve.config import ServeConfig
    from tandem_vllm.serve.grpc_api import SERVICER_FUNCTIONS

    rs = rayservice(chart, EXAMPLES[example])
    cfg = serve_config(rs)
    ServeDeploySchema.model_validate(cfg)
    assert cfg["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    assert cfg["http_options"]["port"] == 8000 and cfg["grpc_options"]["port"] == 9000
    (app,) = cfg["applications"]
    assert app["import_path"] == "tandem_vllm.serve.app:build_app"
    ServeConfig.parse(app["args"])


def test_deploy_serve_yaml_is_valid_for_ray_and_tandem_vllm():
    from ray.serve.schema import ServeDeploySchema

    from tandem_vllm.serve.config import ServeConfig
    from tandem_vllm.serve.grpc_api import SERVICER_FUNCTIONS

    cfg = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    assert cfg["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    ServeConfig.parse(cfg["applications"][0]["args"])


# ---------------------------------------------------------------- what each example means


def test_defaults_serve_the_given_models_on_cpu_workers(chart):
    docs = manifests(chart, MINIMAL)
    rs = one(docs, "RayService")
    args = app_args(rs)
    assert args["model"] == "/models/target" and args["drafter"] == "/models/tandem"
    assert args["num_speculative_tokens"] == 3 and args["num_replicas"] == 1 and args["ray_metrics"] is True
    assert args["per_request_spec_metrics"] == "summary" and args["draft_sample_method"] == "probabilistic"
    assert "api_key" not in args and "api_key_env" not in args
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas only on workers
    worker = containers(rs)["ray-worker"]
    assert worker["image"] == "tandem-vllm:0.1.0-cpu"
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/health", "port": "serve"}
    assert worker["livenessProbe"]["grpc"]["port"] == 9000 and worker["startupProbe"]["grpc"]["port"] == 9000
    assert "readinessProbe" not in containers(rs)["ray-head"]  # KubeRay's own: the app waits for a ready head
    volume = pod_templates(rs)[1]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    http, grpc = one(docs, "Service", "-http"), one(docs, "Service", "-grpc")
    assert http["spec"]["ports"][0]["port"] == 8000 and grpc["spec"]["ports"][0]["port"] == 9000
    for svc in (http, grpc):
        assert svc["spec"]["selector"]["ray.io/serve"] == "true"
        assert svc["spec"]["selector"]["app.kubernetes.io/instance"] == "llm"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert pod_templates(rs)[1]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "Secret")]


def test_cpu_demo_builds_the_demo_pair_in_every_pod_and_runs_on_the_head(chart):
    docs = manifests(chart, EXAMPLES["cpu-demo"])
    rs = one(docs, "RayService")
    args = app_args(rs)
    assert "model" not in args and "drafter" not in args and args["demo"] == "chat"  # ServeConfig resolves the pair
    assert args["api_key_env"] == "TANDEM_API_KEY" and "api_key" not in args
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "num-cpus" not in head["rayStartParams"]
    (init,) = head["template"]["spec"]["initContainers"]
    assert init["command"] == ["tandem-vllm", "demo", "build", "--size", "chat"]
    cache = {e["name"]: e.get("value") for e in init["env"]}["TANDEM_VLLM_CACHE"]
    env = {e["name"]: e for e in containers(rs)["ray-head"]["env"]}
    assert env["TANDEM_VLLM_CACHE"]["value"] == cache and cache.startswith("/models/")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "0"  # Serve's proxy unless serve.haproxy
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-tandem-vllm-api-key", "key": "api-key"}
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "demo-key"
    assert head["template"]["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 0
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


def test_smollm2_on_cpu_nodes_prepares_the_chat_pair_on_every_worker_and_scales(chart):
    rs = rayservice(chart, EXAMPLES["cpu-smollm2"])
    args = app_args(rs)
    assert args["demo"] == "chat" and "model" not in args and args["served_model_name"] == "smollm2-135m-instruct"
    assert args["autoscaling"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert args["dtype"] == "float32" and args["max_model_len"] == 2048
    from tandem_vllm.demo.chat import K_SCHEDULE  # the schedule measured for the pair, as `serve` uses it

    assert args["k_schedule"] == json.loads(K_SCHEDULE.read_text())["schedule"] and args["num_speculative_tokens"] == 2
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head only routes
    (worker,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 4)
    for spec in (head["template"]["spec"], worker["template"]["spec"]):
        (init,) = spec["initContainers"]
        assert init["command"] == ["tandem-vllm", "demo", "build", "--size", "chat"]
    from tandem_vllm.serve.config import ServeConfig

    assert ServeConfig.parse(args).demo == "chat"


def test_the_ci_pair_stays_one_value_away(chart):
    values = {**EXAMPLES["cpu-demo"], "model": {**EXAMPLES["cpu-demo"]["model"], "demoPair": "ci"}}
    rs = rayservice(chart, values)
    assert app_args(rs)["demo"] == "ci"
    (init,) = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == "ci"
    with pytest.raises(Exception, match="demoPair"):
        rayservice(chart, {**values, "model": {**values["model"], "demoPair": "tiny"}})


def test_gpu_production_gets_gpus_autoscaling_secrets_and_monitoring(chart):
    docs = manifests(chart, EXAMPLES["gpu-production"])
    rs = one(docs, "RayService")
    args = app_args(rs)
    assert args["num_gpus"] == 1 and args["num_cpus"] == 4
    assert args["autoscaling"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 16}
    assert "num_replicas" not in args
    assert args["vllm_args"] == ["--enable-prefix-caching", "--gpu-memory-utilization", "0.90"]
    assert args["max_model_len"] == 8192 and args["dtype"] == "bfloat16"
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    worker_pod = pod_templates(rs)[1]["spec"]
    assert worker_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker_pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    worker = containers(rs)["ray-worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"] == "registry.example.com/ml/tandem-vllm:0.1.0-gpu"
    env = {e["name"]: e for e in worker["env"]}
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tandem-api-key", "key": "api-key"}
    assert not [d for d in docs if d["kind"] == "Secret"]  # an existing Secret is used, not created
    http = one(docs, "Service", "-http")
    assert http["spec"]["type"] == "LoadBalancer"
    assert http["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-internal"] == "true"
    monitor = one(docs, "ServiceMonitor")
    metrics = one(docs, "Service", "-metrics")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["ports"][0]["port"] == 8080
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("storage, expect", [
    ({"type": "hostPath", "hostPath": {"path": "/mnt/models"}}, {"hostPath": {"path": "/mnt/models", "type": "Directory"}}),
    ({"type": "initContainer", "initContainer": {"image": "amazon/aws-cli:2.17.0",
                                                 "command": ["aws", "s3", "sync", "s3://bucket/models", "/models"]}},
     {"emptyDir": {"sizeLimit": "100Gi"}}),
])
def test_model_storage_choices(chart, storage, expect):
    rs = rayservice(chart, {"model": {"target": "/models/target", "storage": storage}})
    for template in pod_templates(rs):
        spec = template["spec"]
        assert {k: v for k, v in spec["volumes"][0].items() if k != "name"} == expect
        if storage["type"] == "initContainer":
            (init,) = spec["initContainers"]
            assert init["image"] == "amazon/aws-cli:2.17.0" and init["command"][:2] == ["aws", "s3"]
            assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
        else:
            assert "initContainers" not in spec


def test_speculation_settings_reach_the_app(chart):
    explicit = {"model": "/models/tandem", "num_speculative_tokens": 5}
    for speculation, expect in [({"numSpeculativeTokens": 5}, {"drafter": "/models/tandem", "num_speculative_tokens": 5}),
                                ({"config": explicit}, {"speculative_config": explicit}),
                                ({"disabled": True}, {"no_speculation": True})]:
        args = app_args(rayservice(chart, {**MINIMAL, "speculation": speculation}))
        assert expect.items() <= args.items()
        assert sum(k in args for k in ("drafter", "speculative_config", "no_speculation")) == 1


def test_notes_tell_how_to_reach_both_endpoints(chart):
    notes = chart.render({**MINIMAL, "serve": {"apiKey": {"enabled": True, "value": "k"}}}, name="llm",
                         namespace="serving")["tandem-vllm/templates/NOTES.txt"]
    assert "port-forward svc/llm-tandem-vllm-http 8000:8000" in notes
    assert "port-forward svc/llm-tandem-vllm-grpc 9000:9000" in notes
    assert "/v1/completions" in notes and "openai.OpenAI" in notes and "grpcurl" in notes
    assert "Authorization: Bearer" in notes and "tandem.v1.TandemGeneration/Generate" in notes


# ---------------------------------------------------------------- nonsense is refused


@pytest.mark.parametrize(("values", "fragment"), [
    ({"serve": {"numReplicas": -1}}, "/serve/numReplicas': minimum: got -1, want 1"),
    ({"workers": {"replicas": -2}}, "/workers/replicas': minimum: got -2, want 0"),
    ({"model": {"target": "", "storage": {"pvc": {"claimName": "m"}}}}, "/model/target': minLength"),
    ({"profile": "nvidia-v100"}, "/profile': value must be one of 'cpu', 'nvidia-l4'"),
    ({"model": {"target": "models/llama"}}, "/model/target': 'models/llama' does not match pattern"),
    ({"speculation": {"numSpeculativeTokens": 17}}, "/speculation/numSpeculativeTokens': maximum"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy'"),
    ({"modle": {"target": "/m"}}, "additional properties 'modle' not allowed"),
    ({"serve": {"apiKey": {"enabled": True}}}, "/serve/apiKey/value': minLength"),
    ({"model": {"storage": {"type": "pvc", "pvc": {"claimName": ""}}}}, "/model/storage/pvc/claimName': minLength"),
    ({"model": {"storage": {"type": "s3"}}}, "/model/storage/type'"),
    ({"head": {"rayStartParams": {"num-gpus": 1}}}, "/head/rayStartParams/num-gpus'"),
    ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "/podDisruptionBudget/maxUnavailable'"),
    ({"speculation": {"schedule": [[1, 4]]}}, "/speculation/schedule/0'"),
])
def test_nonsense_values_are_refused_with_the_key_named(chart, values, fragment):
    merged = _deep_merge(MINIMAL, values)
    with pytest.raises(helm_python.HelmValuesError) as e:
        chart.validate_schema(merged)
    assert fragment in str(e.value)
    with pytest.raises(helm_python.HelmError):  # and an install would refuse it the same way
        chart.render(merged, name="llm", namespace="serving")


def test_a_measured_schedule_reaches_the_drafter_config(chart):
    from tandem_vllm.serve.config import ServeConfig

    args = app_args(one(manifests(chart, _deep_merge(MINIMAL, {"speculation": {"schedule": [[1, 2, 3], [3, 1048576, 1]]}})),
                        "RayService"))
    assert args["k_schedule"] == [[1, 2, 3], [3, 1048576, 1]]
    spec = ServeConfig.parse(args).speculation()
    assert spec is not None and spec["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 1048576, 1]]
    assert "k_schedule" not in app_args(one(manifests(chart, MINIMAL), "RayService"))


def test_a_missing_model_is_refused_and_the_demo_needs_none(chart):
    with pytest.raises(helm_python.HelmValuesError, match="/model/target"):
        chart.validate_schema({"model": {"storage": {"pvc": {"claimName": "m"}}}})
    chart.validate_schema({"model": {"demo": True, "storage": {"type": "initContainer"}}})


def test_values_yaml_documents_every_key_and_matches_the_schema(chart):
    text = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(text):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        above = [t.strip() for t in text[:i] if t.strip()][-1:]
        parent_block = line.rstrip().endswith(":")  # a section: its keys carry the documentation
        if not parent_block and not (above and above[0].startswith("#")) and "#" not in line:
            undocumented.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert undocumented == []
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def keys(d: dict, s: dict, at: str = "") -> None:
        props = s.get("properties", {})
        assert set(d) <= set(props) or s.get("additionalProperties") is not False, f"{at}: {set(d) - set(props)}"
        for k, v in d.items():
            if isinstance(v, dict) and props.get(k, {}).get("properties"):
                keys(v, props[k], f"{at}/{k}")

    keys(defaults, schema)
    assert set(schema["properties"]) - {"global"} == set(defaults)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_haproxy_ingress_is_one_value(chart):
    rs = one(manifests(chart, _deep_merge(MINIMAL, {"serve": {"haproxy": True}})), "RayService")
    for container in containers(rs).values():
        assert {e["name"]: e.get("value") for e in container["env"]}["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
