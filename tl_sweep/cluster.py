"""Ray clusters: pre-flight checks from every node, and ``tl-sweep submit`` as a Ray Job.

Pre-flight (before any trial, on every run): a trial's resources must fit on some node, or it would sit
PENDING forever. On a cluster of more than one node, each node must also see the storage path, reach the
tracking server and see the data root; each check runs as a task pinned to each node, and each failure is
one line saying what to change.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tl_sweep import redact
from tl_sweep.errors import UserError

# The trial workers' environment, set before their processes start: a local Ray inherits it from the driver
# (runner.start_ray), ``tl-sweep submit`` sends it with the job, a cluster started by hand sets it itself
# (docker/). glibc gives each new thread its own malloc arena, up to 8 per core, and Tune runs each trial in a
# new thread: a reused worker kept ~9 MiB more after each trial until every arena was in use. benchmarks/load.py
# on 2 cores, 2026-12-05, a worker's memory after its trials: glibc's default (16 arenas) 550 -> 764 MiB in 28
# trials, still rising, past its bound (limits.WorkerMemory: the worker was replaced, a new process each time);
# 8 arenas 550 -> 680 MiB, level after ~20; 2 arenas 545-552 MiB over 50 trials, at the same speed.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


def _answers(address: str, timeout: float = 5.0) -> bool:
    """Whether something listens at ``host:port`` (a Ray head's GCS port), within ``timeout`` seconds."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def ray_address(address: str | None) -> str | None:
    """The Ray cluster a sweep joins, checked in seconds, before any data is prepared or MLflow run created:
    ``--address``, else ``$RAY_ADDRESS``, else the cluster last started on this machine (``ray start``) if it
    still answers, else a new local one. A given address where nothing answers is one line (Ray itself would
    retry for minutes)."""
    given, where = (address, "--address") if address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    current = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray", "ray_current_cluster")
    latest = current.read_text().strip() if current.is_file() else ""
    if not given or given == "local":
        # Ray would join the latest `ray start` cluster of this machine; one that is gone would stall it
        return None if latest and _answers(latest) else "local"
    if given == "auto":
        if latest and _answers(latest):
            return given
        raise UserError(f"{where}: auto finds no running Ray cluster on this machine; start one (ray start --head) "
                        f"or give its address (host:6379)")
    if "://" in given and not given.startswith("ray://"):
        raise UserError(f"{where}: {given} is a URL; give the cluster's GCS address host:port (ray start --head "
                        f"prints it; usually port 6379) or auto (tl-sweep submit takes the dashboard's URL)")
    if not _answers(given):
        raise UserError(f"{where}: no Ray cluster answers at {given}; start it (ray start --head --port "
                        f"{given.rpartition(':')[2] or 6379}) or fix the address (auto, or the head's host:port)")
    return given


def _nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_resources(cpu: float, gpu: float) -> None:
    """A trial that no node can fit is refused with what it asks and what the cluster has."""
    nodes = _nodes()
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpu and n["Resources"].get("GPU", 0) >= gpu]
    if not fits:
        have = ", ".join(f"{n['NodeManagerAddress']}: cpu={n['Resources'].get('CPU', 0):g} "
                         f"gpu={n['Resources'].get('GPU', 0):g}" for n in nodes)
        raise UserError(f"resources: a trial asks cpu={cpu:g} gpu={gpu:g} but no node has that ({have}); "
                        f"lower resources.cpu/gpu or add a node that fits")


def _probe(storage: str | None, marker: str | None, tracking: str | None, paths: list[str]) -> list[str]:
    """Runs on one node: what that node cannot see or reach."""
    import urllib.request

    problems = []
    if marker and not os.path.exists(marker):
        problems.append(f"storage: {storage} is not shared: this node does not see it; use a folder every node "
                        f"mounts (NFS) or a URI such as s3://bucket/path")
    if tracking:
        try:
            urllib.request.urlopen(tracking.rstrip("/") + "/health", timeout=10).read()
        except OSError as e:
            problems.append(f"tracking.uri: {tracking} is not reachable from this node ({getattr(e, 'reason', e)}); "
                            f"start mlflow server with --host 0.0.0.0 on an address every node reaches")
    for p in paths:
        if not os.path.exists(p):
            problems.append(f"data: {p} does not exist on this node; put the data on storage every node mounts")
    return problems


