"""The spec's schema: every key a YAML spec may hold, its type, default and checks (pydantic, ``extra="forbid"``).

``search.space`` is generated from :data:`tl_sweep.contract.DIMENSIONS`. :mod:`tl_sweep.spec` reads a spec file
against this schema and resolves it into a :class:`~tl_sweep.spec.Config`.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from tl_sweep import catalog
from tl_sweep.contract import DIMENSIONS
from tl_sweep.errors import UserError

Scalar = Union[bool, int, float, str]
BUILTIN = ("builtin:digits", "builtin:digits-shuffled", "builtin:mnist-5k", "builtin:mnist-5k-shuffled")


def known_arch(v: str) -> str:
    """A torchvision model name the catalog knows (a ValueError with the closest names otherwise)."""
    try:
        catalog.entry(v)
    except UserError as e:
        raise ValueError(str(e)) from None
    return v


def slug(v: str, what: str, why: str, example: str) -> str:
    """A name that is lowercase letters, digits and dashes (it goes into file names and MLflow keys)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", v):
        raise ValueError(f"{v!r}: {what} is lowercase letters, digits and dashes ({why}), e.g. {example}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Range(_Strict):
    """``{low, high, log}``: an int range when both ends are ints (or ``max``), else a float range."""

    low: Union[int, float]
    high: Union[int, float, Literal["max"]]
    log: bool = False

    @model_validator(mode="after")
    def _order(self):
        if self.high != "max" and self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and (self.high == "max" or isinstance(self.high, int))


Dim = Union[Range, list[Scalar], Scalar]  # a range, a categorical list, or a constant


def values_of(dim: Dim) -> list:
    """The values a dimension can take at its ends (a range's ``low``/``high``, a list, a constant)."""
    if isinstance(dim, Range):
        return [dim.low, dim.high]
    return list(dim) if isinstance(dim, list) else [dim]


class _SpaceChecks(_Strict):
    """What every search space checks, for each row of :data:`tl_sweep.contract.DIMENSIONS`."""

    @model_validator(mode="before")
    @classmethod
    def _no_empty(cls, data):
        if not isinstance(data, dict):
            return data  # pydantic names the type error
        for key, value in data.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"{key}: the list of choices is empty; give at least one value")
        return data

    @model_validator(mode="after")
    def _values(self):
        for d in DIMENSIONS:
            dim = getattr(self, d.name)
            if isinstance(dim, Range) and dim.high == "max" and not d.up_to_max:
                raise ValueError(f"{d.name}.high: max only applies to unfrozen_blocks; give a number")
            for v in values_of(dim):
                if v == "max" and d.up_to_max:
                    continue
                if d.choices:
                    if v not in d.choices:
                        close = difflib.get_close_matches(str(v), d.choices, n=1)
                        raise ValueError(f"{d.name}: unknown {d.name} {v!r}; "
                                         + (f"did you mean {close[0]}?" if close else d.rule))
                    continue
                kinds = (int,) if d.type is int else (int, float)
                if isinstance(v, bool) or not isinstance(v, kinds) or not d.check(v):
                    raise ValueError(f"{d.name}: {v!r} is not allowed; {d.rule}")
        return self


def _default(d) -> Any:
    return Range(**d.default) if isinstance(d.default, dict) else d.default


# The search space: one key per row of contract.DIMENSIONS, each a constant, a list of choices or a
# {low, high, log} range.
Space = create_model("Space", __base__=_SpaceChecks, __doc__="The search space: each dimension a constant, a list "
                     "of choices or a {low, high, log} range (tl_sweep.contract.DIMENSIONS).",
                     **{d.name: (Dim, _default(d)) for d in DIMENSIONS})


def min_epochs(space) -> int:
    """The shortest schedule of a search space: ``progress`` is in its epochs."""
    return int(min(values_of(space.epochs)))


class ModelCfg(_Strict):
    arch: str = "resnet18"
    weights: str = "none"  # torchvision enum name | checkpoint path | source:<name> | none
    head: Literal["linear", "mlp", "binary"] = "linear"
    head_hidden: int = Field(1024, ge=1)
    head_dropout: float = Field(0.5, ge=0, lt=1)

    _arch = field_validator("arch")(classmethod(lambda cls, v: known_arch(v)))


