"""Every Kubernetes object in deploy/*.yaml validates offline, with unknown fields rejected.

KubeRay kinds (RayJob, RayCronJob, RayCluster) against the ``openAPIV3Schema`` of KubeRay
v1.6.2's CRDs in ``../shared/data/kuberay-crds-v1.6.2/`` (skipped with a reason when absent);
built-in kinds (CronJob, Secret, ConfigMap, …) and every object's ``metadata`` against
Kubernetes' published OpenAPI schemas as the ``kubernetes-validate`` package ships them (its
``strict`` schemas reject unknown fields). The API server would *prune* an unknown field of a
custom resource silently — a misspelled ``shutdownAfterJobFinishes`` would just never happen —
so the CRD schemas are made strict here: ``additionalProperties: false`` wherever a schema lists
``properties`` and does not say ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED_DATA

CRD_DIR = SHARED_DATA / "kuberay-crds-v1.6.2"
DEPLOY = REPO / "deploy"
KUBERAY_GROUP = "ray.io"


def manifest_objects() -> list[tuple[str, dict]]:
    """``(file:index kind/name, object)`` for every document in deploy/*.yaml."""
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}:{i} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


def strict(schema):
    """A copy of an OpenAPI v3 (structural) schema as JSON Schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def load_crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): strict schema}`` for every served version of every CRD file."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def crd_errors(obj: dict, schemas: dict) -> list[str]:
    import jsonschema

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return [f"no KubeRay CRD serves {key[0]} {key[1]} (known: {sorted(schemas)})"]
    body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata: the API server's ObjectMeta rules
    validator = jsonschema.Draft7Validator(schemas[key])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(body)]


def builtin_errors(obj: dict, k8s_version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    return []


def metadata_errors(obj: dict, k8s_version: str) -> list[str]:
    """A custom resource's ``metadata`` as an ObjectMeta (what the API server checks)."""
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    return builtin_errors(wrapper, k8s_version)


def k8s_versions() -> list[str]:
    """The oldest and the newest Kubernetes minor that kubernetes-validate ships schemas for."""
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    return sorted({versions[0], versions[-1]})


@pytest.fixture(scope="module")
def crd_schemas():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared test bed ../shared/data is absent)")
    return load_crd_schemas()


@pytest.fixture(scope="module")
def k8s():
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    return k8s_versions()


OBJECTS = manifest_objects()


def test_deploy_holds_kuberay_and_builtin_objects():
    kinds = {obj["kind"] for _, obj in OBJECTS}
    assert {"RayJob", "RayCronJob", "RayCluster", "CronJob"} <= kinds, kinds


@pytest.mark.parametrize("name,obj", OBJECTS, ids=[n for n, _ in OBJECTS])
def test_manifest_object_is_valid(name, obj, crd_schemas, k8s):
    if obj["apiVersion"].split("/")[0] == KUBERAY_GROUP:
        errors = crd_errors(obj, crd_schemas) + [e for v in k8s for e in metadata_errors(obj, v)]
    else:
        errors = [f"(Kubernetes {v}) {e}" for v in k8s for e in builtin_errors(obj, v)]
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


def _find(obj: dict, kind: str) -> dict:
    return copy.deepcopy(next(o for _, o in OBJECTS if o["kind"] == kind))


@pytest.mark.parametrize("kind,path,typo", [
    ("RayJob", ["spec"], "shutdownAfterJobFinish"),                       # top of the spec
    ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0],
     "volumeMount"),                                                      # deep in a pod template
    ("RayCluster", ["spec"], "enableInTreeAutoscalling"),
    ("RayCronJob", ["spec"], "schedul"),
])
def test_a_misspelled_field_fails_validation(crd_schemas, kind, path, typo):
    obj = _find(OBJECTS, kind)
    node = obj
    for step in path:
        node = node[step]
    node[typo] = node.get(typo.rstrip("sl"), "x") if isinstance(node, dict) else "x"
    errors = crd_errors(obj, crd_schemas)
    assert any(typo in e and "Additional properties are not allowed" in e for e in errors), errors


def test_a_misspelled_builtin_field_fails_validation(k8s):
    cron = _find(OBJECTS, "CronJob")
    cron["spec"]["concurencyPolicy"] = "Forbid"
    assert any("concurencyPolicy" in e for v in k8s for e in builtin_errors(cron, v))
    meta = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x", "lables": {}}}
    assert any("lables" in e for v in k8s for e in metadata_errors(meta, v))


def test_strict_leaves_preserved_unknown_fields_open():
    schema = strict({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"b": {}}},
        "n": {"type": "string", "nullable": True}}})
    assert schema["additionalProperties"] is False and schema["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["free"]
    assert schema["properties"]["n"]["type"] == ["string", "null"]
    assert json.dumps(schema)  # still plain data
