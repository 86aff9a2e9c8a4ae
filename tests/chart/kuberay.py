"""KubeRay as the chart meets it, for the chart tests.

* ``admit``: what the API server does with a ray.io/v1 object under KubeRay's own CRD schema
  (tests/chart/crds/, trimmed from ray-project/kuberay by scripts/trim_kuberay_crds.py): prune the
  fields the structural schema does not know (a pruned field the chart set is a silent loss on a real
  cluster, so the tests fail on it), apply defaults, then validate.
* ``serve_service_ports`` and ``head_port_problems``: the operator's rules for the Serve Service, read
  from its BuildServeService: the Service is built only from head-container ports named ``serve``
  (KubeRay 1.1-1.5) or ``serve`` / ``serve-*`` (1.6+); with none, a RayService never becomes ready.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema

CRDS = Path(__file__).parent / "crds"
OLDEST, NEWEST = "1.1.0", "1.7.0"  # the KubeRay versions the chart supports, oldest and newest checked
KINDS = {"RayService": "rayservices", "RayJob": "rayjobs"}


def crd_schema(version: str, kind: str) -> dict[str, Any]:
    return json.loads((CRDS / f"kuberay-v{version}-{KINDS[kind]}.json").read_text())["openAPIV3Schema"]


def prune(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Drop (in place) the fields a structural schema does not declare; returns their paths."""
    dropped: list[str] = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return dropped
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key in list(obj):
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                dropped += prune(obj[key], props[key], where)
            elif isinstance(extra, dict):
                dropped += prune(obj[key], extra, where)
            elif props is not None or extra is False:
                del obj[key]
                dropped.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            dropped += prune(item, schema["items"], f"{path}[{i}]")
    return dropped


def apply_defaults(obj: Any, schema: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(obj[key], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(item, schema["items"])


def _jsonschema(schema: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: int-or-string, nullable; x-kubernetes-* dropped."""
    if isinstance(schema, list):
        return [_jsonschema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _jsonschema(v) for k, v in schema.items() if not k.startswith("x-") and k not in ("format", "nullable")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def admit(obj: dict[str, Any], version: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the object as stored, pruned field paths, validation errors) under KubeRay ``version``'s CRD."""
    schema = crd_schema(version, obj["kind"])
    stored = copy.deepcopy(obj)
    meta = stored.pop("metadata", None)  # ObjectMeta is the API server's own, not the CRD's
    pruned = prune(stored, schema)
    apply_defaults(stored, schema)
    if meta is not None:
        stored["metadata"] = meta
    validator = jsonschema.Draft7Validator(_jsonschema(schema))
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(stored)]
    return stored, pruned, errors


def _serving(name: str, version: str) -> bool:
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    return name == "serve" or (major_minor >= (1, 6) and name.startswith("serve-"))


def serve_service_ports(rs: dict[str, Any], version: str) -> dict[str, int]:
    """The ports KubeRay puts in the RayService's Serve Service: from the head's first container (the Ray
    container); when it lists no ports KubeRay's defaults (serve = 8000) apply."""
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {(p.get("name") or f"{p['containerPort']}-port"): p["containerPort"] for p in head.get("ports") or []}
    if not ports:
        ports = {"serve": 8000}
    return {n: p for n, p in ports.items() if _serving(n, version)}


def head_port_problems(rs: dict[str, Any], version: str) -> list[str]:
    """What the operator (or the API server) would refuse in the pod templates' ports."""
    problems = []
    if not serve_service_ports(rs, version) and not rs["spec"].get("serveService"):
        problems.append(f"KubeRay {version}: no head-container port named 'serve': the Serve Service is never built")
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for template in templates:
        for c in template["spec"]["containers"]:
            ports = c.get("ports") or []
            for key in ("name", "containerPort"):
                values = [p.get(key) for p in ports if p.get(key) is not None]
                dup = sorted({str(v) for v in values if values.count(v) > 1})
                if dup:
                    problems.append(f"container {c['name']}: duplicate port {key} {', '.join(dup)}")
    return problems
