"""Every private part of another library that tl-sweep relies on (``tl_sweep.internals``) is still there, and does
what tl-sweep needs: checked against the installed Ray Tune, Optuna, torch and torchvision, with a message
naming the entry when an upgrade moves it."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import pytest

from tl_sweep import internals, trainable


def moved(entry: str, what: str) -> str:
    return f"tl_sweep.internals.{entry}: {what}; an upgrade moved it: adapt that entry (and only it)"


def test_tune_builds_a_function_trainables_class_from_its_mixins():
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    fn = tune.with_resources(tune.with_parameters(trainable.run_trial, ctx=None), {"cpu": 1})
    cls = wrap_function(fn)
    assert trainable.Worker in cls.__mro__, moved("with_mixins", "Tune no longer builds the class from __mixins__")
    assert cls.__mro__.index(trainable.Worker) < [c.__name__ for c in cls.__mro__].index("FunctionTrainable")


def test_tune_caches_an_ended_trials_actor_only_when_it_is_a_started_one():
    from ray.tune.execution.tune_controller import TuneController

    init = inspect.getsource(TuneController.__init__)
    cache = inspect.getsource(TuneController._maybe_cache_trial_actor)
    assert "self._trial_to_actor" in init and "self._started_actors" in init, \
        moved("keep_from_reuse", "TuneController lost _trial_to_actor or _started_actors")
    assert "not in self._started_actors" in cache, \
        moved("keep_from_reuse", "caching an ended trial's actor no longer depends on _started_actors")


@pytest.mark.slow
def test_a_stopped_trials_thread_ends_before_its_worker_does_and_a_worker_asked_to_go_is_replaced(tmp_path):
    """Real Ray Tune. (1) Tune stops each trial inside ``tune.report``; its thread then takes 1.5 s to unwind.
    Without ``trainable.Worker`` the worker process would end (or take the next trial) while that thread still
    ran: its last line (a file) would never be written. (2) With workers reused, the trial whose report asks for
    it (``replace_worker``) leaves a worker that takes no further trial (``internals.keep_from_reuse``)."""
    import ray
    from ray import tune

    from conftest import SPEC
    from tl_sweep import schedule, spec

    def _trial(config):  # reports as run_trial does, with its protocol for its thread's end (trainable._ENDED)
        from ray import tune  # noqa: F811

        trainable._ENDED.clear()
        try:
            for i in range(1, 4):
                tune.report({"i": i, "pid": os.getpid(), **({"replace_worker": "asked by the test"}
                                                          if config["n"] == config.get("replace") else {})})
        finally:
            time.sleep(config.get("unwind", 0))  # what a stopped trial still does while its thread unwinds
            Path(config["dir"], f"ended-{config['n']}").write_text(str(time.time()))
            trainable._ENDED.set()

    fn = internals.with_mixins(_trial, trainable.Worker)
    cfg = spec.load(SPEC, ["study=null", "scheduler.kind=fifo"])
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        grid = tune.Tuner(tune.with_resources(fn, {"cpu": 1}),
                          param_space={"n": tune.grid_search([1, 2, 3, 4]), "dir": str(tmp_path), "unwind": 1.5,
                                       "replace": 2},
                          tune_config=tune.TuneConfig(scheduler=schedule.make_scheduler(cfg.spec), reuse_actors=True,
                                                      max_concurrent_trials=1),
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                                    stop={"training_iteration": 2})).fit()
    finally:
        ray.shutdown()
    pids = {r.config["n"]: r.metrics["pid"] for r in grid}
    assert all(r.metrics["i"] == 2 for r in grid)  # each was stopped inside its report
    ended = {n: float((tmp_path / f"ended-{n}").read_text()) for n in pids}  # every thread finished its unwinding
    assert ended[1] < ended[2] < ended[3] < ended[4]
    assert pids[1] == pids[2] and pids[3] == pids[4] and pids[3] != pids[2], pids


def test_tunes_checkpoint_manager_keeps_the_fields_forget_checkpoints_resets():
    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    manager = _CheckpointManager(checkpoint_config=CheckpointConfig(num_to_keep=1))
    assert hasattr(manager, "_latest_checkpoint_result") and hasattr(manager, "_checkpoint_results"), \
        moved("forget_checkpoints", "Tune's _CheckpointManager lost the fields a trial restores from")


def test_torchvisions_feature_extractor_tracer_settings():
    settings = internals.fx_tracer_settings()
    assert {"leaf_modules", "autowrap_modules"} <= set(settings), moved("fx_tracer_settings", str(settings))


def test_nothing_else_touches_another_librarys_private_names():
    """Outside ``tl_sweep/internals.py``: no ``x._name`` on anything but the object's own class (``self``,
    ``cls``), and no private name imported from another library."""
    import ast

    from conftest import ROOT

    found = []
    for path in sorted((ROOT / "tl_sweep").rglob("*.py")):
        if path.name == "internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and ast.unparse(node.value) not in ("self", "cls"):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("tl_sweep") and any(
                    a.name.startswith("_") and not a.name.startswith("__") for a in node.names):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
    assert not found, f"private names of other libraries outside tl_sweep/internals.py: {found}"


def test_mlflow_skips_its_type_hint_check_for_an_open_input_model():
    import inspect

    from mlflow.pyfunc.model import PythonModel

    assert "_skip_type_hint_validation" in inspect.getsource(PythonModel.__init_subclass__), \
        moved("open_input_python_model", "PythonModel no longer reads _skip_type_hint_validation")
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from tl_sweep import mlflow_model  # noqa: F401 - defining the class is what warned

    assert not [w for w in seen if "type hint" in str(w.message).lower()], [str(w.message) for w in seen]


def test_a_local_ray_lists_its_monitor_process_where_the_exit_hook_looks():
    import ray._private.worker
    from ray._private import ray_constants
    from ray._private.node import Node

    assert hasattr(ray._private.worker, "_global_node"), moved("end_local_monitor_at_exit", "no _global_node")
    assert ray_constants.PROCESS_TYPE_MONITOR == "monitor", moved("end_local_monitor_at_exit", "monitor renamed")
    assert "self.all_processes" in inspect.getsource(Node.__init__), \
        moved("end_local_monitor_at_exit", "Node lost all_processes")
    assert "PROCESS_TYPE_MONITOR" in inspect.getsource(Node.start_monitor), \
        moved("end_local_monitor_at_exit", "the monitor is no longer a process of the node's table")


def test_tune_saves_its_trials_where_saved_trials_reads_them():
    from ray.tune.execution import experiment_state
    from ray.tune.execution.tune_controller import TuneController

    save = inspect.getsource(TuneController.save_to_dir)
    assert TuneController.CKPT_FILE_TMPL == "experiment_state-{}.json" and '"trial_data"' in save, \
        moved("saved_trials", "Tune's experiment state file or its trial_data moved")
    assert "max(matching)" in inspect.getsource(experiment_state._find_newest_experiment_checkpoint), \
        moved("saved_trials", "Tune no longer restores the experiment state with the greatest name")
