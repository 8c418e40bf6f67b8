"""The search space as Optuna sees it, the seeded searcher, and the ASHA rule."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from conftest import SPEC
from tl_sweep import contract, schedule, space, spec
from tl_sweep.contract import TrialConfig


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
        assert constants == {"head_lr_mult": 1.0, "weight_decay": 1e-4, "layer_decay": 1.0, "label_smoothing": 0.0}
        study.tell(t, 0.0)
    seen = {t.params["unfrozen_blocks"] for t in study.trials}
    assert seen == set(range(6))


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
    searcher = limiter.tpe
    a, b = limiter.suggest("a"), limiter.suggest("b")
    for tid in ("a", "b"):
        searcher.on_trial_result(tid, {"val_acc": 0.5, "training_iteration": 1})
    # Tune hands searchers the flattened result: the config arrives as "config/<key>"
    limiter.on_trial_complete("a", {"val_acc": 0.5, "best_val_acc": 0.6, "epoch": 1,
                                    **{f"config/{k}": v for k, v in a.items()}})
    limiter.on_trial_complete("b", {"val_acc": 0.7, "best_val_acc": 0.8, "epoch": b["epochs"],
                                    **{f"config/{k}": v for k, v in b.items()}})
    states = {t.number: (t.state, t.value) for t in searcher.study.trials}
    assert states[0][0] == TrialState.PRUNED  # stopped after epoch 1 of a longer schedule
    assert states[1] == (TrialState.COMPLETE, 0.8)  # told the best epoch, the checkpoint it keeps
    assert a["epochs"] > 1


def test_rungs_are_the_ones_ray_asha_uses_and_fall_at_one_fraction_of_every_schedule():
    for sets, expected in ((["study=null"], (1.0,)), (["study=null", "search.space.epochs={low: 9, high: 12}"],
                                                        (1.0, 3.0))):
        cfg = spec.load(SPEC, sets)
        asha = schedule.make_scheduler(cfg.spec).make()  # the ASHA the sweep's scheduler runs
        milestones = sorted(m for m, _ in asha._brackets[0]._rungs if m < asha._max_t)
        assert schedule.rungs(cfg.spec) == expected == tuple(milestones)
    # a 3-epoch trial of 4 steps per epoch reaches the rung at half its schedule: step 6, inside epoch 2
    assert contract.rung_steps((1.0,), 2, 12) == {6: 1.0} and contract.rung_steps((1.0,), 2, 5) == {2: 1.0}


def test_a_study_runs_asha_inside_each_cell_never_across():
    from types import SimpleNamespace

    cfg = spec.load(SPEC)
    sched = schedule.make_scheduler(cfg.spec)
    trial = lambda tid, arm, k, r=0: SimpleNamespace(trial_id=tid, config=TrialConfig.of(  # noqa: E731
        arm=arm, seed=0, unfrozen_blocks=k, search=r).to_tune())
    a1, a2, b1, c1 = trial("a1", "src", 0), trial("a2", "src", 0), trial("b1", "src", 5), trial("c1", "src", 0, 1)
    for t in (a1, a2, b1, c1):
        sched.on_trial_add(None, t)
    rung = lambda acc: {"progress": 1.0, "val_acc": acc}  # noqa: E731
    assert sched.on_trial_result(None, a1, rung(0.9)) == sched.CONTINUE  # first at its rung
    assert sched.on_trial_result(None, a2, rung(0.2)) == sched.STOP  # below its own cell's first trial
    assert sched.on_trial_result(None, b1, rung(0.2)) == sched.CONTINUE  # another depth: judged apart
    assert sched.on_trial_result(None, c1, rung(0.2)) == sched.CONTINUE  # same cell, another search repeat


def test_constant_epochs_keep_plain_asha():
    cfg = spec.load(SPEC, ["search.space.epochs=4", "study=null"])
    sched = schedule.make_scheduler(cfg.spec).make()
    assert sched._max_t == 4  # progress == epoch when every trial has the same schedule


@pytest.mark.slow
def test_a_real_tune_run_with_constant_epochs_tells_optuna_pruned(tmp_path):
    """Real Ray Tune, real Optuna, the real searcher and scheduler: a trial ASHA stops reaches Optuna as PRUNED
    even when ``epochs`` is a constant (Tune hands searchers the flattened result)."""
    import ray
    from optuna.trial import TrialState
    from ray import tune

    def trainable(config):  # reports as tl-sweep's trainable does: epochs, progress, best-epoch score
        best = 0.0
        for epoch in range(1, config["epochs"] + 1):
            acc = config["lr_mult"] / 10 * epoch / config["epochs"]
            best = max(best, acc)
            tune.report({"val_acc": acc, "best_val_acc": best, "epoch": epoch,
                         "progress": contract.progress(epoch, config["epochs"], 3)})

    cfg = spec.load(SPEC, ["study=null", "search.space.epochs=3", "search.num_trials=8", "search.max_concurrent=2",
                           "search.space.unfrozen_blocks=0", "scheduler.reduction_factor=2"])
    searcher, scheduler = space.make_searcher(cfg.spec, "a"), schedule.make_scheduler(cfg.spec)
    assert schedule.rungs(cfg.spec) == (1.0, 2.0)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        grid = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                                                 num_samples=8),
                          run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    finally:
        ray.shutdown()
    epochs_run = sorted(r.metrics["epoch"] for r in grid)
    states = [t.state for t in searcher.tpe.study.trials]
    stopped = sum(e < 3 for e in epochs_run)
    assert stopped >= 1, epochs_run  # lr_mult spreads the scores: ASHA stops the worse half at its rungs
    assert states.count(TrialState.PRUNED) == stopped
    assert states.count(TrialState.COMPLETE) == 8 - stopped


def test_halving_cuts_cells_by_validation_keeps_every_source_and_the_full_scratch_budget():
    """The real StudySearcher (real TPE per cell), driven by hand: 2 sources × 3 depths + scratch, 8 trials per
    cell, eta 2: rungs at 2, 4, 8 trials. Source a's cells score high, b's low: a's best cells go on, b keeps
    its best cell; nothing waits for a rung it does not need."""
    cfg = spec.load(SPEC, ["study.sources=[source:digits-0-4, source:digits-0-4-shuffled]", "study.depths=[0, 2, 4]",
                           "study.search_repeats=1", "study.trials_per_cell=8", "study.allocate=halving",
                           "study.first_rung=2"])
    cells = cfg.cells
    quality = {(arm, d): (0.9 if "shuffled" not in arm else 0.5) + d / 100 for arm, d in cells}
    prior = {c: -v for c, v in quality.items()}  # a prior that disagrees: it only breaks ties
    searcher = space.StudySearcher(cfg.spec, cells, prior=prior)
    issued: dict[tuple, int] = {}
    n = 0
    while True:
        tid = f"t{n}"
        config = searcher.suggest(tid)
        if config is space.TuneSearcher.FINISHED:
            break
        assert config is not None, "the searcher waited with no trial running"
        cell = (config["arm"], config["unfrozen_blocks"])
        issued[cell] = issued.get(cell, 0) + 1
        searcher.on_trial_complete(tid, {"best_val_acc": quality.get(cell, 0.7), contract.METRIC: 0.0,
                                         "epoch": config["epochs"]})
        n += 1
    a, b = "source:digits-0-4", "source:digits-0-4-shuffled"
    assert issued[("scratch", cfg.max_blocks)] == 8  # the baseline always gets the full budget
    assert issued[(a, 4)] == 8 and issued[(b, 4)] == 8  # the best cell of each source reaches the end
    assert issued[(a, 2)] == 4 and issued[(a, 0)] == 2 and issued[(b, 0)] == 2 and issued[(b, 2)] == 2
    cut = {(c["cell"], c["after_trials"]) for c in searcher.cuts}
    assert cut == {(f"{a}@k=2", 4), (f"{a}@k=0", 2), (f"{b}@k=0", 2), (f"{b}@k=2", 2)}
    assert sum(issued.values()) == 8 + 2 * 8 + 4 + 3 * 2  # vs 7 × 8 = 56 on the grid


def test_a_halving_rung_waits_for_its_running_trials():
    cfg = spec.load(SPEC, ["study.sources=[source:digits-0-4]", "study.depths=[0, 2, 4]", "study.search_repeats=1",
                           "study.trials_per_cell=4", "study.allocate=halving"])
    searcher = space.StudySearcher(cfg.spec, cfg.cells)
    running = []
    while (config := searcher.suggest(f"t{len(running)}")) not in (None, space.TuneSearcher.FINISHED):
        running.append((f"t{len(running)}", config))
    assert len(running) == 3 * 2 + 4  # the first rung of 3 cells, and scratch's whole budget
    assert searcher.suggest("x") is None  # the rung is not decided while its trials run
    for tid, config in running:
        searcher.on_trial_complete(tid, {"best_val_acc": config["unfrozen_blocks"] / 10})
    more = [searcher.suggest(f"u{i}") for i in range(2)]
    assert all(c is not None and c is not space.TuneSearcher.FINISHED for c in more)
    assert {c["unfrozen_blocks"] for c in more} <= {2, 4}  # the better half went on


def test_a_halving_rung_ranks_by_whole_schedules_and_keeps_a_tie_no_estimate_can_break():
    """At a rung a cell stands by its best trial that ran its whole schedule (the finals' rule), not by an
    early-stopped one; the deepest cell has no estimate (no frozen prefix), so a tie with it is kept, not cut."""
    cfg = spec.load(SPEC, ["study.sources=[source:digits-0-4]", "study.depths=[0, 2, 4]", "study.search_repeats=1",
                           "study.trials_per_cell=4", "study.allocate=halving", "study.eta=3", "study.first_rung=2"])
    a = "source:digits-0-4"
    searcher = space.StudySearcher(cfg.spec, cfg.cells, prior={(a, 0): 1.0, (a, 2): 2.0})
    scores = {0: [(True, 0.8), (True, 0.6)], 2: [(False, 0.95), (True, 0.7)], 4: [(True, 0.6), (True, 0.8)]}
    running = []
    while (config := searcher.suggest(f"t{len(running)}")) not in (None, space.TuneSearcher.FINISHED):
        running.append((f"t{len(running)}", config))
    seen = {0: 0, 2: 0, 4: 0}
    for tid, config in running:
        if config["arm"] == "scratch":
            searcher.on_trial_complete(tid, {"best_val_acc": 0.5, "epoch": config["epochs"]})
            continue
        k = config["unfrozen_blocks"]
        whole, val = scores[k][seen[k]]
        seen[k] += 1
        searcher.on_trial_complete(tid, {"best_val_acc": val, "epoch": config["epochs"] - (not whole)})
    assert searcher.suggest("u0") is not None
    assert {c["cell"] for c in searcher.cuts} == {f"{a}@k=2"}  # its 95% trial was stopped early
    assert searcher.cuts[0]["after_trials"] == 2


def test_asha_never_leaves_a_cell_fewer_than_min_candidates_full_schedules():
    """A cell of 4 trials and min_candidates 3: ASHA may stop one trial at its rung; a second stop would leave
    the cell 2 configurations that can run their whole schedule, so that trial goes on."""
    from types import SimpleNamespace

    cfg = spec.load(SPEC, ["study.trials_per_cell=4", "study.min_candidates=3", "scheduler.reduction_factor=2"])
    sched = schedule.make_scheduler(cfg.spec)
    config = TrialConfig.of(arm="src", seed=0, unfrozen_blocks=0).to_tune()
    trials = [SimpleNamespace(trial_id=f"t{i}", config=config) for i in range(4)]
    for t in trials:
        sched.on_trial_add(None, t)
    rung = lambda acc: {"progress": 1.0, "val_acc": acc}  # noqa: E731 (half of every schedule: epochs 2..6)
    got = [sched.on_trial_result(None, t, rung(acc)) for t, acc in zip(trials, (0.9, 0.2, 0.1, 0.05))]
    assert got == [sched.CONTINUE, sched.STOP, sched.CONTINUE, sched.CONTINUE], got
    assert sched.on_trial_result(None, trials[0], {"progress": 2.0, "val_acc": 0.95}) == sched.STOP  # its end
    plain = schedule.make_scheduler(spec.load(SPEC, ["study.trials_per_cell=4", "study.min_candidates=1",
                                                  "scheduler.reduction_factor=2"]).spec)
    for t in trials:
        plain.on_trial_add(None, t)
    assert [plain.on_trial_result(None, t, rung(acc)) for t, acc in zip(trials, (0.9, 0.2, 0.1, 0.05))] == [
        plain.CONTINUE, plain.STOP, plain.STOP, plain.STOP]  # ASHA alone, with no floor


def test_a_restored_plain_search_follows_the_trials_tune_saved():
    """Tune's trials saved before the searcher's: the trial the searcher gave out after them is given again, and
    the sweep still gets exactly ``num_trials`` (Ray's ConcurrencyLimiter would have counted the lost one)."""
    cfg = spec.load(SPEC, ["study=null", "search.num_trials=3", "search.max_concurrent=2"])
    searcher = space.make_searcher(cfg.spec, "a")
    a = searcher.suggest("a")
    assert searcher.suggest("b") is not None
    assert searcher.suggest("c") is None  # two at a time
    assert searcher.agree({"a": ("RUNNING", a, {})}) == 1 and (searcher.issued, searcher.running) == (1, {"a"})
    given = ["a"]
    for tid in ("c", "d", "e"):
        if (config := searcher.suggest(tid)) not in (None, searcher.FINISHED):
            given.append(tid)
            searcher.on_trial_complete(tid, {"best_val_acc": 0.5, "epoch": config["epochs"]})
    assert given == ["a", "c", "d"] and searcher.suggest("f") is None  # a still runs
    # a ended after this state was saved, and Tune saved it ended: it will not report again, so it ends here
    saved = {t: ("TERMINATED", {}, {"best_val_acc": 0.5, "epoch": a["epochs"]}) for t in given}
    assert searcher.agree(saved) == 1 and searcher.suggest("f") == searcher.FINISHED and searcher.done()
    assert "b" not in searcher.tpe.trials