class Augment(_Strict):
    """Train-time augmentation (on uint8 tensors): RandomResizedCrop(scale, ratio) + optional flip.

    ``augment: none`` turns it off: training sees the evaluation transform (centre crop), as in the Keras and
    feature-extractor recipes; with a frozen prefix, training then runs on its cached features.
    """

    enabled: bool = True
    scale: tuple[float, float] | None = None  # default (0.08, 1); builtin:digits (0.7, 1)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool | None = None  # default true; builtin:digits false (a mirrored digit is another shape)


class DataCfg(_Strict):
    dataset: str = "builtin:digits"
    classes: list[Union[int, str]] | None = None
    train_per_class: int | None = Field(None, ge=1)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test when the source has no split
    image_size: int | None = Field(None, ge=8)  # crop size; default from the weights' metadata
    strict: bool = False  # refuse unreadable image files instead of skipping them
    holdout: float = Field(0.0, ge=0, lt=1)  # share of val moved to a test split when the data has no test/
    root: str | None = None  # folder of a torchvision:<Name> dataset (relative to the spec file)
    augment: Augment = Augment()
    feature_cache: bool = True  # compute a frozen prefix's features once and train the rest on them
    # datasets whose images are left out of every split (pixel for pixel): e.g. [builtin:mnist-5k] keeps a few-shot
    # MNIST target disjoint from the images the mnist-5k source was pretrained on
    exclude: list[str] = []

    @field_validator("augment", mode="before")
    @classmethod
    def _no_augment(cls, v):
        if v in ("none", False):
            return {"enabled": False}
        if isinstance(v, str):
            raise ValueError(f"{v!r} is not an augmentation; use none, or a mapping with scale, ratio, hflip")
        return v

    @field_validator("dataset")
    @classmethod
    def _kind(cls, v: str) -> str:
        kinds = ("builtin:", "imagefolder:", "torchvision:")
        if not v.startswith(kinds):
            raise ValueError(f"{v!r} is not a dataset; use builtin:digits, imagefolder:<path> or torchvision:<Name>")
        if v.startswith("builtin:") and v not in BUILTIN:
            raise ValueError(f"unknown built-in dataset {v!r}; built in: {', '.join(BUILTIN)}")
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        return [cls._kind(d) for d in v]

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        if any(f < 0 for f in v) or abs(sum(v) - 1) > 1e-6 or v[0] == 0 or v[1] == 0:
            raise ValueError(f"{list(v)} must be three fractions (train, val, test) that add up to 1, "
                             f"train and val > 0")
        return v


