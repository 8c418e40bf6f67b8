"""A node lost mid-sweep on a real two-node Ray cluster on 127.0.0.1.

The worker node's raylet and every process under it are SIGKILLed while a trial trains there: the trial
continues on the remaining node from its last checkpoint, in its one MLflow run, every epoch logged once, and
the report counts the retry. (A submitted driver SIGKILLed and ``tl-sweep submit --resume``: test_cluster.py,
on a transfer matrix.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, tl_command, two_node_cluster

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process

RAY = str(Path(sys.executable).parent / "ray")


def node_id_of(pid: int) -> str:
    arg = next(a for a in psutil.Process(pid).cmdline() if a.startswith("--node_id="))
    return arg.split("=", 1)[1]


@pytest.fixture(scope="module")
def cluster(cache_dir):
    """Two 1-CPU nodes on 127.0.0.1 for this module (its test kills the worker node)."""
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
