"""The trial contract: what a trial is told, what it reports, and the rules every module reads the same way.

A leaf: it imports nothing of tl-sweep, and every other module may read it.

:data:`DIMENSIONS` is the one table of search dimensions (name, type, default, allowed values): the spec's
``search.space`` schema (``spec.Space``), :class:`TrialConfig`'s fields, Optuna's parameters and MLflow's params
all come from it. One flat, typed :class:`TrialConfig` is at once the Optuna parameters (plus constants), the
Ray Tune config, the MLflow params of the trial's run and what its checkpoint stores (nanoGPT's one-config
idea); a study's final re-trainings carry the same type (``role="final"``). :class:`TrialContext` is what a
trial needs besides its config (built once by ``runner.trial_context``); :class:`TrialReport` is what it tells
Tune; :class:`TrialResult` is how it ended.

Defined here once: the metric and its mode, the MLflow tag names, the early-stop rule, the status rule and
the ``progress`` a trial reports for ASHA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

METRIC = "val_acc"  # reported every epoch; the searcher and scheduler rank on it
MODE = "max"
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")  # train.make_optimizer builds each
# Reference learning rates at batch size 256 (lr_mult = 1): the torchvision ImageNet recipe for SGD, the usual 1e-3
# for the adaptive methods. A trial's learning rate is REFERENCE_LR[optimizer] × lr_mult × batch_size / 256.
REFERENCE_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}


def learning_rate(optimizer: str, lr_mult: float, batch_size: int) -> float:
    """The learning rate a trial's unfrozen blocks train at (the head at ``head_lr_mult`` times it)."""
    return REFERENCE_LR[optimizer] * lr_mult * batch_size / 256
PREDICTIONS = "predictions.csv"  # a final's artifact: per image of test and val, its row, label, prediction
# what a trial cost, not what it found: in MLflow under system/ (the section its pages show last, after the
# accuracy and loss charts); Tune's results keep the plain names
BOOKKEEPING = ("compute_seconds", "startup_seconds", "epoch_seconds", "train_img_per_s", "worker_memory_mb",
               "cohort_members", "trainable_blocks", "scheduled_to_first_step_seconds")


def mlflow_key(metric: str) -> str:
    """A trial metric's name in MLflow: bookkeeping under ``system/``, results as they are."""
    return f"system/{metric}" if metric in BOOKKEEPING else metric

Status = Literal["FINISHED", "EARLY_STOPPED", "FAILED"]


@dataclass(frozen=True)
class Dimension:
    """One search dimension. ``name`` is at once the spec's key under ``search.space``, the Optuna parameter,
    the Tune config key, the MLflow param and the checkpoint's field; a trial reads it as ``type``.

    In a spec a dimension is a constant, a list of choices or a ``{low, high, log}`` range; every value it can
    take must be one of ``choices`` (where given) or pass ``check``; ``rule`` says what is allowed, in words.
    """

    name: str
    type: type  # int, float or str
    default: Any  # a constant, a list of choices or {"low": ..., "high": ...}
    rule: str
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    choices: tuple = ()
    up_to_max: bool = False  # ``max`` is allowed: the architecture's block count


