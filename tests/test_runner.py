"""The runner's study rules: every depth covered evenly, finalists chosen on validation (the whole runner runs
in the scenario tests: test_sweep, test_faults, test_resume, test_cluster, test_report's tiny study)."""

from __future__ import annotations

import optuna

from conftest import SPEC
from tl_sweep import runner, space, spec
from tl_sweep.contract import TrialConfig, TrialResult


def test_study_covers_every_depth_evenly():
    cfg = spec.load(SPEC)
    fn = space.DefineByRun(cfg.spec.search.space, depths=space.depths(cfg.spec.search.space), extra={"arm": "a"})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    seen = []
    for _ in range(12):
        t = study.ask()
        c = fn(t)
        seen.append(c["unfrozen_blocks"])
        assert c["arm"] == "a" and "unfrozen_blocks" not in t.params
        study.tell(t, 0.5)
    assert sorted(seen) == sorted(list(range(6)) * 2)


def test_finalists_pick_best_finished_per_arm_and_depth():
    def result(depth, acc, status, bs):
        c = TrialConfig(batch_size=bs, optimizer="sgd", lr_mult=1.0, head_lr_mult=1.0, weight_decay=0.0,
                        layer_decay=1.0, unfrozen_blocks=depth, epochs=3, arm="s", seed=0)
        return TrialResult(c, status, 3, best_val_acc=acc)

    results = [result(0, 0.9, "EARLY_STOPPED", 1), result(0, 0.8, "FINISHED", 2), result(1, 0.7, "FINISHED", 3),
               result(1, 0.75, "FINISHED", 4), result(1, None, "FAILED", 5)]
    out = runner.finalists(results, seed=0, repeats=2)
    assert [(c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [(0, 2, 1000), (0, 2, 1001),
                                                                        (1, 4, 1000), (1, 4, 1001)]
    assert all(c.role == "final" and c.final for c in out)
