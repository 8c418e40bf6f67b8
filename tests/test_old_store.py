"""A store an earlier release wrote stays readable: tl-sweep 0.1.0 at 89c1313 (before ``label_smoothing`` existed)
started a small study and was interrupted with Ctrl-C after 3 of its 6 search trials (tests/data/old_store:
``make.py`` made ``store.tar.gz`` from ``spec.yaml``). Today's code re-reports it from MLflow alone and resumes it
to the end."""

from __future__ import annotations

import csv
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT, tl

FIXTURE = ROOT / "tests" / "data" / "old_store"
STORE = Path("/tmp/tl-sweep-old-store")  # where it was written: its runs, Tune state and Optuna studies name it


@pytest.mark.slow
def test_a_store_an_earlier_release_wrote_is_re_reported_and_resumed(tmp_path):
    from mlflow.tracking import MlflowClient

    shutil.rmtree(STORE, ignore_errors=True)
    STORE.mkdir(parents=True)
    with tarfile.open(FIXTURE / "store.tar.gz") as tar:
        tar.extractall(STORE, filter="data")
    shutil.copy(FIXTURE / "spec.yaml", STORE / "spec.yaml")
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("old-store").experiment_id],
                                "tags.`tl_sweep.role` = 'sweep'")[0]
    before = {r.info.run_id for r in client.search_runs([parent.info.experiment_id],
                                                         f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
              if r.info.status == "FINISHED"}
    assert parent.info.status == "KILLED" and len(before) == 3
    assert all("label_smoothing" not in client.get_run(r).data.params for r in before)  # older than the dimension

    got = tl("report", "--run", parent.info.run_id, "--tracking-uri", uri, "--out", tmp_path / "old", cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    with open(tmp_path / "old" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} >= before and all(float(r["label_smoothing"]) == 0.0 for r in rows)

    got = tl("run", "--resume", spec=STORE / "spec.yaml", cwd=STORE, timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "resuming" in got.stderr
    parent = client.get_run(parent.info.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    roles = [r.data.tags["tl_sweep.role"] for r in children]
    assert parent.info.status == "FINISHED"
    assert sorted(roles) == ["candidate"] * 2 + ["final"] * 4 + ["trial"] * 6
    assert all(r.info.status == "FINISHED" for r in children)  # every run the resumed sweep touched is closed
    assert before <= {r.info.run_id for r in children}  # the trials finished before are kept, not run again
    report = (STORE / "reports").glob("old-store-*/report.md")
    assert any("Key results" in p.read_text() for p in report)
    shutil.rmtree(STORE, ignore_errors=True)
