"""deploy/kserve against KServe's own CRD schemas (extracted unchanged from a pinned KServe release, their
sha256 checked) and against deploy/k8s: the same ports, probes, settings, resources and images."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = KSERVE / "schemas"
SOURCE = json.loads((SCHEMAS / "SOURCE.json").read_text(encoding="utf-8"))
MANIFESTS = sorted(KSERVE.glob("*/*.yaml"))
#: the protocols KServe knows (pkg/constants: ProtocolV1, ProtocolV2, ProtocolGRPCV1, ProtocolGRPCV2)
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def strict(schema: Any) -> Any:
    """The schema refusing unknown fields, as the API server does with strict field validation
    (``kubectl apply --validate=strict``; otherwise it drops them silently): every object schema that
    lists its properties, says nothing of others and keeps no unknown fields gets
    ``additionalProperties: false``."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (strict(v) if k != "properties" else {p: strict(s) for p, s in v.items()}) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_entry(kind: str) -> dict[str, Any]:
    (entry,) = [e for e in SOURCE["schemas"] if e["kind"] == kind]
    return entry


_VALIDATORS: dict[str, Draft4Validator] = {}


def validator(kind: str) -> Draft4Validator:
    if kind not in _VALIDATORS:
        entry = schema_entry(kind)
        schema = json.loads((SCHEMAS / entry["schema"]).read_text(encoding="utf-8"))
        Draft4Validator.check_schema(schema)
        _VALIDATORS[kind] = Draft4Validator(strict(schema))
    return _VALIDATORS[kind]


def errors(doc: dict[str, Any]) -> list[str]:
    found = validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found)


def by_kind(directory: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in (load(p) for p in sorted((KSERVE / directory).glob("*.yaml")))}


# -- the schemas -----------------------------------------------------------------------------------


