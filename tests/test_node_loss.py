"""A node lost mid-sweep, and a sweep's driver killed, on a real two-node Ray cluster on 127.0.0.1.

The worker node's raylet and every process under it are SIGKILLed while a trial trains there: the trial
continues on the remaining node from its last checkpoint, in its one MLflow run, every epoch logged once, and
the report counts the retry. Then a submitted sweep's driver is killed: the job fails with its reason and
``tl-sweep submit --resume`` finishes the same sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, tl, tl_command, two_node_cluster

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process

RAY = str(Path(sys.executable).parent / "ray")


def node_id_of(pid: int) -> str:
    arg = next(a for a in psutil.Process(pid).cmdline() if a.startswith("--node_id="))
    return arg.split("=", 1)[1]


@pytest.fixture(scope="module")
def cluster(cache_dir):
    """Two 1-CPU nodes on 127.0.0.1 for this module (the first test kills the worker node; the second runs on
    what is left, as a cluster that lost a node would)."""
    with two_node_cluster(cache_dir) as c:
        assert c["raylets"][0] and c["raylets"][1]
        yield {**c, "worker": c["raylets"][1]}


def trial_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


EPOCHS = 8  # a trial still trains for ~6 epochs after the 2 the tests wait for


def sweep_args(mlflow_server, tmp_path, experiment, n, epochs=EPOCHS):
    return ["--set", "study=null", "--set", f"search.num_trials={n}", "--set", "search.max_concurrent=2",
            "--set", f"search.space.epochs={epochs}", "--set", "search.space.unfrozen_blocks=[4]",
            "--set", "scheduler.kind=fifo", "--set", "model.weights=none", "--set", "failures.max_failures=2",
            "--set", "failures.checkpoint_seconds=0", "--set", "tracking.log_models=false",
            "--set", f"tracking.uri={mlflow_server}", "--set", f"tracking.experiment={experiment}",
            "--set", f"storage={tmp_path / 'results'}"]


def epochs_logged(client, run_id) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def test_a_node_lost_mid_sweep_costs_a_retry_not_a_trial(cluster, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    worker_node = node_id_of(cluster["worker"])
    proc = subprocess.Popen(tl_command("submit", SPEC, "--address", cluster["dashboard"],
                                       *sweep_args(mlflow_server, tmp_path, "node-loss", 2)),
                            env=cluster["env"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def training_on_worker():
            return [r for r in trial_runs(client, "node-loss") if r.data.tags.get("tl_sweep.node") == worker_node
                    and len(epochs_logged(client, r.info.run_id)) >= 2]

        victim = wait_for(training_on_worker, 300, "a trial with 2 epochs on the worker node")[0]
        node = psutil.Process(cluster["worker"])
        for p in node.children(recursive=True) + [node]:  # the raylet, its workers and agents
            p.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    runs = trial_runs(client, "node-loss")
    assert len(runs) == 2 and len({r.data.tags["tl_sweep.trial_id"] for r in runs}) == 2  # no duplicate run
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    again = client.get_run(victim.info.run_id)
    assert int(again.data.tags["tl_sweep.retries"]) >= 1
    assert epochs_logged(client, victim.info.run_id) == list(range(1, EPOCHS + 1))  # every epoch once, none twice
    parent = next(r for r in client.search_runs([victim.info.experiment_id])
                  if r.data.tags.get("tl_sweep.role") == "sweep")
    report = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "lost a worker or node and continued from its last checkpoint" in report


def test_a_killed_driver_fails_the_job_and_submit_resume_finishes_the_sweep(cluster, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    # 4 epochs: killed after a trial's 2nd, the rest trains on the node the first test left (one CPU)
    args = ["submit", SPEC, "--address", cluster["dashboard"], *sweep_args(mlflow_server, tmp_path, "driver", 2,
                                                                           epochs=4)]
    proc = tl(*args, "--no-wait", env=cluster["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    wait_for(lambda: any(len(epochs_logged(client, r.info.run_id)) >= 2 for r in trial_runs(client, "driver")),
             300, "a trial with 2 epochs")
    def driver():  # the job's driver: `tl-sweep run ... --address auto` under the head's job supervisor
        return next((p.pid for p in psutil.process_iter(["cmdline"]) if "tl_sweep.cli" in (p.info["cmdline"] or [])
                     and "auto" in p.info["cmdline"]), None)

    os.kill(wait_for(driver, 60, "the job's driver"), signal.SIGKILL)

    def job_status():
        out = subprocess.run([RAY, "job", "status", job_id, "--address", cluster["dashboard"]], env=cluster["env"],
                             capture_output=True, text=True, timeout=60).stdout
        return out if "FAILED" in out or "failed" in out else None

    status = wait_for(job_status, 120, "the job to fail")
    assert "failed" in status and "exit code 137" in status, status  # SIGKILL, said in the job's status
    parents = [r for r in client.search_runs([client.get_experiment_by_name("driver").experiment_id])
               if r.data.tags.get("tl_sweep.role") == "sweep"]
    resumed = tl(*args, "--resume", env=cluster["env"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = [r for r in client.search_runs([client.get_experiment_by_name("driver").experiment_id])
             if r.data.tags.get("tl_sweep.role") == "sweep"]
    assert [p.info.run_id for p in after] == [p.info.run_id for p in parents]  # the same sweep, continued
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    runs = trial_runs(client, "driver")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), (
        [(r.info.status, r.data.tags.get("tl_sweep.error"), r.data.tags.get("tl_sweep.trial_id")) for r in runs],
        resumed.stderr[-3000:])
    assert all(epochs_logged(client, r.info.run_id) == list(range(1, 4 + 1)) for r in runs)
