"""Shared fixtures: one cache folder per test session (decoded images, pretrained sources)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "freeze_depth.yaml"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera_data"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tl-sweep-cache")
    os.environ["TL_SWEEP_CACHE"] = str(path)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return path


@pytest.fixture
def cli(capsys):
    """Run ``tl-sweep`` in-process; returns (exit code, stdout, stderr)."""
    from tl_sweep.cli import main

    def call(*argv: str):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_ROOTS: dict[str, Path] = {}  # the mlflow_server fixture's URI -> its folder (database, artifacts, log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts served over HTTP)."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    SERVER_ROOTS[uri] = root
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def shutdown_in_process_ray() -> None:
    """The Ray an in-process test started in pytest's own process, if any. Left running, it breaks a cluster
    started beside it (its head answered job submissions "No available agent to submit job"), and a
    `ray stop --force` kills it: Ray then ends its driver, pytest, 60 s later with exit 1."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def stop_every_ray(env: dict | None = None) -> None:
    """`ray stop --force` with this venv's `ray`: every Ray on this machine, pytest's own shut down first."""
    import subprocess
    import sys

    shutdown_in_process_ray()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True,
                   timeout=180)


@contextmanager
def two_node_cluster(cache: Path):
    """A real two-node Ray cluster on 127.0.0.1 (1 CPU each, token auth, dashboard on 127.0.0.1): yields
    ``{"dashboard", "gcs", "env", "raylets": (head raylet pid, worker raylet pid)}``; ``ray stop`` after."""
    import secrets
    import subprocess
    import sys

    import psutil

    def raylets() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}

    shutdown_in_process_ray()
    ray = str(Path(sys.executable).parent / "ray")
    # token auth as a real cluster runs it; the token is the cluster's own (a fresh machine has no ~/.ray token)
    env = dict(os.environ, RAY_AUTH_MODE="token", TL_SWEEP_CACHE=str(cache),
               RAY_AUTH_TOKEN=os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16))
    port, dash = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        before = raylets()
        subprocess.run([ray, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dash), "--include-dashboard", "true", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        head = raylets() - before
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        worker = raylets() - before - head
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "env": env,
               "raylets": (min(head, default=None), min(worker, default=None))}
    finally:
        stop_every_ray(env)
