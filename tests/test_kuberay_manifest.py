"""The KubeRay example (deploy/kuberay/rayservice.yaml), checked without a cluster: the
RayService's fields against a schema of the parts KubeRay reads (unknown keys refused, so a
misspelt field fails here rather than being dropped by the API server), its serveConfigV2
against Ray Serve's own schema, and its application args through fastinfer's builder."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
serve_schema = pytest.importorskip("ray.serve.schema")

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "rayservice.yaml"

_RESOURCES = {"type": "object", "additionalProperties": False, "required": ["requests", "limits"],
              "properties": {k: {"type": "object", "required": ["cpu", "memory"]} for k in ("requests", "limits")}}
_CONTAINER = {"type": "object", "required": ["name", "image", "resources"],
              "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "image": {"type": "string", "minLength": 1},
                             "ports": {"type": "array"}, "resources": _RESOURCES,
                             "volumeMounts": {"type": "array"}}}
_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "additionalProperties": False,
    "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                   "volumes": {"type": "array"}}}}}
SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
                 "properties": {
                     "serveConfigV2": {"type": "string"},
                     "serviceUnhealthySecondThreshold": {"type": "integer", "minimum": 1},
                     "deploymentUnhealthySecondThreshold": {"type": "integer", "minimum": 1},
                     "rayClusterConfig": {
                         "type": "object", "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                         "additionalProperties": False,
                         "properties": {
                             "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                             "enableInTreeAutoscaling": {"type": "boolean"},
                             "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                               "additionalProperties": False,
                                               "properties": {"rayStartParams": {"type": "object"},
                                                              "template": _POD}},
                             "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "template",
                                              "rayStartParams"],
                                 "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                                                "minReplicas": {"type": "integer", "minimum": 0},
                                                "maxReplicas": {"type": "integer", "minimum": 1},
                                                "rayStartParams": {"type": "object"}, "template": _POD}}}}}}}}}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def test_the_rayservice_has_the_fields_kuberay_reads(manifest):
    jsonschema.validate(manifest, SCHEMA)
    cluster = manifest["spec"]["rayClusterConfig"]
    major, minor, _ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 60)  # the ray extra's lowest version
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse a misspelt field
        jsonschema.validate({**manifest, "spec": {**manifest["spec"], "rayClusterConfg": {}}}, SCHEMA)


def test_serve_config_passes_ray_serves_schema_and_builds_the_app(manifest):
    from fastinfer.ray_serve.app import app_builder

    config = serve_schema.ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    head_ports = {p["containerPort"] for p in
                  manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert config.http_options.port in head_ports
    (app,) = config.applications
    assert app.import_path == "fastinfer.ray_serve.app:app_builder"
    built = app_builder(app.args)  # a bound Application: the ingress over the engine deployment
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="unknown fastinfer application args"):
        app_builder({**app.args, "replica": {}})
