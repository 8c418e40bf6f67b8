"""Interrupt the driver (SIGINT, SIGKILL), then ``--resume``: nothing finished is lost or run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, kill_trees, tl_command


def children(db):
    client = MlflowClient(f"sqlite:///{db}")
    try:
        runs = client.search_runs(["1"])
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return client, []
    return client, [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_resume_after_the_driver_is_stopped(tmp_path, sig):
    db = tmp_path / "mlflow.db"
    cmd = tl_command("run", spec=SPEC, sets_=("study=null", "search.num_trials=4", "search.space.epochs={low: 3, high: 6}",
                                              "scheduler.kind=fifo", f"tracking.uri=sqlite:///{db}",
                                              "failures.checkpoint_seconds=0", "tracking.log_models=false"))
    # SIGKILL: Tune saves its state at every step, so the state names each running trial's checkpoint
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"TUNE_GLOBAL_CHECKPOINT_S": "0"} if sig == signal.SIGKILL else {}))
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # stop it once one trial finished and another has logged 2 epochs (the
            client, runs = children(db)  # first epoch's checkpoint is then in Tune's state, which SIGKILL needs)
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("val_acc") is not None
                       and len(client.get_metric_history(r.info.run_id, "val_acc")) >= 2]
            if done and running:
                witness = running[0].data.tags["tl_sweep.trial_id"]
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
        ray_of_driver = psutil.Process(proc.pid).children(recursive=True)  # its local Ray, started under it
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "tl-sweep: error: interrupted" in out, out[-2000:]
        error = next(line for line in out.splitlines() if line.startswith("tl-sweep: error: interrupted"))
        assert "continue with: tl-sweep run " in error and error.endswith("--resume"), error  # the exact command
        assert "Tuner.restore" not in out  # Tune's own advice does not compete with tl-sweep's
        # the trials that were running are not left RUNNING: KILLED, and they say that --resume continues them
        left = [r for r in children(db)[1] if r.info.status != "FINISHED"]
        assert left and all(r.info.status == "KILLED" and "--resume continues it" in r.data.tags["tl_sweep.error"]
                            for r in left)
    before = {r.info.run_id: r for r in children(db)[1] if r.info.status == "FINISHED"}
    assert before
    moved = set()
    if sig == signal.SIGKILL:
        # Tune's state lags its trials by up to its save period (>= 10 s) and a newer checkpoint replaces the
        # older one at once: a driver killed in between leaves a state naming a folder that is gone. Made certain
        # here: each interrupted trial's checkpoints move to a name newer than any the state can name.
        for r in children(db)[1]:
            if r.info.status == "RUNNING":
                for folder in (tmp_path / "ray_results").glob(f"*/{r.data.tags['tl_sweep.trial_id']}"):
                    for i, ckpt in enumerate(sorted(folder.glob("checkpoint_*"))):
                        ckpt.rename(folder / f"checkpoint_{90 + i:06d}")
                        moved.add(r.data.tags["tl_sweep.trial_id"])
        assert witness in moved, (witness, moved)

    again = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "(resumed)" in again.stderr  # progress goes to stderr
    # a resumed sweep goes on from what it had: its finished count and best first, its counter from there on
    best = max(r.data.metrics["best_val_acc"] for r in before.values())
    assert f"resumed: {len(before)} of 4 trainings had finished; best so far: source:mnist-5k " \
           f"{100 * best:.1f}%" in again.stderr, again.stderr[-3000:]
    counters = [int(line.split("/")[0].strip("[ ")) for line in again.stderr.splitlines() if line.startswith("[")]
    assert counters and counters[0] == len(before) + 1 and counters[-1] == 4, counters
    assert "UserWarning" not in again.stderr  # Optuna is told each step once (it warned on a step told again)
    if sig == signal.SIGKILL:  # restored from its newest whole checkpoint, not failed three times
        assert f"ray: trial {witness}: Tune's saved state named checkpoint_" in again.stderr, again.stderr[-3000:]
    client, runs = children(db)
    assert len(runs) == 4, [r.info.run_name for r in runs]  # no duplicate child runs
    assert len({r.data.tags["tl_sweep.trial_id"] for r in runs}) == 4
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags.get("tl_sweep.error"), again.stderr[-3000:])
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, int(r.data.params["epochs"]) + 1)), steps  # each epoch once
        if r.info.run_id in before:  # finished before the stop: not run again
            assert r.info.end_time == before[r.info.run_id].info.end_time
    parents = [r for r in client.search_runs(["1"]) if r.data.tags.get("tl_sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    if sig == signal.SIGKILL:  # the killed driver's local Ray processes may outlive it: those, nothing else
        kill_trees(ray_of_driver)


def test_a_restored_trial_continues_from_its_newest_whole_checkpoint_when_tunes_state_names_a_gone_one(tmp_path):
    """Tune's own Trial bookkeeping, as a resumed driver loads it from a state saved before the trial's newer
    checkpoints replaced the one it names: ``callbacks.StaleCheckpoints`` gives the newest whole checkpoint that
    name just before Tune restores the trial, skips a torn one, and with none whole lets the trial start over."""
    import torch
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from tl_sweep import callbacks

    tune.register_trainable("restored_fn", lambda config: None)
    lines = []
    stale = callbacks.StaleCheckpoints(lines.append)

    def trial_with(trial_id: str, on_disk: dict[int, bool]) -> tuple[Trial, Path]:
        storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name=trial_id)
        trial = Trial("restored_fn", config={}, trial_id=trial_id, storage=storage,
                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
        folder = Path(storage.trial_fs_path)
        for index, whole in on_disk.items():  # what the killed trial left: epoch = index + 1
            (folder / f"checkpoint_{index:06d}").mkdir(parents=True)
            torch.save({"epoch": index + 1}, folder / f"checkpoint_{index:06d}" / "trial.pt")
            if not whole:  # killed while Ray copied it in
                path = folder / f"checkpoint_{index:06d}" / "trial.pt"
                path.write_bytes(path.read_bytes()[:200])
        named = folder / "checkpoint_000000"  # the one the saved state names (registered as Tune did)
        trial.run_metadata.checkpoint_manager.register_checkpoint(_TrainingResult(tune.Checkpoint(str(named)), {}))
        storage.current_checkpoint_index = 0
        return trial, folder

    trial, folder = trial_with("a", {0: True})  # the state is current: nothing to do
    stale.on_trial_start(0, [trial], trial)
    assert lines == [] and torch.load(folder / "checkpoint_000000" / "trial.pt")["epoch"] == 1

    trial, folder = trial_with("b", {2: True, 3: False})  # 000000 replaced by 000002; 000003 torn
    stale.on_trial_start(0, [trial], trial)
    assert torch.load(Path(trial.checkpoint.path) / "trial.pt")["epoch"] == 3  # epoch 3's state, under the old name
    assert trial.checkpoint.path == str(folder / "checkpoint_000000")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_000000", "checkpoint_000003"]
    assert lines[-1].startswith("ray: trial b: Tune's saved state named checkpoint_000000") and \
        "(checkpoint_000002)" in lines[-1]

    trial, folder = trial_with("c", {1: False})  # nothing whole left: the trial starts over, not fails thrice
    stale.on_trial_start(0, [trial], trial)
    assert trial.latest_checkpoint_result is None
    assert lines[-1].startswith("ray: trial c: no complete checkpoint is left")


@pytest.mark.slow
def test_a_restored_re_training_phase_runs_each_configuration_once_whichever_saved_file_is_newer(tmp_path):
    """A driver's Tune state is two files (Tune's trials, the searcher's) copied to storage one after the other:
    a driver killed between the two copies leaves them disagreeing (a 2-node CI run lost a selection re-training
    and its cell's finals that way). Both ways are made here on a real Tune phase of re-trainings: Tune's trials
    older (a finished configuration missing), then the searcher's state older (a configuration it gave out
    missing from its own record). Restored, the phase trains each configuration exactly once."""
    import json
    import pickle

    import ray
    from ray import tune

    from tl_sweep import space

    def fit_one(config):
        tune.report({"val_acc": config["x"] / 10, "best_val_acc": config["x"] / 10})

    configs = [{"x": i, "role": "final"} for i in range(4)]
    path = tmp_path / "phase"

    def fit(restore: bool) -> list[int]:
        if restore:
            tuner = tune.Tuner.restore(str(path), fit_one, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(fit_one, tune_config=tune.TuneConfig(
                search_alg=space.Agreeing(space.Points(configs, 2)), num_samples=-1),
                run_config=tune.RunConfig(name="phase", storage_path=str(tmp_path), verbose=0))
        return sorted(r.config["x"] for r in tuner.fit())

    def newest(pattern: str) -> Path:
        return sorted(path.glob(pattern))[-1]

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert fit(restore=False) == [0, 1, 2, 3]
        state = json.loads(newest("experiment_state-*.json").read_text())  # Tune's trials older: x=2 not yet made
        state["trial_data"] = [t for t in state["trial_data"] if json.loads(t[0])["config"]["x"] != 2]
        newest("experiment_state-*.json").write_text(json.dumps(state))
        time.sleep(1.1)  # the restored session's files get a newer name
        assert fit(restore=True) == [0, 1, 2, 3]  # x=2 trained again (Tune's BasicVariantGenerator: [0, 1, 3])

        searcher = pickle.loads(newest("searcher-state-*.pkl").read_bytes())  # the searcher's older: x=3 not given
        three = next(t for t, i in searcher["given"].items() if configs[i]["x"] == 3)
        searcher["given"].pop(three)
        newest("searcher-state-*.pkl").write_bytes(pickle.dumps(searcher))
        generator = pickle.loads(newest("search_gen_state-*.json").read_bytes())  # (a pickle, named .json)
        newest("search_gen_state-*.json").write_bytes(pickle.dumps({**generator, "finished": False}))
        time.sleep(1.1)
        assert fit(restore=True) == [0, 1, 2, 3]  # x=3 not trained twice
    finally:
        ray.shutdown()
