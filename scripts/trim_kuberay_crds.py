"""Write the KubeRay CRD schemas the chart tests validate against, trimmed to what the tests need.

Usage: python scripts/trim_kuberay_crds.py KUBERAY_GIT_DIR TAG [TAG ...]
Reads ray-operator/config/crd/bases/ray.io_{rayservices,rayjobs}.yaml at each tag of a ray-project/kuberay
clone and writes tests/chart/crds/kuberay-<tag>-<kind>.json: the ray.io/v1 openAPIV3Schema with every
Kubernetes core object it embeds (pod templates, Services) replaced by an opaque object -- the tests check
pod templates against Kubernetes' own schemas (kubernetes-validate) -- plus the source and tag.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "chart" / "crds"
# properties whose schema is a Kubernetes core type, kept opaque
OPAQUE = {"template", "submitterPodTemplate", "serveService", "headService", "volumeClaimTemplates"}


def trim(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "properties":
                out[key] = {name: ({"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                    "x-tandem-opaque": "a Kubernetes core object, validated separately"}
                                   if name in OPAQUE else trim(sub)) for name, sub in value.items()}
            elif key == "description":
                continue
            else:
                out[key] = trim(value)
        return out
    if isinstance(schema, list):
        return [trim(x) for x in schema]
    return schema


def main(repo: str, tags: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        for kind in ("rayservices", "rayjobs"):
            path = f"ray-operator/config/crd/bases/ray.io_{kind}.yaml"
            text = subprocess.run(["git", "--git-dir", repo, "show", f"{tag}:{path}"], check=True, capture_output=True,
                                  text=True).stdout
            crd = yaml.safe_load(text)
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            doc = {"source": f"ray-project/kuberay {tag} {path} (Apache-2.0), trimmed by scripts/trim_kuberay_crds.py",
                   "kuberay": tag.removeprefix("v"), "kind": crd["spec"]["names"]["kind"],
                   "openAPIV3Schema": trim(version["schema"]["openAPIV3Schema"])}
            (OUT / f"kuberay-{tag}-{kind}.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
