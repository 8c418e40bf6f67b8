"""The runner's study rules: equal budgets per cell, finalists chosen on validation with paired seeds (the whole
runner runs in the scenario tests: test_sweep, test_faults, test_resume, test_cluster, test_report's study)."""

from __future__ import annotations

from conftest import SPEC
from tl_sweep import data, runner, space, spec
from tl_sweep.contract import TrialConfig, TrialResult


def test_a_study_gives_every_cell_the_same_budget():
    cfg = spec.load(SPEC, ["study.trials_per_cell=3", "study.search_repeats=2", "study.depths=[0, 5]"])
    searcher = space.StudySearcher(cfg.spec, cfg.cells)
    configs = []
    while (c := searcher.suggest(f"t{len(configs)}")) not in (None, searcher.FINISHED):
        configs.append(TrialConfig.from_tune(c))
    counts = {}
    for c in configs:
        counts[(c.arm, c.unfrozen_blocks, c.search)] = counts.get((c.arm, c.unfrozen_blocks, c.search), 0) + 1
    assert len(counts) == len(cfg.cells) * 2 == 10 and set(counts.values()) == {3}
    assert {c.unfrozen_blocks for c in configs if c.arm == "scratch"} == {5}
    assert {c.seed for c in configs if c.search == 1} == {cfg.spec.seed + 1}
    assert cfg.trainings() == (30, 10 * cfg.spec.study.repeats)
    # concurrent suggestions go to different cells: the first ten are one per cell and repeat
    assert len({(c.arm, c.unfrozen_blocks, c.search) for c in configs[:10]}) == 10


def test_finalists_pick_best_finished_per_cell_with_the_same_seeds_in_every_arm():
    def result(arm, depth, acc, status, bs, search=0):
        c = TrialConfig(batch_size=bs, optimizer="sgd", lr_mult=1.0, head_lr_mult=1.0, weight_decay=0.0,
                        layer_decay=1.0, unfrozen_blocks=depth, epochs=3, arm=arm, seed=0, search=search)
        return TrialResult(c, status, 3, best_val_acc=acc)

    results = [result("s", 0, 0.9, "EARLY_STOPPED", 1), result("s", 0, 0.8, "FINISHED", 2),
               result("s", 1, 0.7, "FINISHED", 3), result("s", 1, 0.75, "FINISHED", 4),
               result("s", 1, None, "FAILED", 5),
               result("scratch", 5, 0.6, "FINISHED", 6), result("scratch", 5, 0.7, "FINISHED", 7, search=1)]
    out = runner.finalists(results, seed=0, repeats=2)
    assert [(c.search, c.arm, c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [
        (0, "s", 0, 2, 1000), (0, "s", 0, 2, 1001), (0, "s", 1, 4, 1000), (0, "s", 1, 4, 1001),
        (0, "scratch", 5, 6, 1000), (0, "scratch", 5, 6, 1001), (1, "scratch", 5, 7, 1100), (1, "scratch", 5, 7, 1101)]
    assert all(c.final for c in out)


def test_a_trials_context_comes_from_the_resolved_config():
    cfg = spec.load(SPEC)  # the default study: resources.gpu auto, no GPU here
    prepared = data.prepare("builtin:digits", size=cfg.input["resize"], seed=0, split=(0.6, 0.2, 0.2),
                            classes=[5, 6, 7, 8, 9], log=lambda m: None)
    ctx = runner.trial_context(cfg, prepared, {"scratch": ("none", None)}, repeats=(prepared, prepared))
    assert not ctx.use_gpu and ctx.gpu_share == 0  # auto on a machine without a GPU
    assert ctx.min_epochs == 2 and ctx.rungs == (1.0,) == space.rungs(cfg.spec)  # epochs 2..6, grace 1
    assert not ctx.keep_search_weights  # a study publishes its finals only
    assert len(ctx.digests) == 2 and set(ctx.digests[0]) == {"train", "val", "test"}
    assert ctx.worker_growth == 0.1 and ctx.checkpoint_every == 1


def test_the_spec_hash_is_of_the_spec_as_written():
    a, b = spec.load(SPEC), spec.load(SPEC, ["resources.gpu=auto"])
    assert runner.spec_hash(a) == runner.spec_hash(b)  # auto is the default
    assert runner.spec_hash(a) != runner.spec_hash(spec.load(SPEC, ["resources.gpu=0.5"]))
