"""Deployment files checked against real schemas: the KubeRay RayJob against KubeRay's own CRD (OpenAPI v3,
vendored in tests/data), the `ray up` cluster config with Ray's own cluster-config validator, and the compose
file's exposure and secrets."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"


@functools.cache
def _rayjob_schema() -> dict:
    # a safe loader, libyaml's where PyYAML has it: the CRD is 1.4 MB of YAML (~5 s a parse in pure Python)
    crd = yaml.load(gzip.decompress((Path(__file__).parent / "data" / "ray.io_rayjobs.yaml.gz").read_bytes()),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def test_the_kuberay_rayjob_fits_the_crd_schema():
    docs = list(yaml.safe_load_all((DOCKER / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    jsonschema.validate(job, _rayjob_schema())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    token = next(e for e in head["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ray-auth", "key": "token"}  # from a Secret, not here
    assert job["spec"]["entrypoint"].startswith("tl-sweep run ")
    assert "tracking.uri=http://mlflow." in job["spec"]["entrypoint"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["metadata"]["name"] == "mlflow" and service["spec"].get("type", "ClusterIP") == "ClusterIP"
    broken = dict(job, spec={**job["spec"], "rayClusterSpec": {"headGroupSpec": {"rayStartParams": "x"}}})
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject a bad manifest
        jsonschema.validate(broken, _rayjob_schema())


def test_the_ray_up_config_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # defaults filled in as `ray up` does, then the schema
    assert "RAY_AUTH_TOKEN=" not in (DOCKER / "ray-cluster.yaml").read_text()  # passed through, never written
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's error for an unknown key
        validate_config(prepare_config({**config, "max_wokers": 2}))


def test_compose_publishes_on_loopback_only_and_keeps_secrets_out_of_the_repo():
    import os
    import shutil
    import subprocess

    text = (DOCKER / "compose.yaml").read_text()
    assert "mlflow:mlflow@" not in text and "${POSTGRES_PASSWORD:?" in text and "${RAY_AUTH_TOKEN:?" in text
    compose = yaml.safe_load(text)
    assert {"ray-head", "ray-worker", "mlflow", "postgres"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    assert "--serve-artifacts" in compose["services"]["mlflow"]["command"]
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here; the file was checked as YAML only")
    env = dict(os.environ, RAY_AUTH_TOKEN="x", POSTGRES_PASSWORD="y")
    proc = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
