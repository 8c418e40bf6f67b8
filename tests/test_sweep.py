"""End to end: ``tl-sweep run`` (real Ray, real sqlite MLflow, a real ResNet18 at 32 px)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import SPEC, tl

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process

PARAMS = ("batch_size", "optimizer", "lr_mult", "unfrozen_blocks", "epochs", "arch", "weights", "seed")


def test_cli_sweep_nests_trials_under_one_parent(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = tl("run", spec=SPEC, cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"), sets_=(
        "study=null", "search.num_trials=4", "search.max_concurrent=2", "search.space.epochs=[2, 3]",
        "search.space.batch_size=[32, 64]", f"tracking.uri=sqlite:///{db}", "tracking.experiment=e2e"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[  4/4]" in proc.stderr and "[  4/4]" not in out  # progress on stderr, results on stdout
    assert "best val %" in out and "%" in out.split("best val %")[1].splitlines()[1]  # accuracy in percent
    assert "workflowType=machine_learning" in out

    client = MlflowClient(f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "resolved.yaml"}
    assert parent.data.params["search.num_trials"] == "4"
    assert parent.data.metrics["best_val_acc"] == max(t.data.metrics["best_val_acc"] for t in trials)
    reported = {}  # what each trial really reported to Tune, epoch by epoch (Tune's result.json per trial)
    for f in Path(tmp_path, "ray_results").glob("*/*/result.json"):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        reported[lines[0]["mlflow_run_id"]] = lines
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.info.status == "FINISHED"
        assert set(PARAMS) <= set(t.data.params)
        history = client.get_metric_history(t.info.run_id, "val_acc")
        epochs_run = int(t.data.tags["tl_sweep.epochs_run"])
        assert sorted(m.step for m in history) == list(range(1, epochs_run + 1))
        for name in ("train_loss", "val_loss", "system/train_img_per_s"):
            assert len(client.get_metric_history(t.info.run_id, name)) == epochs_run
        assert [m.step for m in client.get_metric_history(t.info.run_id, "system/startup_seconds")] == [1]
        assert 0 < t.data.metrics["system/scheduled_to_first_step_seconds"] < 120  # measured by the driver
        if int(t.data.params["unfrozen_blocks"]) < 5:  # a frozen prefix: validation runs on its stored features
            assert "val (" in t.data.tags["tl_sweep.feature_cache"], t.data.tags
        epochs = int(t.data.params["epochs"])
        # ASHA's time is the fraction of the trial's own schedule, in epochs of the shortest (2): its one rung
        # (grace period 1) is half of every schedule; a 3-epoch trial reports it in the middle of epoch 2
        lines = reported[t.info.run_id]
        rung = next(line for line in lines if line["progress"] >= 1)
        assert rung["progress"] == 1.0 and abs(rung["steps"] - rung["total_steps"] / 2) <= 0.5
        assert [line["progress"] for line in lines if line["steps"] % (line["total_steps"] // epochs) == 0] == \
            [e * 2 / epochs for e in range(1, epochs_run + 1)]
        if epochs_run < epochs:  # stopped at the rung, no later
            assert t.data.tags["tl_sweep.early_stopped"] == "true" and lines[-1] is rung
        else:
            assert "tl_sweep.early_stopped" not in t.data.tags and lines[-1]["progress"] == 2.0
    # the winner (best trial that ran its schedule) keeps its best epoch's weights and is an MLflow Model;
    # no other trial stores a 45 MB checkpoint (tracking.checkpoints: winners)
    # (of equals, the first to finish: only a trial that led the sweep when it finished wrote its weights)
    finished = [t for t in trials if "tl_sweep.early_stopped" not in t.data.tags]
    top = max(t.data.metrics["best_val_acc"] for t in finished)
    published = [t for t in trials if [a.path for a in client.list_artifacts(t.info.run_id)] == ["best.pt"]]
    assert len(published) == 1 and all(not client.list_artifacts(t.info.run_id) for t in trials
                                       if t is not published[0])
    best = published[0]
    assert best in finished and best.data.metrics["best_val_acc"] == top
    path = client.download_artifacts(best.info.run_id, "best.pt", str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["classes"] == ["5", "6", "7", "8", "9"]
    assert ckpt["val_acc"] == best.data.metrics["best_val_acc"]
    assert ckpt["model"]["fc.weight"].shape == (5, 512)
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    k = best.data.params["unfrozen_blocks"]
    assert {m.name for m in models} == {f"e2e-mnist-5k-k{k}", f"e2e-mnist-5k-k{k}-torch"}  # sweep, arm, depth
    assert {m.source_run_id for m in models} == {best.info.run_id}
    for m in models:  # the Models page compares them on their accuracy
        assert {x.key: x.value for x in m.metrics} == {"best_val_acc": best.data.metrics["best_val_acc"]}
    names = [t.info.run_name for t in trials]
    assert len(set(names)) == len(names) and all(t.data.tags["tl_sweep.trial_id"] in t.info.run_name
                                                 for t in trials)  # every trial run named apart
    assert not list(Path(tmp_path, "ray_results").glob("*/*/checkpoint_*"))  # Tune's copies are gone


def test_a_trial_no_node_fits_is_refused(tmp_path):
    proc = tl("run", spec=SPEC, cwd=tmp_path, timeout=300,
              sets_=("study=null", "resources.gpu=1", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "a trial asks cpu=1 gpu=1 but no node has that" in line


def test_a_reused_worker_keeps_its_memory_level_over_many_trials(tmp_path):
    """One worker, 12 short trials: what it holds after each (its ``worker_memory_mb``) stays level. Before
    ``cluster.WORKER_ENV`` every trial's new thread took a new malloc arena and the worker kept ~9 MiB more after
    each trial (550, 560, 570, 588, 597, 607 MiB... here), until its bound replaced it with a new process."""
    db = tmp_path / "mlflow.db"
    proc = tl("run", spec=SPEC, cwd=tmp_path, sets_=(
        "study=null", "model.weights=none", "search.num_trials=12", "search.max_concurrent=1",
        "search.space.epochs=1", "search.space.batch_size=16", "search.space.unfrozen_blocks=0",
        "data.train_per_class=2", "data.image_size=16", "scheduler.kind=fifo", "tracking.log_models=false",
        f"tracking.uri=sqlite:///{db}", "tracking.experiment=level"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("level").experiment_id], "tags.`tl_sweep.role` = 'trial'")
    runs.sort(key=lambda r: r.info.start_time)
    assert len({r.data.tags["tl_sweep.worker"] for r in runs}) == 1  # one process, reused: none replaced
    held = [r.data.metrics["system/worker_memory_mb"] for r in runs[1:]]
    assert len(held) == 11 and max(held[3:]) - max(held[:3]) < 30, held