def test_the_vendored_schemas_are_the_pinned_release_s():
    assert re.fullmatch(r"v\d+\.\d+\.\d+", SOURCE["release"])
    assert re.fullmatch(r"[0-9a-f]{40}", SOURCE["commit"])
    assert {e["kind"] for e in SOURCE["schemas"]} == {"ClusterServingRuntime", "InferenceService"}
    for entry in SOURCE["schemas"]:
        assert entry["url"] == f"{SOURCE['repository']}/blob/{SOURCE['release']}/{entry['crd']}"
        assert re.fullmatch(r"[0-9a-f]{64}", entry["crd_sha256"])
        data = (SCHEMAS / entry["schema"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["schema_sha256"], f"{entry['schema']} changed"
        schema = json.loads(data)
        Draft4Validator.check_schema(schema)
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


def test_the_extraction_is_what_was_vendored(tmp_path):
    """extract.py writes the served version's openAPIV3Schema unchanged: a CRD built around a vendored
    schema gives back the same bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kserve_extract", SCHEMAS / "extract.py")
    assert spec is not None
    assert spec.loader is not None
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    for entry in SOURCE["schemas"]:
        text = (SCHEMAS / entry["schema"]).read_text(encoding="utf-8")
        crd = {"spec": {"versions": [{"name": "v0", "schema": {"openAPIV3Schema": {}}},
                                     {"name": entry["version"], "schema": {"openAPIV3Schema": json.loads(text)}}]}}
        assert extract.schema_text(yaml.safe_load(yaml.safe_dump(crd)), entry["version"]) == text


# -- the manifests against the schemas -------------------------------------------------------------


def test_there_is_a_cpu_and_a_gpu_variant_of_each():
    assert [p.relative_to(KSERVE).as_posix() for p in MANIFESTS] == [
        "cpu/clusterservingruntime.yaml", "cpu/inferenceservice.yaml",
        "gpu/clusterservingruntime.yaml", "gpu/inferenceservice.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(KSERVE).as_posix())
def test_each_manifest_validates_against_kserve_s_schema(path):
    doc = load(path)
    entry = schema_entry(doc["kind"])
    assert doc["apiVersion"] == f"{entry['group']}/{entry['version']}"
    assert errors(doc) == []
    # a name Kubernetes takes for any object (an InferenceService's must start with a letter: DNS-1035)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize(("kind", "change", "where"), [
    ("ClusterServingRuntime", lambda d: d["spec"].update(protocolVersion=["v2"]), "spec"),  # misspelled
    ("ClusterServingRuntime", lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
     "spec/containers/0/ports/0/containerPort"),
    ("ClusterServingRuntime", lambda d: d["spec"]["containers"][0]["resources"]["limits"].update(cpu="two"),
     "spec/containers/0/resources/limits/cpu"),
    ("ClusterServingRuntime", lambda d: d["spec"]["supportedModelFormats"][0].update(priority=0),
     "spec/supportedModelFormats/0/priority"),
    ("ClusterServingRuntime", lambda d: d["spec"]["containers"][0]["readinessProbe"]["httpGet"].pop("port"),
     "spec/containers/0/readinessProbe/httpGet"),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(runtimeName="x"), "spec/predictor/model"),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat") and
     d["spec"]["predictor"]["model"].update(modelFormat={"version": "1"}), "spec/predictor/model/modelFormat"),
    ("InferenceService", lambda d: d["spec"]["predictor"].update(minReplicas="2"), "spec/predictor/minReplicas"),
])
def test_the_schemas_refuse_what_kserve_would_refuse_or_drop(kind, change, where):
    doc = copy.deepcopy(by_kind("cpu")[kind])
    change(doc)
    found = errors(doc)
    assert found, "the change was not caught"
    assert any(e.startswith(where + ":") for e in found), found


def test_the_inference_services_name_their_runtime_its_format_and_protocol():
    for variant in ("cpu", "gpu"):
        docs = by_kind(variant)
        runtime, isvc = docs["ClusterServingRuntime"], docs["InferenceService"]
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in [
            {"name": f["name"], "version": f["version"]} for f in runtime["spec"]["supportedModelFormats"]]
        assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
        assert set(runtime["spec"]["protocolVersions"]) <= KSERVE_PROTOCOLS
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # beside the CPU runtime, the GPU runtime is chosen only by name
    assert by_kind("cpu")["ClusterServingRuntime"]["spec"]["supportedModelFormats"][0]["autoSelect"] is True
    assert by_kind("gpu")["ClusterServingRuntime"]["spec"]["supportedModelFormats"][0]["autoSelect"] is False


# -- the manifests against deploy/k8s and the service -----------------------------------------------

K8S = ROOT / "deploy" / "k8s"


def k8s_container() -> dict[str, Any]:
    return load(K8S / "base" / "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]


def container(variant: str) -> dict[str, Any]:
    (c,) = by_kind(variant)["ClusterServingRuntime"]["spec"]["containers"]
    assert c["name"] == "kserve-container"  # the name KServe merges an InferenceService's settings into
    return c


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c["env"]}


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p for p in c["ports"] if p["name"] == port]
    return p["containerPort"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_ports_probes_and_settings_agree_with_deploy_k8s(variant):
    c, k8s = container(variant), k8s_container()
    # REST first (KServe's Service port 80 leads to the first port), then the gRPC port (named grpc, so
    # KServe serves it as gRPC), each where the server listens
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in c["ports"]] == [
        ("http", 8000, "TCP"), ("grpc", 8001, "TCP")]
    settings = env(c)
    assert int(settings["SURROGATE_PORT"]) == c["ports"][0]["containerPort"] == port_number(k8s, "http")
    assert int(settings["SURROGATE_GRPC_PORT"]) == c["ports"][1]["containerPort"]
    runtime = by_kind(variant)["ClusterServingRuntime"]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == settings["SURROGATE_PORT"]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        mine, theirs = copy.deepcopy(c[probe]), copy.deepcopy(k8s[probe])
        assert port_number(c, mine["httpGet"].pop("port")) == port_number(k8s, theirs["httpGet"].pop("port"))
        assert mine == theirs, probe
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = load(K8S / "base" / "configmap.yaml")["data"]
    assert {k: settings[k] for k in config} == config
    assert settings["SURROGATE_API_TOKEN"] is None  # from the same optional Secret
    assert [e for e in c["env"] if e["name"] == "SURROGATE_API_TOKEN"] == [
        e for e in k8s["env"] if e["name"] == "SURROGATE_API_TOKEN"]
    assert c["lifecycle"] == k8s["lifecycle"]
    assert c["volumeMounts"] == k8s["volumeMounts"]
    for key, value in k8s["securityContext"].items():
        assert c["securityContext"][key] == value
    pod = load(K8S / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    predictor = by_kind(variant)["InferenceService"]["spec"]["predictor"]
    assert predictor["securityContext"] == pod["securityContext"]
    assert predictor["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert c["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]
    assert int(settings["SURROGATE_GRACEFUL_TIMEOUT"]) + 5 < predictor["terminationGracePeriodSeconds"]


def k8s_gpu_patch() -> dict[str, Any]:
    return {op["path"]: op["value"] for op in load(K8S / "overlays" / "gpu" / "deployment-gpu.yaml")}


def test_resources_images_and_scaling_agree_with_deploy_k8s():
    base = load(K8S / "base" / "deployment.yaml")
    hpa = load(K8S / "base" / "hpa.yaml")["spec"]
    gpu = k8s_gpu_patch()
    cpu_c, gpu_c = container("cpu"), container("gpu")
    assert cpu_c["resources"] == base["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu_c["resources"] == gpu["/spec/template/spec/containers/0/resources"]
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    added = [op["value"] for op in load(K8S / "overlays" / "gpu" / "deployment-gpu.yaml")
             if op["path"] == "/spec/template/spec/containers/0/env/-"]
    assert {e["name"] for e in added} == {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION"}
    assert all(env(gpu_c)[e["name"]] == e["value"] for e in added)
    assert not any(name.startswith("XLA_") for name in env(cpu_c))
    assert by_kind("gpu")["ClusterServingRuntime"]["spec"]["tolerations"] == gpu["/spec/template/spec/tolerations"]
    runtime_volumes = {v["name"]: v for v in by_kind("gpu")["ClusterServingRuntime"]["spec"]["volumes"]}
    assert runtime_volumes["tmp"]["emptyDir"]["sizeLimit"] == gpu["/spec/template/spec/volumes/0/emptyDir/sizeLimit"]
    # the images as deploy/k8s names them (kustomization images: newName:newTag)
    for variant, kustomization, name in (("cpu", K8S / "base", "surrogate-serve"),
                                          ("gpu", K8S / "overlays" / "gpu", "surrogate-serve-cuda")):
        (image,) = [i for i in load(kustomization / "kustomization.yaml")["images"] if i["name"] == name]
        assert container(variant)["image"] == f"{image['newName']}:{image['newTag']}"
    # scaling as the HorizontalPodAutoscalers
    target = hpa["metrics"][0]["resource"]
    gpu_hpa = load(K8S / "overlays" / "gpu" / "hpa-gpu.yaml")
    (gpu_most,) = [op["value"] for op in gpu_hpa if op["path"] == "/spec/maxReplicas"]
    for variant, most in (("cpu", hpa["maxReplicas"]), ("gpu", gpu_most)):
        predictor = by_kind(variant)["InferenceService"]["spec"]["predictor"]
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], most)
        assert predictor["scaleMetric"] == target["name"]
        assert predictor["scaleTarget"] == target["target"]["averageUtilization"]