class Search(_Strict):
    num_trials: int = Field(12, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: Literal["val_acc"] = "val_acc"  # maximised
    space: Space = Space()


class Scheduler(_Strict):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # in epochs of the shortest schedule (see docs/search.md)
    reduction_factor: int = Field(3, ge=2)


class Regime(_Strict):
    """How the trainable depth moves during a trial (``unfrozen_blocks`` is where it ends).

    * ``fixed``: the head plus ``unfrozen_blocks`` blocks train from the first epoch (linear probe at 0,
      full fine-tuning at max);
    * ``progressive``: start with ``start`` blocks and unfreeze one more every ``every`` epochs until
      ``unfrozen_blocks`` (the TF MobileNetV2 recipe's "unfreeze the top part"), newly trainable blocks at
      ``ft_lr_mult`` × the LR;
    * ``lp_ft``: ``probe_epochs`` epochs of linear probing (head only), then fine-tuning of
      ``unfrozen_blocks`` blocks for the remaining epochs at ``ft_lr_mult`` × the LR (Kumar et al. 2022).
    """

    kind: Literal["fixed", "progressive", "lp_ft"] = "fixed"
    start: int = Field(0, ge=0)
    every: int = Field(1, ge=1)
    probe_epochs: int = Field(1, ge=1)
    ft_lr_mult: float = Field(1.0, gt=0)


def space_depths(space, n: int) -> list[int]:
    """Every ``unfrozen_blocks`` value a (resolved) search space can draw, ``max`` as ``n``."""
    ub = space.unfrozen_blocks
    if isinstance(ub, Range):
        return list(range(int(ub.low), int(n if ub.high == "max" else ub.high) + 1))
    return sorted({n if v == "max" else int(v) for v in values_of(ub)})


class Source(_Strict):
    """A study source with a name of its own: ``{name: imagenet, weights: ckpt/resnet18.pt}``, and optionally its own
    architecture (``arch: resnet50``; default ``model.arch``). Sources of another architecture are compared with a
    scratch baseline of their own architecture: every NTG compares like with like."""

    name: str = Field(min_length=1)
    weights: str = Field(min_length=1)
    arch: str | None = None

    _arch = field_validator("arch")(classmethod(lambda cls, v: v if v is None else known_arch(v)))


class Target(DataCfg):
    """One target of a transfer matrix (``study.targets``): a name and the keys of ``data`` that differ for it
    (dataset, classes, train_per_class, split, image_size, root, ...); every other key as ``data`` has it."""

    name: str

    _name = field_validator("name")(classmethod(lambda cls, v: slug(
        v, "a target's name", "it names its runs, metrics and report folder", "fashion-few")))


class Pretrain(_Strict):
    """A source model the spec defines and tl-sweep pretrains itself, from scratch, on data named as ``data`` names
    it (``sources: [{name: fashion, dataset: torchvision:FashionMNIST, root: ../data}]``; then ``model.weights`` or
    ``study.sources`` say ``source:fashion``). Cached by a hash of this block, the architecture and the input size,
    like the built-in sources: a rerun reuses it, a change pretrains it again."""

    name: str  # source:<name>: lowercase letters, digits and dashes
    dataset: str = Field(min_length=1)
    root: str | None = None  # a torchvision:<Name> dataset's folder (relative to the spec file)
    classes: list[Union[int, str]] | None = None  # default: every class of the dataset
    train_per_class: int | None = Field(None, ge=1)
    description: str | None = None
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr_mult: float = Field(2.0, gt=0)

    _name = field_validator("name")(classmethod(lambda cls, v: slug(
        v, "a source's name", "it is used as source:<name> and in file names", "fashion-mnist")))


class Study(_Strict):
    """A transfer study: a grid of cells, one per (source, depth), plus the tuned from-scratch cell.

    Every cell gets its own search with the same budget, ``trials_per_cell`` (TPE over the searched dimensions
    other than depth, seeded per cell and per search repeat; ASHA inside the cell, never across depths, and never
    leaving a cell fewer than ``min_candidates`` configurations that ran their whole schedule). The whole study
    is searched ``search_repeats`` times with independent seeds, so each verdict comes with its stability. A
    cell's ``candidates`` best configurations (full schedules first) are re-trained with ``selection_seeds`` new
    seeds each, and the one with the best mean validation accuracy is the cell's choice (a lucky single run cannot be it); each arm's
    depth is chosen on those same re-trainings. The chosen configuration of each cell is then re-trained with
    ``repeats`` seeds, the same seeds in every arm (pairing), and scored once on the test split: those finals
    choose nothing. ``search.num_trials`` does not apply to a study.
    """

    baseline: Literal["scratch"] | None = "scratch"
    # default: [model.weights]; each a weights value, or {name, weights} (a checkpoint file's arm is otherwise
    # named by the file's name)
    sources: list[Union[str, Source]] | None = None
    depths: list[Union[int, Literal["max"]]] | None = None  # default: every unfrozen_blocks value of the space
    trials_per_cell: int = Field(8, ge=1)
    search_repeats: int = Field(3, ge=1)
    repeats: int = Field(5, ge=2)  # final seeds per chosen configuration (paired across arms)
    min_candidates: int = Field(3, ge=1)  # full-schedule configurations ASHA leaves each cell at least
    candidates: int = Field(2, ge=1)  # the best this many of a cell's configurations are re-trained before a choice
    selection_seeds: int = Field(2, ge=1)  # new seeds per candidate before a cell's configuration is chosen
    estimates: bool = True  # transferability estimates per cell before training, checked against the finals
    # per arm (a source's name, or scratch): the search.space keys that differ for it, e.g. a baseline that may train
    # longer: {scratch: {epochs: {low: 2, high: 12}}}; every other dimension as search.space has it
    spaces: dict[str, dict[str, Any]] = {}
    allocate: Literal["grid", "halving"] = "grid"  # grid: equal budgets; halving: successive halving of cells
    eta: int = Field(2, ge=2)  # halving: the share of cells each rung keeps is 1/eta
    first_rung: int | None = Field(None, ge=1)  # halving: trials per cell before the first cut (default: budget/eta)
    # a transfer matrix: every source on each of these targets (each a study of its own under one parent run)
    targets: list[Target] | None = None

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if v is not None:
            if not v:
                raise ValueError("[] names no target; list at least one, or leave study.targets out")
            names = [t.name for t in v]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"two targets are called {twice[0]!r}; give each its own name")
        return v


