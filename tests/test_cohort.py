"""Cohorts (``resources.cohort``): trials sharing a frozen prefix train together, each exactly as it would alone.

In-process first (a :class:`~tl_sweep.cohort.Worker` with real Fits on real digits, members asking from
threads as their trials do), then a whole sweep through Ray Tune and MLflow.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import SPEC, tl
from test_train import PARAMS, ctx
from tl_sweep import cohort, train

AUG = {"enabled": True, "scale": (0.7, 1.0), "ratio": (0.9, 1.1), "hflip": True}


def members(k: int) -> dict[str, object]:
    """Four trials of one cell that differ in optimizer and learning rate, not in what cohorts share."""
    base = dataclasses.replace(PARAMS, unfrozen_blocks=k, epochs=3, batch_size=10)
    return {"a": base, "b": dataclasses.replace(base, lr_mult=0.3), "c": dataclasses.replace(base, optimizer="adam"),
            "d": dataclasses.replace(base, optimizer="adamw", lr_mult=3.0)}


def run_cohort(c, trials: dict, rungs: dict[str, set[int]] | None = None) -> tuple[dict, cohort.Worker]:
    """Each member joins and asks for its epochs from its own thread, as its Tune trial does (joins and rounds
    overlap); returns every answer."""
    co, opened = cohort.Worker(c), time.time()
    co.expect(1, len(trials), opened, len(trials))  # what the registry says: this many members, all handed out
    got: dict[str, list] = {t: [] for t in trials}

    def member(t: str) -> None:
        co.add(t, 1, opened, len(trials), trials[t].to_tune())
        for _ in range(trials[t].epochs):
            r = co.epoch(t, (rungs or {}).get(t, set()))
            got[t].append(r)
            if "error" in r:
                co.leave(t)
                return
            r["val"] = co.call(t, "evaluate", "val")
        co.leave(t)

    threads = [threading.Thread(target=member, args=(t,)) for t in trials]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    return got, co


@pytest.mark.parametrize("k, head", [(0, "linear"), (1, "mlp")])
def test_members_train_bit_for_bit_as_they_would_alone(k, head):
    """Same batches, same steps; with the MLP head's dropout, the same random draws as alone too."""
    c = dataclasses.replace(ctx({"kind": "fixed"}), augment=AUG, head=head, head_hidden=16, head_dropout=0.5)
    trials = members(k)
    got, co = run_cohort(c, trials)
    assert co.stats()["shared"] == 3 * 3  # 3 rounds, 4 members per batch: 3 prefix forwards saved per round
    for t, p in trials.items():
        alone = train.Fit(c, p, torch.device("cpu"))
        for epoch in range(p.epochs):
            m = alone.epoch()
            r = got[t][epoch]
            assert r["metrics"]["cohort_members"] == 4.0
            assert r["metrics"]["train_loss"] == m["train_loss"], (t, epoch)  # exactly: same batches, same steps
            assert r["val"] == alone.evaluate("val"), (t, epoch)
    losses = {t: got[t][-1]["metrics"]["train_loss"] for t in trials}
    assert len(set(losses.values())) == 4  # four different trainings, not one copied


def test_a_diverging_member_fails_alone_and_rungs_are_measured_inside_the_epoch():
    c = dataclasses.replace(ctx({"kind": "fixed"}), augment=AUG)
    trials = members(1)
    trials["d"] = dataclasses.replace(trials["d"], optimizer="sgd", lr_mult=1e12, head_lr_mult=1e12)
    alone = train.Fit(c, trials["a"], torch.device("cpu"))
    per_epoch = alone.steps // trials["a"].epochs
    rung = per_epoch + per_epoch // 2  # a rung inside the second epoch
    assert per_epoch >= 2
    got, _ = run_cohort(c, trials, rungs={"a": {rung}})
    assert isinstance(got["d"][-1]["error"], train.TrialError)
    assert "loss became" in str(got["d"][-1]["error"])
    for t in "abc":
        assert len(got[t]) == 3 and all("metrics" in r for r in got[t])
    assert [len(r["rungs"]) for r in got["a"]] == [0, 1, 0]
    step, acc = got["a"][1]["rungs"][0]
    accs = []
    alone.epoch()
    alone.epoch(after_step=lambda i: accs.append(alone.evaluate_mid_epoch("val")[1]) if i == rung else None)
    assert (step, acc) == (rung, accs[0])  # the accuracy a solo trial reports at that step


@pytest.mark.slow
def test_a_sweep_in_cohorts_keeps_one_tune_trial_and_one_mlflow_run_per_member(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = tl("run", spec=SPEC, cwd=tmp_path, sets_=(
        "study=null", "model.weights=none", "search.num_trials=4", "search.max_concurrent=1", "resources.cohort=2",
        "search.space.epochs=2", "search.space.batch_size=16", "search.space.unfrozen_blocks=1",
        "data.image_size=16", "scheduler.kind=fifo", f"tracking.uri=sqlite:///{db}", "tracking.experiment=co"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "up to 2 trials per worker in cohorts" in proc.stdout + proc.stderr
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("co")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(runs) == 4 and len({r.data.tags["tl_sweep.trial_id"] for r in runs}) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == [1, 2]
    for r in runs:  # where it trained: its cohort's worker
        assert r.data.tags["tl_sweep.device"] == "cpu" and r.data.tags["tl_sweep.cohort"].isdigit()
        assert "tl_sweep.warning" not in r.data.tags
    sizes = [r.data.metrics["system/cohort_members"] for r in runs]
    assert max(sizes) > 1, sizes  # some trials really trained together
    assert len({(r.data.params["optimizer"], r.data.params["lr_mult"]) for r in runs}) > 1
