"""The one door to MLflow, against a real sqlite store: URIs, the parent run, a trial run's open → log →
close, the latest sweep, histories and artifacts."""

from __future__ import annotations

import time

import pytest

from tl_sweep import tracking
from tl_sweep.contract import Tag
from tl_sweep.tracking.calls import transient
from tl_sweep.errors import UserError


def test_a_uri_is_resolved_once_into_what_it_is_and_whether_every_node_reaches_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert tracking.resolve_uri("sqlite:///m.db") == tracking.Store(f"sqlite:///{tmp_path / 'm.db'}", "sqlite")
    assert tracking.resolve_uri("sqlite:////abs/m.db") == tracking.Store("sqlite:////abs/m.db", "sqlite")
    assert tracking.resolve_uri("http://127.0.0.1:5000") == tracking.Store("http://127.0.0.1:5000", "server")
    # a password leaves the URI for MLflow's own variables (no config, param or Tune file ever holds it)
    assert tracking.resolve_uri("https://me:s3cret@mlflow.example:443") == tracking.Store(
        "https://mlflow.example:443", "server")
    import os

    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    for uri in ("postgresql://db/mlflow", "mysql://db/mlflow", "mssql://db/mlflow"):
        assert tracking.resolve_uri(uri).kind == "database" and tracking.resolve_uri(uri).shared
    assert not tracking.resolve_uri("sqlite:///m.db").shared  # a file on one node
    with pytest.raises(UserError, match="not a tracking URI"):
        tracking.resolve_uri("./mlruns")
    with pytest.raises(UserError, match="unsupported URI"):
        tracking.resolve_uri("file:///tmp/mlruns")  # MLflow 3 refuses file stores