class Failures(_Strict):
    """Fault tolerance: trials checkpoint every ``checkpoint_every`` epochs (0: never), so ``--resume`` and
    a retried trial continue where they were; a trial whose worker dies is retried ``max_failures`` times.

    ``checkpoint_seconds``: an epoch's checkpoint is written only once the trial has run this long since its
    last one (or its start). A checkpoint is the model, its optimizer and the data order (resnet18 with Adam:
    128 MB, ~0.2 s to write on the dev machine, and on a GPU a copy to the host): for trials of a few seconds
    an epoch's checkpoint cost up to a fifth of the sweep, more than redoing the trial would. 0: every due epoch."""

    max_failures: int = Field(1, ge=0)
    checkpoint_every: int = Field(1, ge=0)
    checkpoint_seconds: float = Field(30.0, ge=0)


class Resources(_Strict):
    """Per trial. ``gpu`` may be a fraction (several small trials share a GPU; each may then use that share of
    the GPU's memory, so one that outgrows it fails out of memory instead of its neighbours). ``auto`` (the
    default): no GPU where Ray sees none; where it sees some, as many trials per GPU as its memory and the
    node's CPUs hold (the memory of one training step measured on the driver's GPU), and ``search.max_concurrent``
    enough to fill them unless the spec sets it (``runner.plan_gpus``; the plan line says what was chosen).

    ``memory_gb``: the most memory a trial's worker process may hold. Ray reserves it when placing trials,
    and a CPU trial that goes past it ends FAILED as out of memory (``train.MemoryLimit``) instead of the
    node's OOM killer taking a worker with other trials on it. A worker with torch loaded holds ~0.5 GB.

    ``precision``: ``auto`` trains under bf16 autocast on a GPU and in fp32 on a CPU; ``bf16`` uses autocast on
    a CPU too (1.6× faster steps on a CPU with AVX512-BF16 at 64 px; with torch 2.14.1 on a CPU, do not use it
    below 32 px: see BENCHMARKS.md), ``fp32`` forces fp32 everywhere.

    ``cohort``: trials that share a frozen prefix (same weights, depth, data, batch size and seed: a cell's
    search trials) train up to this many together in one worker, the prefix's forward once per batch
    (``tl_sweep.cohort``); each stays its own trial and trains bit for bit as alone. It saves compute with
    augmentation on and a large frozen prefix, but each member is still a Tune trial process: on a 2-core
    machine a short search was slower with it (BENCHMARKS.md).
    """

    cpu: float = Field(1, gt=0)
    gpu: Union[float, Literal["auto"]] = "auto"
    memory_gb: float | None = Field(None, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on a CPU
    # trials sharing (weights, depth, data, batch size, seed) train together, up to this many per worker, the
    # frozen prefix's forward computed once per batch (tl_sweep.cohort); 1: every trial alone
    cohort: int = Field(1, ge=1, le=64)
    # a trial's worker process is reused for the next trial; one whose memory after a trial exceeds the most
    # of its first 3 trials' by more than this share (+64 MiB) is replaced (limits.WorkerMemory); null: never
    worker_growth: float | None = Field(0.25, ge=0)

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v):
        if v != "auto" and v < 0:
            raise ValueError(f"{v} is not a share of a GPU; give a number >= 0 (0.25: 4 trials per GPU) or auto")
        return v


