"""A sweep's winners as MLflow Models, and the registry's policy.

* **Which runs**: per arm of a study, its winner (:func:`tl_sweep.study.winner`: the chosen cell with the best
  finals' mean validation accuracy) and, of that cell's finals, the one with the best validation accuracy; in a
  plain sweep, the best trial that ran its whole schedule.
* **What is logged**: the best epoch's checkpoint (``best.pt``), an MLflow pyfunc model (images in, labels and
  probabilities out) and an ``mlflow.pytorch`` model (``pt2``), each with the run's accuracy metrics linked.
* **What is registered** (``tracking.register_as``): the overall winner, alias ``champion``, with its lineage
  (source weights, data fingerprint, spec hash, parent run) and verdict. A winner not shown above the
  majority-class rate is not registered unless ``tracking.register_below_chance`` says so.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from tl_sweep import study, tracking
from tl_sweep.checkpoint import TUNE_FILE
from tl_sweep.contract import TrialResult, percent
from tl_sweep.spec import Config

log_fn = Callable[[str], None]


def picks(cfg: Config, finals: list[TrialResult], trials: list[TrialResult], analysis) -> dict[str, TrialResult]:
    """The run to publish per arm (arm -> result): see the module's docstring."""
    out: dict[str, TrialResult] = {}
    if cfg.spec.study is not None and analysis is not None:
        for arm, cell in analysis.winners().items():
            mine = [r for r in finals if study.Cell.of(r.config) == cell and r.best_val_acc is not None and r.run_id]
            if mine:
                out[arm] = max(mine, key=lambda r: (r.best_val_acc, -r.config.seed))
        return out
    # a plain sweep: the best trial that ran its whole schedule (of equals, the first to finish kept its weights:
    # contract.Leader)
    done = [r for r in trials if r.status == "FINISHED" and r.best_val_acc is not None and r.run_id
            and r.checkpoint is not None]
    if done:
        best = max(done, key=lambda r: r.best_val_acc)
        out[best.config.arm] = best
    return out


def publish(cfg: Config, finals: list[TrialResult], trials: list[TrialResult], report, example_images: np.ndarray,
            lineage: dict[str, str], weights_of: dict[str, tuple[str, str | None]], log: log_fn) -> dict[str, str]:
    """Log each arm's winner as MLflow Models and register the champion. ``report`` is the sweep's
    :class:`tl_sweep.report.Report`; ``example_images`` real training images (N×H×W×3 uint8, the models' input
    example); ``lineage`` the tags every registered version carries (spec hash, data fingerprint, parent run).
    Returns arm -> model URI."""
    s, uri = cfg.spec, cfg.spec.tracking.uri
    analysis = report.analysis if report is not None else None
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, r in picks(cfg, finals, trials, analysis).items():
            if r.checkpoint is None:
                continue
            with r.checkpoint.as_directory() as d:  # the best epoch's weights, from Tune's storage
                path = Path(tmp) / f"{len(uris)}" / "best.pt"
                path.parent.mkdir()
                shutil.copy(Path(d) / TUNE_FILE, path)
            tracking.log_files(uri, r.run_id, [path])
            sweep = f"{cfg.experiment}-{cfg.part}" if cfg.part else cfg.experiment  # a matrix's: per target
            name = model_name(sweep, arm, r.config.unfrozen_blocks)
            uris[arm] = tracking.log_model(uri, r.run_id, path, example_images, name=name)
            torch_uri = tracking.log_torch_model(uri, r.run_id, path, name=f"{name}-torch")
            # the Models page compares logged models on the metrics linked to them
            tracking.link_metrics(uri, r.run_id, [uris[arm], torch_uri], ["best_val_acc", "test_acc"])
            log(f"mlflow: {arm}: model {uris[arm]} (run {r.run_id}, k={r.config.unfrozen_blocks}, "
                f"seed {r.config.seed})")
    if s.tracking.register_as and uris:
        winners = analysis.winners() if analysis is not None and s.study is not None else {}
        champion = max(uris, key=lambda arm: analysis.cells[winners[arm]].val) if winners else next(iter(uris))
        why = below_chance(winners.get(champion), analysis, report)
        if why and not s.tracking.register_below_chance:
            log(f"mlflow: {champion}'s winner is logged as a model but not registered as {s.tracking.register_as}: "
                f"{why}; --set tracking.register_below_chance=true registers it anyway")
            return uris
        weights, file = weights_of[champion]
        tags = {"source_weights": weights if file is None else f"sha256:{sha256(file)}", "arm": champion,
                **lineage, **accuracy(winners.get(champion), analysis, report)}
        if why:  # registered below chance on purpose: the version says so wherever it is used
            tags["below_chance"] = why
        if analysis is not None and champion in analysis.verdicts:
            tags["ntg_verdict"] = analysis.verdicts[champion].verdict
        description = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in tags.items()
                                if k in ("val_accuracy", "test_accuracy", "majority_class_rate", "ntg_verdict"))
        if why:
            description += f"; REGISTERED BELOW CHANCE: {why}"
        version = tracking.register(uri, uris[champion], s.tracking.register_as, tags, description=description)
        log(f"mlflow: registered {champion} as models:/{s.tracking.register_as}@champion (version {version})"
            + (" although it is not shown above chance (tracking.register_below_chance)" if why else ""))
    return uris


def accuracy(cell, analysis, report) -> dict[str, str]:
    """The champion's accuracy as the registered version's tags, in percent: its finals' validation and test
    accuracy (a study) or its validation accuracy (a plain sweep), and the majority-class rate to read them by."""
    if cell is not None:
        c = analysis.cells[cell]
        return {"val_accuracy": percent(c.val), "test_accuracy": percent(c.test[0] if c.test else None),
                "majority_class_rate": percent(analysis.chance.get(cell.search))}
    best = report.best_chance if report is not None else None
    return {} if best is None else {"val_accuracy": percent(best[0]), "majority_class_rate": percent(best[1])}


def model_name(experiment: str, arm: str, depth: int) -> str:
    """A logged model's name: the sweep, the arm and the depth it was trained at (``freeze-depth-mnist-5k-k5``),
    in the characters MLflow allows in a model name (letters, digits, ``-`` and ``_``)."""
    raw = f"{experiment}-{arm.removeprefix('source:')}-k{depth}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).strip("-")[:100]


def below_chance(cell, analysis, report) -> str | None:
    """Why the winner is not above the majority-class rate (a study: its cell's finals on test, Holm-corrected;
    a plain sweep: its validation accuracy, exact binomial test over the trials it is the best of); ``None``
    when it is above it."""
    from tl_sweep.report import stats

    if cell is not None:
        c = analysis.cells[cell]
        if c.above_chance:
            return None
        mean, rate = c.test[0] if c.test else float("nan"), analysis.chance.get(cell.search, float("nan"))
        return (f"its finals' test accuracy {100 * mean:.1f}% is not shown above the test split's majority-class "
                f"rate {100 * rate:.1f}% (one-sided t-test, Holm p {c.p_chance:.2g})")
    best = report.best_chance if report is not None else None
    if best is None or best[2] < stats.ALPHA:
        return None
    acc, rate, p, tries = best
    return (f"its validation accuracy {100 * acc:.1f}% is not above the validation split's majority-class rate "
            f"{100 * rate:.1f}% (exact one-sided binomial p {p:.2g}, over the {tries} trials it is the best of)")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