# Adding a dimension: a row here, and the code that uses it (docs/architecture.md shows one).
DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("batch_size", int, 32, "it must be a whole number >= 1", "images per step", check=lambda v: v >= 1),
    Dimension("optimizer", str, "sgd", f"choose from {', '.join(OPTIMIZERS)}",
              "sgd (momentum 0.9, Nesterov), adam, adamw, rmsprop", choices=OPTIMIZERS),
    Dimension("lr_mult", float, 1.0, "it must be a number > 0 (it multiplies the optimizer's reference LR)",
              "multiplies the optimizer's reference learning rate", check=lambda v: v > 0),
    Dimension("head_lr_mult", float, 1.0, "it must be a number > 0",
              "the new head's LR relative to the backbone (the d2l recipe uses 10)", check=lambda v: v > 0),
    Dimension("weight_decay", float, 1e-4, "it must be a number >= 0", "not applied to norms and biases",
              check=lambda v: v >= 0),
    Dimension("layer_decay", float, 1.0, "it must be in (0, 1]; 1 turns layer decay off",
              "LR × layer_decay**d for the block d steps below the head (1 = off)", check=lambda v: 0 < v <= 1),
    Dimension("unfrozen_blocks", int, {"low": 0, "high": "max"}, "it must be a whole number >= 0 or max",
              "the head plus the last k blocks train; the rest is frozen", check=lambda v: v >= 0, up_to_max=True),
    Dimension("epochs", int, 5, "it must be a whole number >= 1", "the trial's own schedule length",
              check=lambda v: v >= 1),
    Dimension("label_smoothing", float, 0.0, "it must be in [0, 1)", "the training loss's label smoothing (0 = off)",
              check=lambda v: 0 <= v < 1),
)
NAMES = tuple(d.name for d in DIMENSIONS)  # the search dimensions' names, in spec order


class Tag:
    """MLflow tag names (one place; the report and the resume logic read what trials wrote)."""

    ROLE = "tl_sweep.role"  # sweep | target (a matrix's part) | trial | final
    TRIAL_ID = "tl_sweep.trial_id"
    ARM = "tl_sweep.arm"
    SOURCE = "tl_sweep.source"
    DEPTH = "tl_sweep.depth"
    NODE = "tl_sweep.node"
    WORKER = "tl_sweep.worker"  # the worker process (node:pid) the trial ran in: reused across trials
    DEVICE = "tl_sweep.device"  # what the trial trained on: cuda:0 (its own GPU, see GPU_IDS) or cpu
    GPU_IDS = "tl_sweep.gpu_ids"  # the GPUs Ray gave the trial (CUDA_VISIBLE_DEVICES in its worker)
    COHORT = "tl_sweep.cohort"  # the cohort (resources.cohort) the trial trained in, numbered per sweep
    WARNING = "tl_sweep.warning"  # something the trial worked around (a GPU it could not use)
    ERROR = "tl_sweep.error"
    FAILURE = "tl_sweep.failure"  # TrialError | OutOfMemory: failures a retry would repeat
    EPOCHS_RUN = "tl_sweep.epochs_run"
    DELAYED = "tl_sweep.delayed_writes"  # writes kept in the outbox during a tracking outage, delivered late
    RETRIES = "tl_sweep.retries"  # times Tune restarted the trial from its checkpoint (a lost worker or node)
    EARLY_STOPPED = "tl_sweep.early_stopped"
    FEATURE_CACHE = "tl_sweep.feature_cache"
    SPEC_HASH = "tl_sweep.spec_hash"
    SUPERSEDED = "tl_sweep.superseded"
    PARENT = "mlflow.parentRunId"
    NOTE = "mlflow.note.content"  # a run's description: what the MLflow UI shows at the top of its page
    # the parent (sweep) run's
    ARCH = "tl_sweep.arch"
    ARMS = "tl_sweep.arms"
    DATA_FINGERPRINT = "tl_sweep.data_fingerprint"
    DATA = "tl_sweep.data."  # + classes, n_train, n_val, n_test, chance, val_chance, fixed_splits (data.describe)
    CHANCE_BY_SEARCH = "tl_sweep.data.chance_by_search"  # the test split's majority-class rate per search repeat
    OPTUNA_STORAGE = "tl_sweep.optuna_storage"
    BEST_TRIAL = "tl_sweep.best_trial"
    BEST = "tl_sweep.best."  # + arm and each dimension of the best trial
    # a transfer matrix's: on its run, the parts in order (JSON: [{part, target, arch}]); on each part's run (nested
    # under the matrix's, role "target"), its target and part names
    MATRIX = "tl_sweep.matrix"
    TARGET = "tl_sweep.target"
    PART = "tl_sweep.part"


