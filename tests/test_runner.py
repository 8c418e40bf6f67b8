"""The runner's phases that run without Ray: a study's search gives every cell the same budget, a trial's context
comes from the resolved config (the whole runner runs in the scenario tests: test_sweep, test_faults,
test_resume, test_cluster, test_report's study; the study's rules are tests/test_study.py's)."""

from __future__ import annotations

from conftest import SPEC
from tl_sweep import data, runner, space, spec
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
    assert ctx.min_epochs == 2 and ctx.rungs == (1.0,) == space.rungs(cfg.spec)  # epochs 2..6, grace 1
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
