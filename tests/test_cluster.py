"""A real two-node Ray cluster on 127.0.0.1 (token auth on): ``tl-sweep submit``, trials on both nodes,
every child run on one MLflow server under one parent; multi-node pre-flight failures; resource fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, free_port, sets, tl, tl_command, two_node_cluster

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def two_nodes(cache_dir):
    with two_node_cluster(cache_dir) as cluster:
        yield cluster


SMALL = sets("study=null", "search.num_trials=2", "search.max_concurrent=2", "search.space.epochs=2",
             "scheduler.kind=fifo")


def test_no_dashboard_is_one_line(tmp_path):
    proc = tl("submit", SPEC, "--address", f"http://127.0.0.1:{free_port()}", *SMALL, cwd=tmp_path)
    assert proc.returncode == 2 and "no Ray dashboard answers" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sqlite_tracking_on_a_multi_node_cluster_is_refused(two_nodes, tmp_path):
    proc = tl("run", SPEC, "--address", two_nodes["gcs"], *SMALL, *sets(f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"),
              env=two_nodes["env"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is a file on one node" in proc.stderr.strip().splitlines()[-1]


def test_imagefolder_seen_by_every_node_runs(two_nodes, mlflow_server, tmp_path):
    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
    from PIL import Image

    for cls in ("a", "b"):
        for i in range(4):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / cls / f"{i}.png")
    proc = tl("run", SPEC, "--address", two_nodes["gcs"], *SMALL,
              *sets("data.classes=null", "data.train_per_class=null", f"data.dataset=imagefolder:{folder}",
                    f"tracking.uri={mlflow_server}", "model.weights=none", "tracking.log_models=false"),
              env=two_nodes["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # same host: every node sees it


def test_node_probe_names_what_a_node_cannot_see(tmp_path, mlflow_server):
    from tl_sweep import cluster

    problems = cluster._probe(str(tmp_path), str(tmp_path / ".marker-from-another-host"), mlflow_server,
                              [str(tmp_path / "not-here")])
    assert len(problems) == 2
    assert problems[0].startswith(f"storage: {tmp_path} is not shared") and "s3://" in problems[0]
    assert problems[1].startswith(f"data: {tmp_path / 'not-here'} does not exist on this node")
    dead = f"http://127.0.0.1:{free_port()}"
    assert "is not reachable from this node" in cluster._probe(None, None, dead, [])[0]


def test_submit_runs_trials_on_both_nodes_into_one_mlflow_server(two_nodes, mlflow_server, tmp_path):
    args = ["submit", SPEC, "--address", two_nodes["dashboard"], *SMALL,
            "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=cluster",
            "--set", f"storage={tmp_path / 'results'}"]
    proc = tl(*args, env=two_nodes["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    assert len({t.data.tags["tl_sweep.node"] for t in trials}) == 2  # one trial per 1-CPU node
    # the winner's best weights went from Ray Tune's storage to the server, with its logged models
    best = max(trials, key=lambda t: t.data.metrics["best_val_acc"])
    assert [a.path for a in client.list_artifacts(best.info.run_id)] == ["best.pt"]


def test_submit_no_wait_prints_the_job_id(two_nodes, mlflow_server, tmp_path):
    args = ["submit", SPEC, "--address", two_nodes["dashboard"], "--no-wait", *SMALL,
            "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=nowait"]
    proc = tl(*args, env=two_nodes["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    stop = subprocess.run([RAY, "job", "stop", job_id, "--address", two_nodes["dashboard"]],
                          env=two_nodes["env"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr


def test_wrong_token_is_one_line(two_nodes, tmp_path):
    env = dict(two_nodes["env"], RAY_AUTH_TOKEN="not-the-token")
    proc = tl("submit", SPEC, "--address", two_nodes["dashboard"], *SMALL, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0], proc.stderr


def test_ray_job_submit_of_tl_sweep_run_survives_its_working_dir(two_nodes, mlflow_server, tmp_path, cache_dir):
    """As a Ray user (or a KubeRay RayJob) launches it: `ray job submit --working-dir wd -- tl-sweep run`.
    Ray may remove the unpacked working_dir under the driver; the driver works from a stable copy, so the
    sweep ends FINISHED with its report."""
    import shutil

    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copy(SPEC, wd / "spec.yaml")
    run = tl_command("run", spec="spec.yaml", sets_=("study=null", "search.num_trials=2", "search.space.epochs=1",
                                                     "scheduler.kind=fifo", "model.weights=none",
                                                     "tracking.log_models=false",
                                                     f"tracking.uri={mlflow_server}", "tracking.experiment=ray-job-submit",
                                                     f"storage={tmp_path / 'results'}"))
    proc = subprocess.run([RAY, "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(wd),
                           "--", *run],
                          env=two_nodes["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-2000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("ray-job-submit")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "sweep")
    assert parent.info.status == "FINISHED"
    assert "report/report.md" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert any(p.name.startswith("_ray_pkg_") for p in (cache_dir / "jobs").iterdir())  # ran from the copy


def test_a_submitted_matrix_killed_midway_resumes_losing_no_finished_target_trial_or_epoch(two_nodes, mlflow_server,
                                                                                           tmp_path):
    """A transfer matrix is the workload that outgrows one machine. Submitted to the 2-node cluster, its driver is
    SIGKILLed once the first target has finished and a trial of the second has trained 2 of its 4 epochs: the job
    fails with its reason; ``submit --resume`` keeps the finished target as it was, continues the second in its
    own run (the trial from its checkpoint: every epoch logged once), and loses no finished trial."""
    import os
    import signal
    import time

    import psutil

    args = ["submit", SPEC, "--address", two_nodes["dashboard"],
            *sets("study.targets=[{name: low, dataset: 'builtin:digits', classes: [5, 6, 7], train_per_class: 10}, "
                  "{name: high, dataset: 'builtin:digits', classes: [7, 8, 9], train_per_class: 10}]",
                  "study.sources=[source:digits-0-4]", "study.depths=[0]", "study.trials_per_cell=1",
                  "study.min_candidates=1", "study.candidates=1", "study.selection_seeds=1", "study.search_repeats=1",
                  "study.repeats=2", "study.spaces={}", "search.space.epochs=4", "search.space.batch_size=[32]",
                  "scheduler.kind=fifo", "failures.checkpoint_seconds=0", "tracking.log_models=false",
                  f"tracking.uri={mlflow_server}", "tracking.experiment=matrix-kill",
                  f"storage={tmp_path / 'results'}")]
    proc = tl(*args, "--no-wait", env=two_nodes["env"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    client = MlflowClient(mlflow_server)

    def runs():
        exp = client.get_experiment_by_name("matrix-kill")
        return client.search_runs([exp.experiment_id], max_results=1000) if exp else []

    def epochs(run_id) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))

    def midway():  # the first target finished, a trial of the second 2 epochs into its 4
        rs = runs()
        parts = {r.data.tags.get("tl_sweep.target"): r for r in rs if r.data.tags.get("tl_sweep.role") == "target"}
        if "low" not in parts or parts["low"].info.status != "FINISHED" or "high" not in parts:
            return False
        return any(r.data.tags.get("mlflow.parentRunId") == parts["high"].info.run_id
                   and len(epochs(r.info.run_id)) >= 2 for r in rs)

    deadline = time.time() + 420
    while not midway():
        assert time.time() < deadline, "the matrix never reached its second target"
        time.sleep(0.5)
    driver = next(p.pid for p in psutil.process_iter(["cmdline"]) if "tl_sweep.cli" in (p.info["cmdline"] or [])
                  and "auto" in p.info["cmdline"])
    os.kill(driver, signal.SIGKILL)
    deadline = time.time() + 120
    while True:  # the job fails, and says why
        status = subprocess.run([RAY, "job", "status", job_id, "--address", two_nodes["dashboard"]],
                                env=two_nodes["env"], capture_output=True, text=True, timeout=60).stdout
        if "failed" in status.lower() or time.time() > deadline:
            break
        time.sleep(1)
    assert "failed" in status and "exit code 137" in status, status  # SIGKILL, said in the job's status
    before = runs()
    finished = {r.info.run_id: r.data.metrics.get("best_val_acc") for r in before
                if r.data.tags.get("tl_sweep.role") in ("trial", "final") and r.info.status == "FINISHED"}
    parts = {r.data.tags["tl_sweep.target"]: r.info.run_id for r in before
             if r.data.tags.get("tl_sweep.role") == "target"}
    resumed = tl(*args, "--resume", env=two_nodes["env"], cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "low: had finished" in resumed.stdout + resumed.stderr
    after = runs()
    top = [r for r in after if "tl_sweep.matrix" in r.data.tags]
    assert len(top) == 1 and top[0].info.status == "FINISHED"
    now = {r.data.tags["tl_sweep.target"]: r for r in after if r.data.tags.get("tl_sweep.role") == "target"}
    assert {t: r.info.run_id for t, r in now.items()} == parts  # the same target runs, continued
    assert all(r.info.status == "FINISHED" for r in now.values())
    by_id = {r.info.run_id: r for r in after}
    for rid, acc in finished.items():  # every trial that had finished: still there, finished, the same figures
        assert by_id[rid].info.status == "FINISHED" and by_id[rid].data.metrics.get("best_val_acc") == acc
    for t, r in now.items():  # 2 cells × (1 search + 1 selection + 2 finals): none twice, no epoch twice
        mine = [x for x in after if x.data.tags.get("mlflow.parentRunId") == r.info.run_id]
        assert len(mine) == 8 and all(x.info.status == "FINISHED" for x in mine), \
            (t, sorted((x.data.tags.get("tl_sweep.role"), x.info.status) for x in mine), resumed.stderr[-3000:])
        assert all(epochs(x.info.run_id) == [1, 2, 3, 4] for x in mine), t
    assert "report/report.md" in {a.path for a in client.list_artifacts(top[0].info.run_id, "report")}