class _TrialConfigMethods:
    """What every :class:`TrialConfig` can do (its fields come from :data:`DIMENSIONS`)."""

    @classmethod
    def of(cls, *, arm: str, seed: int, **dims: Any) -> TrialConfig:
        """A config built in code (a source's pretraining, a test): each dimension not given takes its default
        from :data:`DIMENSIONS` (a dimension whose default is a range must be given)."""
        return cls(arm=arm, seed=seed, **dims)

    @classmethod
    def from_tune(cls, config: dict[str, Any]) -> TrialConfig:
        """From a Ray Tune trial config (Optuna's sampled values plus constants; or a final's whole config)."""
        return cls(**{f.name: _cast(f, config[f.name]) for f in dataclasses.fields(cls) if f.name in config})

    def to_tune(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_params(self) -> dict[str, str]:
        """MLflow params (strings); :meth:`from_params` reads them back typed."""
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrialConfig:
        """From a trial run's MLflow params. A run logged before a field existed reads with its default (a
        dimension's default, ``role`` trial, ``search`` 0): an older sweep stays readable."""
        return cls(**{f.name: _cast(f, params[f.name]) for f in dataclasses.fields(cls) if f.name in params})

    @property
    def searched(self) -> bool:
        """A search trial (the others re-train a chosen configuration with new seeds)."""
        return self.role == "trial"

    @property
    def candidate(self) -> bool:
        """A study's selection re-training: one of a cell's best configurations, a new seed, validation only."""
        return self.role == "candidate"

    @property
    def final(self) -> bool:
        """A study's final re-training: a cell's chosen configuration, scored once on the test split."""
        return self.role == "final"

    @property
    def lr(self) -> float:
        """The learning rate it trains at (:func:`learning_rate`), which ``lr_mult`` alone does not say."""
        return learning_rate(self.optimizer, self.lr_mult, self.batch_size)

    def dims(self) -> dict[str, Any]:
        return {d: getattr(self, d) for d in NAMES}

    def name(self, several_arms: bool, repeats: bool = False) -> str:
        """A readable run name, what tells it apart first (MLflow's runs table cuts names short):
        ``mnist-5k·k=2·r1·final1000·sgd·bs32·lr×0.34`` (the arm where there are several, the search repeat where
        there are several, the role and seed of a re-training)."""
        role = {"candidate": f"select{self.seed}", "final": f"final{self.seed}"}.get(self.role)
        parts = ([self.arm.removeprefix("source:")] if several_arms else []) + [f"k={self.unfrozen_blocks}"] \
            + ([f"r{self.search}"] if repeats else []) + ([role] if role else []) \
            + [self.optimizer, f"bs{self.batch_size}", f"lr×{self.lr_mult:.2g}"]
        return "·".join(parts)


def _field(d: Dimension) -> tuple:
    """A dimension's field. Its default (a constant default; a range has none) is also what a run logged before
    the dimension existed trained with: an older sweep's runs read back with it (``from_params``)."""
    return (d.name, d.type) if isinstance(d.default, dict) else (d.name, d.type, field(default=d.default))


TrialConfig = dataclasses.make_dataclass(
    "TrialConfig",
    [_field(d) for d in DIMENSIONS]
    + [("arm", str), ("seed", int), ("role", str, field(default="trial")),
       # role: trial (a search trial), candidate (a study's selection re-training), final (scored on the test split)
       ("search", int, field(default=0))],  # which search repeat of a study (its own seeds, its own finals)
    bases=(_TrialConfigMethods,), frozen=True, kw_only=True)
TrialConfig.__module__ = __name__
TrialConfig.__doc__ = """One trial's configuration: the search dimensions (:data:`DIMENSIONS`), which arm (weights), the
seed, the role (``trial``, ``candidate`` or ``final``) and the search repeat. Keyword arguments only; a dimension
not given takes its default (a dimension whose default is a range must be given)."""


def percent(fraction: float | None) -> str:
    """An accuracy as a person reads it, everywhere tl-sweep prints one: a percentage with one decimal
    (``93.9%``). Machines read the raw fraction (Tune's results, MLflow metrics, CSV)."""
    return "–" if fraction is None or fraction != fraction else f"{100 * fraction:.1f}%"


def _cast(f: dataclasses.Field, v: Any) -> Any:
    if f.type is int:
        return int(float(v)) if isinstance(v, str) else int(v)
    if f.type is float:
        return float(v)
    return str(v)


def stopped_early(epochs_run: int, epochs: int) -> bool:
    """The early-stop rule: a trial that reported fewer epochs than its schedule was stopped by the scheduler."""
    return epochs_run < epochs


def status(failed: bool, epochs_run: int, epochs: int) -> Status:
    """The status rule for a trial's outcome (Tune result, summary row and report read it the same way)."""
    if failed:
        return "FAILED"
    return "EARLY_STOPPED" if stopped_early(epochs_run, epochs) else "FINISHED"


def rung_steps(rungs: tuple[float, ...], min_epochs: int, total_steps: int) -> dict[int, float]:
    """The optimizer step at which a trial reaches each rung: the same fraction of every schedule, rounded to
    the nearest step (a rung falls between epochs when it must)."""
    return {max(1, round(r / min_epochs * total_steps)): r for r in rungs}


def progress(epoch: int, epochs: int, min_epochs: int) -> float:
    """What a trial reports as ASHA's time: its epoch rescaled so every schedule ends at ``min_epochs``.

    ASHA then compares trials at the same fraction of their own schedules (docs/search.md).
    """
    return epoch * min_epochs / epochs


@dataclass
class TrialReport:
    """What a trial tells Tune at each report: the one definition of the keys that the searcher, the scheduler
    and the driver read back (:meth:`of`), so none of them is written as a string elsewhere."""

    val_acc: float | None  # METRIC: this report's validation accuracy (an epoch's end or a rung inside one)
    best_val_acc: float | None  # the best epoch's: what the searcher ranks, the weights the trial keeps
    epoch: int  # epochs completed
    progress: float  # ASHA's time: the fraction of the trial's own schedule, in epochs of the shortest (docs/search.md)
    mlflow_run_id: str
    steps: int | None = None
    total_steps: int | None = None
    trial_error: str | None = None  # a deterministic failure (NaN loss, out of memory): the trial ended FAILED
    first_step_unix: float | None = None  # when training began (the driver measures scheduling -> first step)
    replace_worker: str | None = None  # why this trial's worker must take no further trial (limits.WorkerMemory)
    test_acc: float | None = None  # a final's held-out test accuracy, at its last epoch
    metrics: dict[str, float] = field(default_factory=dict)  # the epoch's other metrics (train_loss, ...)

    def to_tune(self) -> dict[str, Any]:
        out = dict(self.metrics)
        out.update({f.name: v for f in _REPORT_FIELDS if f.name != "metrics" and (v := getattr(self, f.name))
                    is not None})
        return out

    @classmethod
    def of(cls, result: dict[str, Any] | None) -> TrialReport:
        """Read a Tune result (or Tune's flattened copy of one) back; missing keys are None."""
        r = result or {}
        return cls(**{f.name: r.get(f.name) for f in _REPORT_FIELDS if f.name != "metrics"},
                     metrics={k: v for k, v in r.items() if k not in _REPORT_NAMES})

    @property
    def epochs_run(self) -> int:
        return int(self.epoch or 0)


_REPORT_FIELDS = dataclasses.fields(TrialReport)
_REPORT_NAMES = {f.name for f in _REPORT_FIELDS}
assert METRIC in _REPORT_NAMES  # the metric the searcher and scheduler rank on is a field of the report


@dataclass
class TrialResult:
    """How a trial ended: from Tune on the driver, or from MLflow when a report is rebuilt."""

    config: TrialConfig
    status: Status
    epochs_run: int
    best_val_acc: float | None = None
    test_acc: float | None = None
    trial: str = ""  # Tune trial id
    run_id: str = ""  # MLflow run id
    name: str = ""  # MLflow run name
    error: str | None = None
    seconds: float | None = None  # compute seconds (on its device), start to last epoch
    checkpoint: Any = None  # Tune's Checkpoint with the best epoch's weights (trials that ran their schedule)
    retries: int = 0  # restarts from its last checkpoint after a lost worker or node
    delayed: int = 0  # writes a tracking outage held in the outbox, delivered late

    def row(self) -> dict[str, Any]:
        """A flat dict (tables, CSV)."""
        return {"trial": self.trial, "run_id": self.run_id, "name": self.name, **self.config.to_tune(),
                "lr": self.config.lr,
                "best_val_acc": self.best_val_acc, "test_acc": self.test_acc, "epochs_run": self.epochs_run,
                "status": self.status, "seconds": self.seconds, "retries": self.retries, "error": self.error}


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its :class:`TrialConfig`, resolved once on the driver."""

    arch: str
    arms: dict[str, tuple[str, str | None]]  # arm name -> (model.weights, resolved checkpoint file or None)
    head: str
    head_hidden: int
    head_dropout: float
    regime: dict[str, Any]
    input: dict[str, Any]
    augment: dict[str, Any]
    data: Any  # data.Prepared: the splits of search repeat 0 (and of a plain sweep)
    seed: int
    min_epochs: int
    use_gpu: bool
    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    feature_cache: bool = True  # reuse a frozen prefix's output (tl_sweep.features)
    memory_limit: int | None = None  # bytes a CPU trial's process may hold (resources.memory_gb)
    precision: str = "auto"  # resources.precision: auto (train.precision_of), bf16, fp32
    gpu_share: float = 0.0  # resources.gpu: a fraction < 1 also caps the trial's share of GPU memory
    checkpoint_every: int = 0  # epochs between Tune checkpoints (0: none)
    checkpoint_seconds: float = 0.0  # and at least this much of the trial's time since its last one
    rungs: tuple[float, ...] = ()  # the scheduler's milestones, in progress units: reported at exactly these
    repeats: tuple[Any, ...] = ()  # a study's data.Prepared per search repeat (splits drawn with its own seed)
    run_tags: dict[str, str] = field(default_factory=dict)  # MLflow's standard source/user/git tags, every run
    dataset: tuple[str, str] = ("", "")  # (name, source) of data.dataset, as MLflow dataset inputs show it
    digests: tuple[dict, ...] = ()  # per search repeat: split -> (images, digest), computed once on the driver
    log_checkpoints: bool = False  # tracking.checkpoints: all (every trial's best.pt in MLflow)
    keep_search_weights: bool = True  # search trials keep their best weights (a study publishes finals only)
    blobs: dict[str, bytes] = field(default_factory=dict)  # arm -> checkpoint bytes, for nodes without the file
    leader: Any = None  # a plain sweep's Leader actor (below): only a trial that beats it writes its weights
    cohorts: Any = None  # resources.cohort > 1: the sweep's cohort.Registry actor (trials train in cohorts)
    worker_growth: float | None = 0.25  # resources.worker_growth: a reused worker's memory bound (limits.WorkerMemory)

    def weights_of(self, arm: str) -> tuple[str, str | None]:
        """``(model.weights, checkpoint file or None)`` of an arm. A plain sweep from scratch logged before
        2026-12-07 called its arm ``none`` (now ``scratch``): its trials, resumed, still find their weights."""
        if arm not in self.arms and arm == "none" and "scratch" in self.arms:
            return self.arms["scratch"]
        return self.arms[arm]

    def data_for(self, search: int):
        """The splits a trial of search repeat ``search`` trains, validates and tests on."""
        return self.repeats[search] if search < len(self.repeats) else self.data


class Leader:
    """A plain sweep's best validation accuracy among its finished trials (a Ray actor, see ``TrialContext``).
    It lives here, in a module that imports nothing heavy, so its actor process starts without torch (~3 s of
    imports that would compete with the first trials' workers for the CPUs).

    The sweep publishes its best trial only, so a trial that ends below the leader skips writing its weights
    to Tune's storage (45 MB for a ResNet18, ~0.15 s of a short trial). Ties keep the first to finish.
    """

    def __init__(self):
        self.best = -1.0

    def offer(self, score: float) -> bool:
        if score > self.best:
            self.best = score
            return True
        return False
