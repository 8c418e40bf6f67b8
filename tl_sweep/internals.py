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