def test_a_trial_run_opens_logs_and_closes_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.check(uri)
    exp = tracking.experiment_id(uri, "t")
    assert tracking.experiment_id(uri, "t") == exp  # found, not created twice
    parent = tracking.start_parent(uri, exp, "sweep", {"a.b": "[1, 2]"}, {"spec.yaml": "name: t\n"},
                                   tags={"x": "1"})
    assert tracking.latest_sweep(uri, exp).info.run_id == parent
    run = tracking.TrialRun.open(uri, exp, parent, name="trial", params={"k": 1},
                                 tags={Tag.TRIAL_ID: "abc", Tag.ROLE: "trial"})
    run.log_epoch(1, {"val_acc": 0.5})
    run.log_epoch(2, {"val_acc": 0.7})
    assert run.last_step("val_acc") == 2
    assert [(m.step, m.value) for m in tracking.metric_history(uri, run.run_id, "val_acc")] == [(1, 0.5), (2, 0.7)]
    again = tracking.TrialRun.open(uri, exp, parent, name="trial", params={"k": 1},
                                   tags={Tag.TRIAL_ID: "abc", Tag.ROLE: "trial"})  # a retried attempt
    assert again.run_id == run.run_id and again.metrics["val_acc"] == 0.7
    tracking.close_run(uri, run.run_id, "FINISHED", {Tag.EPOCHS_RUN: "2"}, {"extra": 1.0})
    tracking.close_run(uri, run.run_id, "FAILED")  # already ended: the status stays
    got = tracking.get_run(uri, run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags[Tag.EPOCHS_RUN] == "2"
    assert [r.info.run_id for r in tracking.children(uri, exp, parent)] == [run.run_id]
    assert tracking.download_artifact(uri, parent, "spec.yaml", tmp_path).read_text() == "name: t\n"
    assert tracking.download_artifact(uri, parent, "absent.txt", tmp_path) is None
    assert tracking.find_sweep(uri, "t") == (exp, parent)
    with pytest.raises(UserError, match="no experiment 'nope'"):
        tracking.find_sweep(uri, "nope")


def test_runs_left_running_are_closed_as_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.experiment_id(uri, "t")
    parent = tracking.start_parent(uri, exp, "sweep", {}, {}, tags={})
    run = tracking.TrialRun.open(uri, exp, parent, name="trial", params={}, tags={Tag.TRIAL_ID: "x"})
    assert tracking.close_orphans(uri, exp, parent) == 1
    got = tracking.get_run(uri, run.run_id)
    assert got.info.status == "KILLED" and "without closing" in got.data.tags[Tag.ERROR]


def test_the_outbox_delivers_in_order_once_and_sets_aside_what_the_server_refuses(tmp_path, monkeypatch):
    """Queued writes (as an outage leaves them) reach a real sqlite store in order; re-sending a delivered
    line (a crash between sending and forgetting it) logs nothing twice; a write to a run deleted meanwhile is
    set aside in rejected.log and never blocks the queue."""
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.check(uri)
    exp = tracking.experiment_id(uri, "o")
    parent = tracking.start_parent(uri, exp, "sweep", {}, {}, tags={})
    run = tracking.TrialRun.open(uri, exp, parent, name="t", params={}, tags={Tag.TRIAL_ID: "a", Tag.ROLE: "trial"})
    gone = tracking.TrialRun.open(uri, exp, parent, name="g", params={}, tags={Tag.TRIAL_ID: "b", Tag.ROLE: "trial"})
    box = tracking.Outbox(uri)
    for epoch in (1, 2, 3):
        box.keep(run.run_id, {"op": "batch", "metrics": [("val_acc", epoch / 10, 1000 + epoch, epoch)], "tags": {}})
    box.keep(run.run_id, {"op": "batch", "metrics": [("val_acc", 0.1, 1001, 1)], "tags": {}})  # a re-sent line
    box.keep(run.run_id, {"op": "end", "status": "FINISHED", "time": 2000, "only_running": True})
    box.keep(gone.run_id, {"op": "batch", "metrics": [("val_acc", 0.5, 1001, 1)], "tags": {}})
    tracking.client(uri).delete_run(gone.run_id)
    assert tracking.waiting(uri) == 6
    assert tracking.sync(uri) == (6, 0)
    history = tracking.metric_history(uri, run.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]  # in order, none twice
    got = tracking.get_run(uri, run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags[Tag.DELAYED] == "5"
    rejected = (box.dir / "rejected.log").read_text()
    assert gone.run_id in rejected and "val_acc" in rejected


def test_a_run_id_that_contains_a_status_code_is_not_a_server_error():
    """A deleted run's refusal quotes its run id; an id with "504" inside it once read as a gateway timeout, so
    the write was retried for its whole window and then kept waiting (the outbox test failed ~1 run in 10)."""
    from mlflow.exceptions import MlflowException

    refused = MlflowException("The run f5f444eeaa50430f8f85ad0d703aa2c5 must be in the 'active' state. "
                              "Current state is deleted.")
    assert not transient(refused)
    for status in (502, 503, 504):  # MLflow's own wording for a non-JSON error page
        assert transient(MlflowException(f"API request to endpoint /api/2.0/mlflow/runs/log-batch "
                                                   f"failed with error code {status} != 200. Response body: ''"))
    assert transient(MlflowException("(sqlite3.OperationalError) database is locked"))


def _log_at(args):
    """One trial's start as a worker process makes it: open a run, wait for the others, log the split datasets."""
    uri, exp, start = args
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).create_run(exp).info.run_id
    while time.time() < start:
        pass
    try:
        tracking.log_datasets(uri, run, "builtin:digits", "builtin:digits",
                              {"train": (100, "a1"), "val": (50, "b2"), "test": (50, "c3")})
        return run, None
    except Exception as e:  # noqa: BLE001 - what the trial would have failed with
        return run, str(e)[:200]


@pytest.mark.slow  # four worker processes, 10 s of imports
def test_trials_that_start_together_each_log_the_same_new_datasets(tmp_path):
    """Found in the Fashion-MNIST study (2026-12-07): trials starting at once each log the same new dataset, MLflow
    looks it up and then inserts it, and the one that inserts second failed on the unique key (its trial failed
    and was retried). Four worker processes released at one instant, as Tune starts a search repeat's trials."""
    import multiprocessing

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("race")
    start = time.time() + 10  # after the workers' imports
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.map(_log_at, [(uri, exp, start)] * 4)
    assert [e for _, e in got] == [None] * 4, got
    client = MlflowClient(uri)
    for run, _ in got:
        assert {i.dataset.name for i in client.get_run(run).inputs.dataset_inputs} == {
            "builtin:digits (train)", "builtin:digits (val)", "builtin:digits (test)"}
