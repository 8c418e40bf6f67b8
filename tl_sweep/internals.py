"""The private parts of other libraries that tl-sweep still needs, in one place.

Each entry says what it reaches into, why no public API does the job, and what breaks without it.
``tests/test_internals.py`` checks every one against the installed versions and fails with a message naming the
entry when an upgrade moves it, instead of a sweep failing (or silently misbehaving) later.

Nothing else in tl-sweep touches another library's private names.
"""

from __future__ import annotations

from typing import Any, Callable


# ------------------------------------------------------------------------------------------- Ray Tune


def with_mixins(fn: Callable, *mixins: type) -> Callable:
    """A function trainable whose Tune class also inherits ``mixins`` (before ``FunctionTrainable``).

    Why: a function trainable's process outlives its trials (``reuse_actors``), and the class Tune wraps the
    function in decides when a trial's thread is done (``cleanup``, ``reset_config``, both public hooks of
    ``Trainable``). Tune's ``wrap_function`` builds that class from ``fn.__mixins__`` (kept by
    ``tune.with_parameters``); there is no public way to extend it.
    """
    fn.__mixins__ = tuple(mixins)
    return fn


def keep_from_reuse(tune_controller: Any, trial: Any) -> bool:
    """Tell Tune not to give ``trial``'s worker another trial: when the trial ends, its actor is stopped instead
    of cached for reuse. Returns whether the worker was found.

    Why: ``reuse_actors`` is all or nothing, and a worker whose memory grew (or that ran out of memory) must
    not take the next trial. Tune caches an ended trial's actor only if it is among the controller's started
    actors (``TuneController._maybe_cache_trial_actor``); taking it out of ``_started_actors`` makes Tune stop
    it as it stops any actor it does not reuse. Called from a scheduler, which Tune hands its controller.
    """
    actor = tune_controller._trial_to_actor.get(trial)
    if actor is None:
        return False
    tune_controller._started_actors.discard(actor)
    return True


def use_callbacks(tuner: Any, callbacks: list) -> None:
    """Give a restored Tuner this process's callbacks instead of the ones pickled with its saved state.

    Why: ``Tuner.restore`` takes no ``RunConfig``: Tune runs the callbacks it pickled when the sweep was saved,
    with the state they had then (the progress display's counters, a tracking URI, and a class an older
    tl-sweep defined). A resumed sweep must show and record with its own (its progress counter goes on from the
    finished trainings). ``Tuner._local_tuner`` holds the run config a fit uses (``TunerInternal._run_config``).
    """
    tuner._local_tuner.get_run_config().callbacks = list(callbacks)


def forget_checkpoints(trial: Any) -> None:
    """Make Tune start ``trial`` over instead of restoring it: its checkpoint manager forgets every checkpoint,
    and Tune's next saved state says so.

    Why: on ``--resume`` Tune restores a trial from the checkpoint its saved state names; when none of the
    trial's checkpoints is whole any more it would fail the trial three times (ray-project/ray#27790) and there is
    no public way to say "start over". Tune's own PBT resets the same two fields
    (``_CheckpointManager._latest_checkpoint_result`` and ``_checkpoint_results``).
    """
    manager = trial.run_metadata.checkpoint_manager
    manager._latest_checkpoint_result, manager._checkpoint_results = None, []
    trial.run_metadata.invalidate_cache()  # as Trial.on_checkpoint does
    trial.invalidate_json_state()


def saved_trials(experiment_dir: str) -> dict[str, tuple[str, dict, dict]] | None:
    """The trials of the newest experiment state Tune saved in ``experiment_dir``: trial id -> (status, config,
    last result); None where it holds none.

    Why: a driver writes Tune's experiment state (its trials) and the searcher's state to a staging folder, and a
    background thread then copies them to ``storage`` one file after the other. A driver killed between the two
    copies leaves a pair that disagree: a trial the searcher gave out that Tune never heard of (it would never
    run: a study one training short), or one Tune has that the searcher does not know (a cell over its budget).
    A searcher that is restored (``restore_from_dir``, after Tune read its trials from the same folder) reads
    Tune's trials here and agrees with them. There is no public API for the trials of a saved experiment short of
    ``Tuner.restore(...).get_results()``, which reads results, not the trials that had not reported yet.
    The file is ``experiment_state-<session>.json`` (the newest name is the one Tune restores,
    ``_find_newest_experiment_checkpoint``); ``trial_data`` holds each trial's JSON state and runtime metadata.
    """
    import json
    from pathlib import Path

    files = sorted(Path(experiment_dir).glob("experiment_state-*.json"))
    if not files:
        return None
    out = {}
    for state, meta in json.loads(files[-1].read_text())["trial_data"]:
        trial, meta = json.loads(state), json.loads(meta)
        out[trial["trial_id"]] = (trial["status"], trial["config"], meta.get("last_result") or {})
    return out


def end_local_monitor_at_exit() -> None:
    """At the interpreter's exit, before Ray's own shutdown, SIGKILL the autoscaler monitor of the Ray this
    process started (nothing where it joined a cluster).

    Why: ``ray.shutdown`` sends each process it started SIGTERM and waits up to 1 s before SIGKILL; a local
    cluster's monitor never exits within that second (1.01 s measured, every time), so every ``tl-sweep run`` ended
    a second later than it needed. No public API lists the node's processes: they are
    ``ray._private.worker._global_node.all_processes`` (type -> ``ProcessInfo`` with its ``Popen``). Without this
    entry a run ends 1 s later, nothing else.
    """
    import atexit
    import subprocess

    def kill_monitor() -> None:
        import ray._private.worker
        from ray._private import ray_constants

        node = ray._private.worker._global_node
        for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node else []):
            if info.process.poll() is None:
                try:
                    info.process.kill()
                    info.process.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # Ray's shutdown that follows tries again

    atexit.register(kill_monitor)  # after ray.init registered its shutdown: runs before it


# ----------------------------------------------------------------------------------------- torchvision, torch


def fx_tracer_settings() -> dict[str, Any]:
    """The torch.fx tracer settings of torchvision's ``create_feature_extractor`` (torchvision's ops as leaf
    modules, ``math`` autowrapped).

    Why: tl-sweep cuts a model after its frozen prefix with the same tracer torchvision's public feature
    extractor uses, so any torchvision model traces as it would there; torchvision exposes the settings only
    through the private ``_set_default_tracer_kwargs``.
    """
    from torchvision.models.feature_extraction import _set_default_tracer_kwargs

    return _set_default_tracer_kwargs(None)


# ------------------------------------------------------------------------------------------------ MLflow


def open_input_python_model() -> type:
    """A base for an MLflow ``PythonModel`` whose ``predict`` input is deliberately open (file paths or uint8
    arrays of any size), so MLflow neither validates it against a type hint nor asks for one.

    Why: MLflow 3 warns at every log and load of a ``PythonModel`` whose ``predict`` has no type hint, and the hints
    it accepts would each narrow the input or turn validation on. ``PythonModel.__init_subclass__`` skips that
    check for classes with ``_skip_type_hint_validation`` (what MLflow's own ChatModel uses).
    """
    import mlflow.pyfunc

    class OpenInputModel(mlflow.pyfunc.PythonModel):
        _skip_type_hint_validation = True

    return OpenInputModel
