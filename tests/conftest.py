"""Shared fixtures: one cache folder per test session (decoded images, pretrained sources)."""

from __future__ import annotations

import os
import sys
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

    yield call
    if "ray" in sys.modules:  # a `run` in pytest's process may have started Ray there: the next ray.init would fail
        shutdown_in_process_ray()


def sets(*pairs: str) -> list[str]:
    """``--set`` arguments for each ``key.path=value``."""
    return [a for pair in pairs for a in ("--set", pair)]


def tl_command(*args, spec=None, sets_: tuple[str, ...] = ()) -> list[str]:
    """The command line a user's shell runs: ``python -m tl_sweep.cli ARGS [SPEC] [--set ...]``."""
    return [sys.executable, "-m", "tl_sweep.cli", *map(str, args), *([str(spec)] if spec else []), *sets(*sets_)]


def tl(*args, cwd, env: dict | None = None, timeout: float = 600, spec=None, sets_: tuple[str, ...] = ()):
    """Run ``tl-sweep`` in a subprocess, as a user would; returns the finished process (output captured)."""
    import subprocess

    return subprocess.run(tl_command(*args, spec=spec, sets_=sets_), cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def wait_http(url: str, proc=None, timeout: float = 120) -> None:
    """Poll ``url`` until it answers; fails when ``proc`` (the server) exits first or ``timeout`` passes."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if (proc is not None and proc.poll() is not None) or time.time() > deadline:
                raise RuntimeError(f"{url} never answered" + ("" if proc is None else f" (exit {proc.poll()})"))
            time.sleep(0.3)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_ROOTS: dict[str, Path] = {}  # the mlflow_server fixture's URI -> its folder (database, artifacts, log)


@contextmanager
def running_mlflow_server(root: Path):
    """A real ``mlflow server`` on 127.0.0.1, as ``tl-sweep ui`` runs it (MLflow's job runner off): sqlite store
    and artifacts in ``root``, its log in ``root/server.log``. Yields ``(uri, port)`` once ``/health`` answers;
    stops the server and its children at the end."""
    import signal
    import subprocess

    port = free_port()
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(uri + "/health", proc)
        except RuntimeError:
            raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:]) from None
        yield uri, port
    finally:  # the whole group: a server that died first may have left its workers
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` for the tests that share it (see ``running_mlflow_server``)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root) as (uri, _):
        SERVER_ROOTS[uri] = root
        yield uri


def shutdown_in_process_ray() -> None:
    """The Ray an in-process test started in pytest's own process, if any. Left running, it breaks a cluster
    started beside it (its head answered job submissions "No available agent to submit job"), and a
    `ray stop --force` kills it: Ray then ends its driver, pytest, 60 s later with exit 1."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def kill_trees(procs) -> None:
    """SIGKILL these processes and every process under them, and nothing else: a test stops the Ray it started (a
    node, a killed driver's local Ray), never a Ray of someone else's on the same machine (`ray stop` would)."""
    import psutil

    every = []
    for p in procs:
        try:
            every += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in every:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(every, timeout=30)


def stop_cluster(port: int) -> None:
    """Every process of the Ray cluster whose GCS listens on ``port`` (each node's processes name that address in
    their command line, with 127.0.0.1 or the machine's own address; its workers, and a job's driver, run under
    them), and the note by which a later ``ray.init()`` on this machine would join it."""
    import psutil

    def ours(p) -> bool:
        try:
            return any(a.endswith((f":{port}", f"={port}")) for a in p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    kill_trees([p for p in psutil.process_iter() if ours(p)])
    note = Path("/tmp/ray/ray_current_cluster")
    if note.is_file() and note.read_text().strip().endswith(f":{port}"):
        note.unlink()


@contextmanager
def two_node_cluster(cache: Path):
    """A real two-node Ray cluster on 127.0.0.1 (1 CPU each, token auth, dashboard on 127.0.0.1): yields
    ``{"dashboard", "gcs", "env", "raylets": (head raylet pid, worker raylet pid)}``; its processes stopped after
    (:func:`stop_cluster`: only this cluster's)."""
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
        shutdown_in_process_ray()
        stop_cluster(port)


@contextmanager
def chromium(failure_shot: str = "mlflow_ui_failure.png"):
    """A headless Chromium (Debian's chromium and chromium-driver; skips without them) for the MLflow UI tests.
    Yields (driver, wait_for(predicate, what), body() -> the page's text, shots folder)."""
    import shutil
    import time

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    shots = Path(os.environ.get("TL_SWEEP_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    shots.mkdir(parents=True, exist_ok=True)

    def wait_for(predicate, what: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        driver.save_screenshot(str(shots / failure_shot))
        raise AssertionError(f"the MLflow UI never showed {what}")

    try:
        yield driver, wait_for, lambda: driver.find_element(By.TAG_NAME, "body").text, shots
    finally:
        driver.quit()


def open_report_page(driver, wait_for, body, artifacts_url: str, text: str) -> int:
    """Open ``report/report.html`` in MLflow's artifact view at ``artifacts_url``, wait for ``text`` inside its frame
    and return how many inline plots it drew (each checked to have decoded); back on the page after."""
    from selenium.webdriver.common.by import By

    def shown(name: str) -> list:  # the tree's node, not a hidden copy of the name elsewhere on the page
        return [e for e in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{name}']") if e.is_displayed()]

    driver.get(artifacts_url)
    for name in ("report", "report.html"):  # the folder, then the file
        wait_for(lambda: shown(name), f"{name} in the artifact tree")
        shown(name)[0].click()
    wait_for(lambda: driver.find_elements(By.TAG_NAME, "iframe"), "report.html's frame")
    driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
    wait_for(lambda: text in body(), "the report page inside the artifact view")
    images = driver.find_elements(By.CSS_SELECTOR, 'img[src^="data:image/png"]')
    drawn = all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    driver.switch_to.default_content()
    return len(images) if drawn else 0
