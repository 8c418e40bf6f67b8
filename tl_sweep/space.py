"""Spec search space → Optuna define-by-run function.

A define-by-run function (rather than a fixed Ray Tune ``param_space``) lets ranges depend on the resolved
model, e.g. ``unfrozen_blocks: {low: 0, high: max}`` becomes ``0..5`` for resnet18 and ``0..13`` for
vit_b_16. Each dimension keeps one name and one fixed set of choices, since Optuna refuses a categorical whose
values change between trials (optuna#2564). Constants are returned as a dict so they reach the trial config
too: every trial config carries every dimension, under the same names as the MLflow params.
"""

from __future__ import annotations

from typing import Any

import optuna

from tl_sweep.spec import Range, Space

DIMENSIONS = tuple(Space.model_fields)


class DefineByRun:
    """The function OptunaSearch calls once per trial to sample ``space`` (a class: Tune pickles it).

    With ``depths``, ``unfrozen_blocks`` is not sampled but assigned round-robin by trial number, so a
    study's budget covers every depth evenly while TPE searches the other dimensions; ``extra`` constants
    (the study arm) are added to every trial.
    """

    def __init__(self, space: Space, depths: list[int] | None = None, extra: dict[str, Any] | None = None):
        self.dims = {name: getattr(space, name) for name in DIMENSIONS}
        self.depths, self.extra = depths, dict(extra or {})

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        constants = dict(self.extra)
        for name, dim in self.dims.items():
            if name == "unfrozen_blocks" and self.depths:
                constants[name] = self.depths[trial.number % len(self.depths)]
                continue
            if isinstance(dim, Range):
                if dim.is_int:
                    trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
                else:
                    trial.suggest_float(name, float(dim.low), float(dim.high), log=dim.log)
            elif isinstance(dim, list):
                trial.suggest_categorical(name, dim)
            else:
                constants[name] = dim
        return constants


def depths(space: Space) -> list[int]:
    """Every ``unfrozen_blocks`` value the (resolved) space allows."""
    dim = space.unfrozen_blocks
    if isinstance(dim, Range):
        return list(range(int(dim.low), int(dim.high) + 1))
    return sorted(int(v) for v in (dim if isinstance(dim, list) else [dim]))


def searched(space: Space) -> list[str]:
    """The dimensions that are searched (not constants)."""
    return [n for n in DIMENSIONS if isinstance(getattr(space, n), (Range, list))]
