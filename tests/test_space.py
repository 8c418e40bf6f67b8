"""The search space as Optuna sees it, the seeded searcher, and the ASHA rule."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from conftest import SPEC
from tl_sweep import contract, space, spec


def test_define_by_run_respects_ranges_and_constants():
    cfg = spec.load(SPEC)
    sampler = space.DefineByRun(cfg.spec.search.space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    for _ in range(60):
        t = study.ask()
        constants = sampler(t)
        p = t.params
        assert p["batch_size"] in (16, 32, 64)
        assert p["optimizer"] in ("sgd", "adam", "adamw")
        assert 0.1 <= p["lr_mult"] <= 10
        assert isinstance(p["unfrozen_blocks"], int) and 0 <= p["unfrozen_blocks"] <= 5  # max = resnet18's 5
        assert isinstance(p["epochs"], int) and 2 <= p["epochs"] <= 6
        assert constants == {"head_lr_mult": 1.0, "weight_decay": 1e-4, "layer_decay": 1.0}
        study.tell(t, 0.0)
    seen = {t.params["unfrozen_blocks"] for t in study.trials}
    assert seen == set(range(6))
    assert space.searched(cfg.spec.search.space) == ["batch_size", "optimizer", "lr_mult", "unfrozen_blocks", "epochs"]


def test_max_depends_on_the_architecture():
    cfg = spec.load(SPEC, ["model.arch=vit_b_32", "model.weights=none", "study=null"])
    assert cfg.spec.search.space.unfrozen_blocks.high == 13  # patch embedding + 12 encoder layers


def _first_configs(seed: int, n: int = 3):
    cfg = spec.load(SPEC, [f"seed={seed}"])
    searcher = space.make_searcher(cfg.spec, "a")
    return [searcher.suggest(f"t{i}") for i in range(n)]


def test_same_spec_proposes_the_same_first_trials():
    assert _first_configs(0) == _first_configs(0)
    assert _first_configs(0) != _first_configs(1)


def test_early_stopped_trials_are_pruned_not_complete():
    cfg = spec.load(SPEC)
    limiter = space.make_searcher(cfg.spec, "a")
    searcher = limiter.searcher
    a, b = limiter.suggest("a"), limiter.suggest("b")
    for tid in ("a", "b"):
        searcher.on_trial_result(tid, {"val_acc": 0.5, "training_iteration": 1})
    # Tune hands searchers the flattened result: the config arrives as "config/<key>"
    limiter.on_trial_complete("a", {"val_acc": 0.5, "best_val_acc": 0.6, "epoch": 1,
                                    **{f"config/{k}": v for k, v in a.items()}})
    limiter.on_trial_complete("b", {"val_acc": 0.7, "best_val_acc": 0.8, "epoch": b["epochs"],
                                    **{f"config/{k}": v for k, v in b.items()}})
    states = {t.number: (t.state, t.value) for t in searcher._ot_study.trials}
    assert states[0][0] == TrialState.PRUNED  # stopped after epoch 1 of a longer schedule
    assert states[1] == (TrialState.COMPLETE, 0.8)  # told the best epoch, the checkpoint it keeps
    assert a["epochs"] > 1


@pytest.mark.parametrize("epochs", [2, 3, 6])
def test_asha_compares_trials_at_the_same_schedule_fraction(epochs):
    cfg = spec.load(SPEC)  # epochs 2..6, grace_period 1
    sched = space.make_scheduler(cfg.spec)
    assert sched._time_attr == "progress" and sched._max_t == 2
    # progress as the trainable reports it: epochs rescaled to the shortest (2-epoch) schedule
    progress = [contract.progress(e, epochs, 2) for e in range(1, epochs + 1)]
    first_rung = next(e for e, p in zip(range(1, epochs + 1), progress) if p >= 1)
    assert first_rung / epochs >= 0.5 and (first_rung - 1) / epochs < 0.5  # half of its own schedule
    assert progress[-1] == pytest.approx(2)  # every schedule ends at max_t


def test_constant_epochs_keep_plain_asha():
    cfg = spec.load(SPEC, ["search.space.epochs=4"])
    sched = space.make_scheduler(cfg.spec)
    assert sched._max_t == 4  # progress == epoch when every trial has the same schedule
