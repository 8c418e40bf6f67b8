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
    st = cfg.spec.study  # 10 cells × (2 candidates × 2 seeds) selection re-trainings, × repeats finals
    assert cfg.trainings() == (30, 10 * st.candidates * st.selection_seeds, 10 * st.repeats) == (30, 40, 50)
    assert (st.min_candidates, st.candidates) == (3, 2)  # ASHA leaves 3 full schedules; the best 2 re-trained
    # concurrent suggestions go to different cells: the first ten are one per cell and repeat
    assert len({(c.arm, c.unfrozen_blocks, c.search) for c in configs[:10]}) == 10


def result(arm, depth, acc, status, bs, search=0, role="trial", seed=0):
    c = TrialConfig.of(batch_size=bs, unfrozen_blocks=depth, epochs=3, arm=arm, seed=seed, role=role, search=search)
    return TrialResult(c, status, 3, best_val_acc=acc)


def test_candidates_are_each_cells_best_configurations_full_schedules_first_with_new_seeds():
    results = [result("s", 0, 0.95, "EARLY_STOPPED", 1), result("s", 0, 0.8, "FINISHED", 2),
               result("s", 0, 0.7, "FINISHED", 3), result("s", 0, 0.9, "FINISHED", 4),
               result("s", 1, 0.7, "FINISHED", 5), result("s", 1, None, "FAILED", 6),
               result("scratch", 5, 0.6, "FINISHED", 7), result("scratch", 5, 0.7, "FINISHED", 8, search=1)]
    out = runner.candidates(results, seed=0, n=2, seeds=2)
    assert [(c.search, c.arm, c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [
        (0, "s", 0, 4, 2000), (0, "s", 0, 4, 2001), (0, "s", 0, 2, 2000), (0, "s", 0, 2, 2001),  # finished first
        (0, "s", 1, 5, 2000), (0, "s", 1, 5, 2001),  # a failed trial is no candidate
        (0, "scratch", 5, 7, 2000), (0, "scratch", 5, 7, 2001), (1, "scratch", 5, 8, 2100), (1, "scratch", 5, 8, 2101)]
    assert all(c.candidate and not c.searched for c in out)
    three = runner.candidates(results, seed=0, n=3, seeds=1)  # fewer full schedules than n: a stopped one fills in
    assert [c.batch_size for c in three if (c.arm, c.unfrozen_blocks) == ("s", 0)] == [4, 2, 3]
    assert [c.batch_size for c in runner.candidates(results, 0, 4, 1) if (c.arm, c.unfrozen_blocks) == ("s", 0)] \
        == [4, 2, 3, 1]


def test_finalists_are_each_cells_best_selection_mean_with_the_same_seeds_in_every_arm():
    selection = [result("s", 0, acc, "FINISHED", bs, role="candidate", seed=sd)
                 for bs, accs in ((4, (0.95, 0.70)), (2, (0.85, 0.84))) for sd, acc in zip((2000, 2001), accs)]
    # a lucky single run (0.95) is not the pick: bs 2's mean 0.845 beats bs 4's 0.825
    selection += [result("s", 1, 0.8, "FINISHED", 5, role="candidate", seed=sd) for sd in (2000, 2001)]
    selection += [result("scratch", 5, 0.9, "FAILED", 6, role="candidate", seed=2000),  # failed: counts 0
                  result("scratch", 5, 0.9, "FINISHED", 6, role="candidate", seed=2001),
                  result("scratch", 5, 0.5, "FINISHED", 7, role="candidate", seed=2000),
                  result("scratch", 5, 0.5, "FINISHED", 7, role="candidate", seed=2001)]
    out = runner.finalists(selection, seed=0, repeats=2)
    assert [(c.search, c.arm, c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [
        (0, "s", 0, 2, 1000), (0, "s", 0, 2, 1001), (0, "s", 1, 5, 1000), (0, "s", 1, 5, 1001),
        (0, "scratch", 5, 7, 1000), (0, "scratch", 5, 7, 1001)]
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
    assert ctx.worker_growth == 0.25 and ctx.checkpoint_every == 1 and ctx.checkpoint_seconds == 30


def test_the_spec_hash_is_of_the_spec_as_written():
    a, b = spec.load(SPEC), spec.load(SPEC, ["resources.gpu=auto"])
    assert runner.spec_hash(a) == runner.spec_hash(b)  # auto is the default
    assert runner.spec_hash(a) != runner.spec_hash(spec.load(SPEC, ["resources.gpu=0.5"]))


def test_progress_lines_carry_an_eta_and_a_terminal_gets_a_live_bar():
    import io
    from types import SimpleNamespace

    def trial(i, acc, epoch=3):
        return SimpleNamespace(trial_id=f"t{i}", status="TERMINATED", config={"unfrozen_blocks": 0, "optimizer": "sgd",
                                                                             "batch_size": 32, "lr_mult": 1.0,
                                                                             "epochs": 3},
                               last_result={"val_acc": acc, "best_val_acc": acc, "epoch": epoch})

    lines = []
    plan = runner.Plan(total=6)
    plain = runner.Progress(3, lines.append, plan=plan, stream=io.StringIO())  # not a terminal: lines only
    for i in range(3):
        plain.on_trial_complete(0, [], trial(i, 0.5))
    assert "[  1/3] t0 k=0 sgd bs=32" in lines[0] and "val_acc 0.500" in lines[0]
    # no ETA until three ended (the first ones paid for the workers' start), then one for the whole sweep
    assert ["eta ~" in x for x in lines] == [False, False, True]
    plan.first -= 10  # 2 trainings in the 10 s since the first ended: 3 left take ~15 s
    assert plan.eta() == "eta ~15s"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    live = runner.Progress(2, lines.append, plan=plan, stream=term)  # the next phase of the same sweep
    running = SimpleNamespace(status="RUNNING")
    live.on_trial_start(0, [running, running], None)
    live.on_trial_complete(0, [running], trial(4, 0.8, epoch=1))
    out = term.getvalue()
    assert "4/6" in out and "1 running" in out and "best 0.800" in out  # trainings of the whole sweep, live
    assert "[  1/2] t4" in out and "(early-stopped)" in out and len(lines) == 3  # the line above the bar
    import pickle

    assert pickle.loads(pickle.dumps(live)).bar is None  # Tune pickles its callbacks: the bar is remade
