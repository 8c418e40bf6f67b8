"""tl-sweep: transfer-learning sweeps over torchvision models with Ray Tune, Optuna and MLflow.

The public API (the CLI is a thin layer over it)::

    import tl_sweep

    cfg = tl_sweep.load("search_spaces/freeze_depth.yaml", ["search.num_trials=4"])
    summary = tl_sweep.run(cfg)                  # trials, finals, the report
    summary.best.config                          # a TrialConfig
    tl_sweep.build_report(uri, exp_id, run_id)   # rebuild a report from MLflow alone

Everything else lives in modules named by their concern (``spec``, ``space``, ``models``, ``data``,
``features``, ``train``, ``trainable``, ``tracking``, ``report``, ``runner``, ``cluster``); see
docs/architecture.md. Names are imported on first use, so ``import tl_sweep`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Config", "Summary", "TrialConfig", "TrialResult", "UserError", "build_report", "load", "run",
           "__version__"]

_LAZY = {"Config": ("tl_sweep.spec", "Config"), "load": ("tl_sweep.spec", "load"),
         "run": ("tl_sweep.runner", "run"), "Summary": ("tl_sweep.runner", "Summary"),
         "TrialConfig": ("tl_sweep.contract", "TrialConfig"), "TrialResult": ("tl_sweep.contract", "TrialResult"),
         "UserError": ("tl_sweep.errors", "UserError"), "build_report": ("tl_sweep.report", "build")}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tl-sweep")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tl_sweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from tl_sweep.contract import TrialConfig, TrialResult
    from tl_sweep.errors import UserError
    from tl_sweep.report import build as build_report
    from tl_sweep.runner import Summary, run
    from tl_sweep.spec import Config, load