def check_nodes(storage: str, store, data_paths: list[str]) -> int:
    """On a multi-node cluster, check storage, tracking and data from every node; returns the node count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _nodes()
    if len(nodes) < 2:
        return len(nodes)
    if not store.shared:  # a tracking.Store
        raise UserError(f"tracking.uri: {store.uri} is a file on one node, and this cluster has {len(nodes)}; "
                        f"run an MLflow server (mlflow server --host 0.0.0.0 --serve-artifacts) and set "
                        f"tracking.uri: http://<host>:<port>")
    marker = None
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
        marker = str(Path(storage) / f".tl-sweep-probe-{uuid.uuid4().hex}")
        Path(marker).touch()
    probe = ray.remote(num_cpus=0)(_probe)
    try:
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            storage, marker, store.uri if store.kind == "server" else None, data_paths)
            for n in nodes}
        for node, ref in refs.items():
            problems = ray.get(ref, timeout=120)
            if problems:
                raise UserError(f"node {node}: {problems[0]}")
    finally:
        if marker:
            Path(marker).unlink(missing_ok=True)
    return len(nodes)


def _monitor(uri: str, run_id: str, node: str):
    from tl_sweep import tracking

    class Monitor:
        def __init__(self):
            self.m = tracking.SystemMetrics(uri, run_id, node)

        def stop(self) -> None:
            self.m.stop()

    return Monitor


def system_metrics(uri: str, run_id: str) -> list:
    """System metrics of every node on the sweep's parent run: MLflow's own names (``system/cpu_…``, which its
    chart view shows last, under "System metrics") on one node, ``system/<node ip>/…`` on several (MLflow's
    ``node_id`` form). This node's in this process, each other node's in a small actor pinned to it. Returns
    what :func:`stop_system_metrics` stops."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tl_sweep import tracking

    here = ray.get_runtime_context().get_node_id()
    out, nodes = [], _nodes()
    for n in nodes:
        node = n["NodeManagerAddress"] if len(nodes) > 1 else None
        if n["NodeID"] == here:
            out.append(tracking.SystemMetrics(uri, run_id, node))
        else:
            actor = ray.remote(num_cpus=0)(_monitor(uri, run_id, node)).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            out.append(actor)
    return out


def stop_system_metrics(monitors: list) -> None:
    import ray

    for m in monitors:
        try:
            ray.get(m.stop.remote(), timeout=30) if hasattr(m.stop, "remote") else m.stop()
        except Exception:  # noqa: BLE001 - a lost node's monitor is gone with it
            pass


# -------------------------------------------------------------------------------------------- submit


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors all come as exceptions
        raise UserError(_explain(e, address)) from None


