"""Interrupt the driver (SIGINT, SIGKILL), then ``--resume``: nothing finished is lost or run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, stop_every_ray


def children(db):
    client = MlflowClient(f"sqlite:///{db}")
    try:
        runs = client.search_runs(["1"])
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return client, []
    return client, [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_resume_after_the_driver_is_stopped(tmp_path, sig):
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "tl_sweep.cli", "run", str(SPEC), "--set", "study=null",
           "--set", "search.num_trials=4", "--set", "search.space.epochs={low: 3, high: 6}",
           "--set", "scheduler.kind=fifo", "--set", f"tracking.uri=sqlite:///{db}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # stop it once one trial finished and another has logged an epoch
            client, runs = children(db)
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("val_acc") is not None]
            if done and running:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "tl-sweep: error: interrupted" in out and "--resume" in out, out[-2000:]
    before = {r.info.run_id: r for r in children(db)[1] if r.info.status == "FINISHED"}
    assert before

    again = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "(resumed)" in again.stderr  # progress goes to stderr
    client, runs = children(db)
    assert len(runs) == 4, [r.info.run_name for r in runs]  # no duplicate child runs
    assert len({r.data.tags["tl_sweep.trial_id"] for r in runs}) == 4
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags.get("tl_sweep.error"), again.stderr[-3000:])
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, int(r.data.params["epochs"]) + 1)), steps  # each epoch once
        if r.info.run_id in before:  # finished before the stop: not run again
            assert r.info.end_time == before[r.info.run_id].info.end_time
    parents = [r for r in client.search_runs(["1"]) if r.data.tags.get("tl_sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    if sig == signal.SIGKILL:  # the killed driver's local Ray processes may outlive it
        stop_every_ray()