class Tracking(_Strict):
    uri: str = "sqlite:///mlflow.db"  # default: $MLFLOW_TRACKING_URI, else this
    experiment: str | None = None  # default: $MLFLOW_EXPERIMENT_NAME, else the spec's name
    register_as: str | None = None  # register the winner in the model registry under this name (alias champion)
    register_below_chance: bool = False  # register it even when it is not above the majority-class rate
    log_models: bool = True  # log the winner (per arm, in a study) as an MLflow Model
    # winners: best.pt (and the MLflow Model) of the published winners only; all: every trial's best.pt too
    # (a ResNet18 checkpoint is 45 MB: the default study's 357 trainings would store 16 GB)
    checkpoints: Literal["winners", "all"] = "winners"
    system_metrics: bool = True  # CPU, memory, GPU of every node on the parent run (MLflow system metrics)


class Spec(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    search: Search = Search()
    scheduler: Scheduler = Scheduler()
    regime: Regime = Regime()
    study: Study | None = None
    sources: list[Pretrain] = []  # source models pretrained here on data the spec names (source:<name>)
    failures: Failures = Failures()
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    storage: str = "ray_results"  # Ray Tune's storage path; a path or a URI such as s3://...

    def space_for(self, arm: str | None = None) -> Space:
        """The search space of ``arm``: ``search.space`` with the arm's ``study.spaces`` keys over it."""
        over = (self.study.spaces.get(arm) if self.study is not None and arm is not None else None) or {}
        if not over:
            return self.search.space
        return Space.model_validate({**self.search.space.model_dump(), **over})

    def spaces(self) -> list[Space]:
        """Every search space the spec's trials draw from (``search.space`` and each arm's own)."""
        return [self.search.space] + [self.space_for(a) for a in (self.study.spaces if self.study else {})]

    @property
    def min_epochs(self) -> int:
        """The shortest schedule of any arm: ASHA's ``progress`` is in its epochs (docs/search.md)."""
        return min(min_epochs(sp) for sp in self.spaces())

    @property
    def trials_at_once(self) -> int:
        """Trials running at once: ``search.max_concurrent`` workers, each holding up to ``resources.cohort``."""
        return self.search.max_concurrent * self.resources.cohort

    @model_validator(mode="after")
    def _fits_model(self):
        n = catalog.num_blocks(self.model.arch)
        for v in values_of(self.search.space.unfrozen_blocks):
            if v != "max" and v > n:
                raise ValueError(f"search.space.unfrozen_blocks: {v} is above the {n} blocks of "
                                 f"{self.model.arch}; use at most {n} (or max)")
        for arm, over in (self.study.spaces.items() if self.study is not None else ()):
            try:
                self.space_for(arm)
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"study.spaces.{arm}{'.' + key if key else ''}: {msg}") from None
            if "unfrozen_blocks" in over:
                raise ValueError(f"study.spaces.{arm}.unfrozen_blocks: the depth is the study's grid "
                                 f"(study.depths), the same for every arm; leave it out of study.spaces")
        if self.regime.kind == "lp_ft" and self.regime.probe_epochs >= self.min_epochs:
            raise ValueError(f"regime.probe_epochs: {self.regime.probe_epochs} leaves no fine-tuning epoch for "
                             f"the shortest schedule; make it smaller than search.space.epochs")
        if self.study is not None and self.study.min_candidates > self.study.trials_per_cell:
            raise ValueError(f"study.min_candidates: {self.study.min_candidates} is more than the "
                             f"{self.study.trials_per_cell} trials a cell gets; at most study.trials_per_cell")
        if self.study is not None and self.study.depths is not None:
            bad = [d for d in self.study.depths if d != "max" and not 0 <= d <= n]
            if bad or not self.study.depths:
                raise ValueError(f"study.depths: {bad or '[]'} is not a list of depths of {self.model.arch} "
                                 f"(0..{n} or max); e.g. [0, 2, max]")
        if self.resources.cohort > 1 and self.resources.memory_gb:
            raise ValueError(f"resources.memory_gb limits one trial's worker, and cohorts of "
                             f"{self.resources.cohort} trials share one; set resources.cohort: 1 or drop memory_gb")
        if self.model.head == "binary" and self.data.classes is not None and len(self.data.classes) != 2:
            raise ValueError(f"model.head: binary needs exactly 2 classes, data.classes has "
                             f"{len(self.data.classes)}; use head: linear")
        return self
