"""The Kubernetes manifests: schema-valid offline, consistent with each other, with the image and with the app."""

from __future__ import annotations

import runpy
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
import yaml
from kubernetes_validate.utils import all_versions

import llmapi
from tests.test_container import SETTINGS, image_env, runtime, values

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def versions() -> list[str]:
    """The Kubernetes versions whose schemas kubernetes-validate bundles, oldest first."""
    return sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))


def resources() -> dict[str, dict[str, Any]]:
    """Every resource in deploy/k8s, by kind."""
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def container() -> dict[str, Any]:
    """The Deployment's one container."""
    [only] = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env_values() -> dict[str, str]:
    """The container's plain environment values."""
    return {item["name"]: item["value"] for item in container()["env"] if "value" in item}


def test_manifests_cover_deployment_service_and_autoscaler():
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(resources())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_every_bundled_kubernetes_version(path):
    assert len(versions()) >= 5
    for document in yaml.safe_load_all(path.read_text()):
        for version in versions():
            kubernetes_validate.validate(document, version, strict=True)


def test_validation_rejects_a_mistyped_field():
    deployment = resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError, match="pth"):
        kubernetes_validate.validate(deployment, versions()[-1], strict=True)


def test_service_and_autoscaler_select_the_deployments_pods():
    found = resources()
    deployment, service, hpa = found["Deployment"], found["Service"], found["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count; `kubectl apply` must not reset it
    if "PodDisruptionBudget" in found:
        assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_deployment_serves_the_images_port_as_its_user():
    [port] = container()["ports"]
    assert str(port["containerPort"]) == values(runtime(), "EXPOSE")[0] == image_env()["BIND"].rpartition(":")[2]
    [service_port] = resources()["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    uid, _, gid = values(runtime(), "USER")[0].partition(":")
    pod = resources()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsNonRoot"], pod["runAsUser"], pod["runAsGroup"]) == (True, int(uid), int(gid))
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert image_env()["HF_HOME"] in mounts and "/tmp" in mounts  # the root filesystem is read-only
    assert container()["image"].rpartition(":")[2] == llmapi.__version__


def test_deployment_takes_the_api_key_from_a_secret():
    [key] = [item for item in container()["env"] if item["name"] == "API_KEY"]
    assert set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert "value" not in key


def test_deployment_resources_fit_its_workers_and_threads():
    resources_ = container()["resources"]
    assert resources_["requests"] == resources_["limits"]  # what the scheduler reserves is what the pod gets
    env = env_values()
    assert int(env["WEB_CONCURRENCY"]) * int(env["TORCH_THREADS"]) == int(resources_["limits"]["cpu"])
    assert resources_["limits"]["memory"].endswith("Gi")


def test_deployment_grace_period_outlasts_the_generation_deadline(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    env = {**env_values(), "API_KEY": "any"}
    known = {name: value for name, value in env.items() if name in SETTINGS}
    for name, value in known.items():
        monkeypatch.setenv(name, value)
    graceful = runpy.run_path(str(K8S.parent.parent / "gunicorn.conf.py"))["graceful_timeout"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = resources()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + graceful > int(env["GENERATION_TIMEOUT_MAX_MS"]) / 1000


def test_deployment_environment_names_real_settings():
    assert set(env_values()) | {"API_KEY"} <= SETTINGS
    assert env_values()["WARMUP"] == "true"  # so that readiness comes without traffic


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_probes_point_at_open_routes_of_the_app(app, probe):
    path = container()[probe]["httpGet"]["path"]
    assert container()[probe]["httpGet"]["port"] == container()["ports"][0]["name"]
    response = app.test_client().get(path)  # no key: the kubelet sends none
    assert response.status_code in {200, 503}, response.get_data(as_text=True)
    assert any(rule.rule == path and "GET" in rule.methods for rule in app.url_map.iter_rules())


def test_liveness_is_health_and_readiness_is_ready():
    assert container()["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container()["readinessProbe"]["httpGet"]["path"] == "/ready"


@pytest.mark.slow
def test_pods_turn_ready_without_traffic_on_a_real_server(start_server, tiny_model):
    # The Deployment's environment (the tiny model in place of gpt2): liveness answers at once, and
    # readiness comes by itself, with no generate request, as the kubelet needs it to.
    env = {**env_values(), "MODEL_NAME": tiny_model}
    server = start_server(**env)
    assert requests.get(server.url + container()["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
    ready_path = server.url + container()["readinessProbe"]["httpGet"]["path"]
    streak, deadline = 0, time.monotonic() + 90
    while streak < 10 and time.monotonic() < deadline:  # ten in a row: every worker has its model
        status = requests.get(ready_path, timeout=5).status_code
        assert status in {200, 503}, status
        streak = streak + 1 if status == 200 else 0
        time.sleep(0.1)
    assert streak == 10, server.log()
    assert "/generate" not in server.log()