def _explain(e: Exception, address: str) -> str:
    import re

    text = " ".join(str(e).split())
    low = text.lower().replace(address.lower(), "")  # a port such as 40381 is not an HTTP 403
    if re.search(r"unauthori[sz]ed|forbidden|\b40[13]\b|auth", low):
        return (f"--address: the Ray cluster at {address} refused the request ({text[:140]}); export "
                f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (on the head: ray get-auth-token)")
    return (f"--address: no Ray dashboard answers at {address} ({text[:140]}); start the head with "
            f"ray start --head --dashboard-host <ip>, and give its http://<head>:8265")


def _data_paths(cfg) -> list[str]:
    """``--set`` overrides giving the data, a matrix's targets and the spec's own sources their resolved paths."""
    resolved = cfg.parts[0].spec if cfg.parts else cfg.spec
    out = []
    if cfg.parts:
        data = {p.target: p.spec.data for p in cfg.parts}
        targets = [{**t.model_dump(mode="json", exclude_unset=True), "dataset": data[t.name].dataset,
                    "exclude": data[t.name].exclude,
                    **({"root": data[t.name].root} if data[t.name].dataset.startswith("torchvision:") else {})}
                   for t in cfg.spec.study.targets or []]
        if targets:
            out.append(f"study.targets={json.dumps(targets)}")
    else:
        out.append(f"data.dataset={resolved.data.dataset}")
        if resolved.data.root:
            out.append(f"data.root={resolved.data.root}")
    if resolved.sources:
        own = [{**src.model_dump(mode="json", exclude_unset=True), "dataset": src.dataset,
                **({"root": src.root} if src.root else {})} for src in resolved.sources]
        out.append(f"sources={json.dumps(own)}")
    return out


def submit(spec_path: str, overrides: list[str], address: str, *, wait: bool = True, resume: bool = False,
           log=print) -> tuple[str, str]:
    """Submit ``tl-sweep run`` as a Ray Job: ships the spec, its checkpoint files and this tl_sweep package.

    Paths are resolved here (data roots must be where every node sees them; the cluster checks that);
    checkpoint files travel with the job. Returns (job id, final status or 'SUBMITTED').
    """
    from tl_sweep import spec as spec_mod

    spec_file = Path(spec_path)
    given = [*overrides, os.environ.get("MLFLOW_TRACKING_URI", ""),
             spec_file.read_text(errors="replace") if spec_file.is_file() else ""]
    if any(redact.has_password(g) for g in given):  # before load() moves it out of the URI
        raise UserError("tracking.uri carries a password, and a Ray Job's command line and files are readable by "
                        "anyone who can list the cluster's jobs; give the URI without it and set "
                        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD on the cluster's nodes")
    cfg = spec_mod.load(spec_path, overrides)  # refuse a bad spec before touching the cluster
    s = cfg.spec
    client = _client(address)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(spec_path, work / "spec.yaml")
        # every path as this machine resolved it (the spec's copy in the job's folder is elsewhere)
        sets = list(overrides) + [f"tracking.uri={s.tracking.uri}"] + _data_paths(cfg)
        if "storage" in s.model_fields_set or "://" in s.storage:
            sets.append(f"storage={s.storage}")
        shipped = {}
        for weights in cfg.arms.values():
            if os.path.isfile(weights):  # shipped as weights/<i>/<its name>: the arm keeps its name on the cluster
                copy = work / "weights" / str(len(shipped)) / Path(weights).name
                copy.parent.mkdir(parents=True)
                shutil.copy(weights, copy)
                shipped[weights] = str(copy.relative_to(work))
        if shipped:
            if s.study is not None and s.study.sources:
                sources = [f"{{name: {json.dumps(arm)}, weights: {json.dumps(shipped.get(w, w))}}}"
                           for arm, w in cfg.arms.items() if w != "none"]
                sets.append(f"study.sources=[{', '.join(sources)}]")
            else:
                sets.append(f"model.weights={shipped[cfg.arms[next(iter(cfg.arms))]]}")
        args = ["python", "-m", "tl_sweep.cli", "run", "spec.yaml", "--address", "auto"] + (
            ["--resume"] if resume else [])
        for item in sets:
            args += ["--set", item]
        package = str(Path(__file__).resolve().parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                job_id = client.submit_job(entrypoint=shlex.join(args), runtime_env={
                    "working_dir": str(work), "py_modules": [package],
                    "env_vars": {"TL_SWEEP_JOB": uuid.uuid4().hex, **WORKER_ENV}})
                break
            except Exception as e:  # noqa: BLE001
                # a cluster that has just started: its dashboard answers before its job agent does
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise UserError(_explain(e, address)) from None
    log(f"submitted job {job_id} to {address}")
    if not wait:
        return job_id, "SUBMITTED"

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        log(f"stopped following job {job_id}; it keeps running (ray job stop {job_id} --address {address})")
        return job_id, "RUNNING"
    return job_id, str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
