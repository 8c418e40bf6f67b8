"""The runner's phases that run without Ray: a study's search gives every cell the same budget, a trial's context
comes from the resolved config (the whole runner runs in the scenario tests: test_sweep, test_faults,
test_resume, test_cluster, test_report's study; the study's rules are tests/test_study.py's)."""

from __future__ import annotations

from conftest import SPEC
from tl_sweep import data, runner, schedule, space, spec
from tl_sweep.contract import TrialConfig


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
    assert cfg.trainings() == (30, 10 * st.candidates * st.selection_seeds, 10 * st.repeats)
    assert (st.min_candidates, st.candidates) == (3, 2)  # ASHA leaves 3 full schedules; the best 2 re-trained
    # concurrent suggestions go to different cells: the first ten are one per cell and repeat
    assert len({(c.arm, c.unfrozen_blocks, c.search) for c in configs[:10]}) == 10


def test_a_trials_context_comes_from_the_resolved_config():
    cfg = spec.load(SPEC)  # the default study: resources.gpu auto, no GPU here
    prepared = data.prepare("builtin:digits", size=cfg.input["resize"], seed=0, split=(0.6, 0.2, 0.2),
                            classes=[5, 6, 7, 8, 9], log=lambda m: None)
    ctx = runner.trial_context(cfg, prepared, {"scratch": ("none", None)}, repeats=(prepared, prepared))
    assert not ctx.use_gpu and ctx.gpu_share == 0  # auto on a machine without a GPU
    assert ctx.min_epochs == 2 and ctx.rungs == (1.0,) == schedule.rungs(cfg.spec)  # epochs 2..6, grace 1
    assert not ctx.keep_search_weights  # a study publishes its finals only
    assert len(ctx.digests) == 2 and set(ctx.digests[0]) == {"train", "val", "test"}
    assert ctx.worker_growth == 0.25 and ctx.checkpoint_every == 1 and ctx.checkpoint_seconds == 30


def test_a_resumed_study_counts_the_re_trainings_it_had_finished(tmp_path):
    """What ``--resume`` reads from MLflow before it goes on: every ended training, and apart the selection and final
    re-trainings (the search phase's own count holds only search trials: a study stopped in its finals went on
    counting from the end of its search)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("resume-count")
    parent = client.create_run(exp).info.run_id
    ended = [("trial", "FINISHED", 0.6), ("trial", "FAILED", None), ("candidate", "FINISHED", 0.7),
             ("final", "FINISHED", 0.9), ("final", "KILLED", 0.95), ("trial", "RUNNING", 0.99)]
    for i, (role, status, acc) in enumerate(ended):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "tl_sweep.trial_id": f"t{i}"}).info.run_id
        for k, v in TrialConfig.of(arm="scratch", unfrozen_blocks=5, role=role, seed=i).to_params().items():
            client.log_param(run, k, v)
        if acc is not None:
            client.log_metric(run, "best_val_acc", acc)
        client.set_terminated(run, status)
    done, retrained, best = runner.finished_so_far(uri, exp, parent)
    assert (done, retrained) == (4, 2)  # KILLED and RUNNING runs continue: not finished
    assert best == {"scratch": (0.9, "t3")}


def test_a_restored_study_search_agrees_with_the_trials_tune_saved():
    """A killed driver can leave the searcher's file newer than Tune's trials, or older. The searcher follows
    Tune's trials: a trial it gave out that Tune never had is given again in its cell (its Optuna trial ends
    FAIL, so TPE neither waits on it nor lies about it); a trial Tune has that it never gave counts in its cell.
    Either way every cell ends with exactly its budget."""
    from optuna.trial import TrialState

    cfg = spec.load(SPEC, ["study.trials_per_cell=2", "study.min_candidates=1", "study.candidates=1",
                           "study.search_repeats=1", "study.depths=[0]"])
    searcher = space.StudySearcher(cfg.spec, cfg.cells, max_concurrent=2)
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert searcher.suggest("c") is None  # two at a time
    cell = {"a": (a["arm"], a["unfrozen_blocks"]), "b": (b["arm"], b["unfrozen_blocks"])}
    assert cell["a"] != cell["b"]
    assert searcher.agree({"a": ("RUNNING", a, {})}) == 1  # Tune's file was saved before b was created
    lost = next(c for c in searcher.searches if c.cell == cell["b"])
    assert lost.issued == 0 and "b" not in searcher.owner and not searcher.done()
    assert lost.tpe.study.get_trials(deepcopy=False)[0].state == TrialState.FAIL
    # the other way: Tune has a finished trial of a's cell that this (older) state never gave
    z = dict(a, lr_mult=0.5)
    assert searcher.agree({"a": ("RUNNING", a, {}),
                           "z": ("TERMINATED", z, {"best_val_acc": 0.6, "epoch": a["epochs"]})}) == 1
    mine = next(c for c in searcher.searches if c.cell == cell["a"])
    assert mine.issued == 2 and mine.scores == [(True, 0.6)]  # a's cell: a (running) and z (ended)
    given = {cell["a"]: 2}
    # and a trial this state saw running that Tune saved ended: ended here (Tune will not report it again)
    assert searcher.agree({"a": ("TERMINATED", a, {"best_val_acc": 0.7, "epoch": a["epochs"]}),
                           "z": ("TERMINATED", z, {"best_val_acc": 0.6, "epoch": a["epochs"]})}) == 1
    assert "a" not in searcher.owner and mine.scores == [(True, 0.6), (True, 0.7)] and mine.issued == 2
    n = 0
    while (c := searcher.suggest(f"n{n}")) is not searcher.FINISHED:
        assert c is not None, "the searcher waits on a trial that does not run"
        given[(c["arm"], c["unfrozen_blocks"])] = given.get((c["arm"], c["unfrozen_blocks"]), 0) + 1
        searcher.on_trial_complete(f"n{n}", {"best_val_acc": 0.5, "epoch": c["epochs"]})
        n += 1
    assert given == dict.fromkeys(cfg.cells, 2)  # b's cell given its two again, a's no third
    assert searcher.done()
