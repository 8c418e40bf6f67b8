"""YAML spec → validated, fully resolved config.

:func:`load` reads a spec file (``yaml.safe_load``), applies ``--set key.path=value`` overrides, checks
every key against the schema below, and resolves what the spec leaves implicit: defaults, ``max`` in
``unfrozen_blocks``, relative paths (relative to the spec file), the input size from the weights'
metadata, absolute tracking/storage locations (trials run in other working directories).

Every problem is a :class:`~tl_sweep.errors.UserError` whose message is one line naming the file, the key
path, what is wrong and how to fix it.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from tl_sweep import catalog
from tl_sweep.contract import DIMENSIONS
from tl_sweep.errors import UserError

Scalar = Union[bool, int, float, str]
BUILTIN = ("builtin:digits", "builtin:digits-shuffled", "builtin:mnist-5k", "builtin:mnist-5k-shuffled")


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

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        try:
            catalog.entry(v)
        except UserError as e:
            raise ValueError(str(e)) from None
        return v


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
    """A study source with a name of its own: ``{name: imagenet, weights: ckpt/resnet18.pt}``."""

    name: str = Field(min_length=1)
    weights: str = Field(min_length=1)


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
    allocate: Literal["grid", "halving"] = "grid"  # grid: equal budgets; halving: successive halving of cells
    eta: int = Field(2, ge=2)  # halving: the share of cells each rung keeps is 1/eta
    first_rung: int | None = Field(None, ge=1)  # halving: trials per cell before the first cut (default: budget/eta)


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
    failures: Failures = Failures()
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    storage: str = "ray_results"  # Ray Tune's storage path; a path or a URI such as s3://...

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
        if self.regime.kind == "lp_ft" and self.regime.probe_epochs >= min(values_of(self.search.space.epochs)):
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


# ------------------------------------------------------------------------------------------ loading


def _parse_yaml(text: str, where: str) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise UserError(f"{where}: YAML syntax error at {pos}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {e}") from None
    if raw is None:
        raise UserError(f"{where}: the spec is empty; start from search_spaces/freeze_depth.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a spec is a mapping of keys (name, model, data, search...), "
                        f"not a {type(raw).__name__}")
    return raw


def _submodel(annotation) -> type[BaseModel] | None:
    """The BaseModel class a field holds, if any (``Optional[X]``/``X | None`` included)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _check_keys(raw: Any, schema: type[BaseModel], path: str, where: str) -> None:
    """Unknown keys, with the key path and the closest valid name (pydantic alone names neither well)."""
    if not isinstance(raw, dict):
        return
    fields = schema.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(fields)}"
            raise UserError(f"{where}: {path}{key}: unknown key; {hint}")
        sub = _submodel(fields[key].annotation)
        if sub is not None:
            _check_keys(value, sub, f"{path}{key}.", where)


def _set(raw: dict, dotted: str, value: str, where: str) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k} is not a section of {where}; check the key path")
    try:
        node[keys[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        if value.lstrip().startswith(("{", "[", "'", '"')):  # meant as YAML: a list, a mapping, a quoted string
            problem = getattr(e, "problem", None) or "not valid YAML"
            raise UserError(f"--set {dotted}={value}: the value is not valid YAML ({problem}); e.g. --set "
                            f"search.space.epochs='{{low: 1, high: 3}}' or --set search.space.optimizer=[sgd, adam]"
                            ) from None
        node[keys[-1]] = value  # a plain string YAML cannot read as one (a colon in it, say): taken as it is


def _first_error(err: ValidationError, where: str, overrides: list[str] = ()) -> UserError:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    # Union members show up as loc entries (e.g. 'Range', 'list[...]'); keep only real keys and indices.
    loc = [p for p in loc if not any(ch in p for ch in "[]()") and p not in ("Range", "int", "float", "str", "bool")]
    msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if e["type"] == "missing":
        msg = "required key is missing; add it"
    elif e["type"] == "literal_error":
        msg = f"{e['input']!r} is not allowed; {e['msg'].lower()}"
    path = ".".join(loc)
    if msg.startswith(tuple(f"{f}:" for f in Space.model_fields)) and path.endswith("space"):
        path += "." + msg.split(":", 1)[0]
        msg = msg.split(":", 1)[1].strip()
    elif msg.startswith(("search.", "model.", "data.", "study.")):
        path, msg = msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
    return UserError(f"{_blamed(path, where, overrides)}: {path + ': ' if path else ''}{msg}")


def _blamed(path: str, where: str, overrides: list[str]) -> str:
    """Who set the key at ``path``: the last ``--set`` that wrote it (or a section around it), else the file."""
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if path and (path == key or path.startswith(key + ".") or key.startswith(path + ".")):
            return f"--set {item}"
    return where


def load(path: str | Path, overrides: list[str] = ()) -> "Config":
    """Read, override, validate and resolve a spec file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{where}: no such spec file; search_spaces/ holds examples") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read the spec ({e.strerror})") from None
    raw = _parse_yaml(text, where)
    _check_keys(raw, Spec, "", where)  # the file's own keys: a wrong one is the file's
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: write --set key.path=value, e.g. --set search.num_trials=4")
        _set(raw, key.strip(), value, where)
        _check_keys(raw, Spec, "", f"--set {item}")  # a key this override added
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err, where, list(overrides)) from None
    try:
        return resolve(spec, path.resolve().parent, text).model_copy(update={"spec_file": str(path.resolve())})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------- resolving


class Config(BaseModel):
    """The fully resolved config: what ``tl-sweep validate`` prints and what every trial receives."""

    model_config = ConfigDict(extra="forbid")

    spec: Spec
    spec_text: str
    spec_dir: str
    spec_file: str = ""
    experiment: str
    arms: dict[str, str]  # arm name -> weights (enum name | absolute checkpoint path | source:<name> | none)
    input: dict[str, Any]  # crop, resize, mean, std
    max_blocks: int
    cells: list[tuple[str, int]] = []  # a study's grid: (arm, unfrozen blocks); scratch trains every block

    def trainings(self) -> tuple[int, int, int]:
        """(search trials, selection re-trainings, final re-trainings) this config will run (at most, where a
        cell ends with fewer than ``candidates`` configurations with a result)."""
        s = self.spec
        if s.study is None:
            return s.search.num_trials, 0, 0
        st = s.study
        n = len(self.cells) * st.search_repeats
        return n * st.trials_per_cell, n * min(st.candidates, st.trials_per_cell) * st.selection_seeds, \
            n * st.repeats

    def dump(self) -> dict[str, Any]:
        """The resolved config as plain data (YAML/JSON/MLflow params)."""
        d = self.spec.model_dump(mode="json")
        search, selection, finals = self.trainings()
        d["resolved"] = {"experiment": self.experiment, "arms": self.arms,
                         "input": {k: list(v) if isinstance(v, tuple) else v for k, v in self.input.items()},
                         "max_blocks": self.max_blocks, "cells": [f"{a}@k={k}" for a, k in self.cells],
                         "trainings": {"search": search, "selection": selection, "final": finals,
                                       "total": search + selection + finals}}
        return d


def _expand(p: str) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` from the environment (so one spec finds its data on any
    machine: ``imagefolder:${TL_SWEEP_DATA:-../data}/ants``); ``~`` as the home folder."""
    import re

    def value(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        return os.environ.get(name) or (default if default is not None else m.group(0))

    return os.path.expanduser(re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, p))


def _abs(p: str, base: Path) -> str:
    q = Path(_expand(p))
    return str(q if q.is_absolute() else (base / q).resolve())


def data_problem(cfg: "Config") -> str | None:
    """What is missing on this machine for the spec's data (a folder that is not there), in one line; ``None``
    when every path it names exists. (``tl-sweep submit`` does not ask: the data is the cluster's.)"""
    d = cfg.spec.data
    folder = d.dataset.removeprefix("imagefolder:") if d.dataset.startswith("imagefolder:") else d.root
    if folder is None or Path(folder).is_dir():
        return None
    key = "data.dataset" if d.dataset.startswith("imagefolder:") else "data.root"
    import re

    names = sorted(set(re.findall(r"\$\{?(\w+)", cfg.spec_text)))
    hint = f" (or set {', '.join(names)} to where your datasets are)" if names else ""
    return (f"{key}: {folder} is not a folder on this machine; put the data there or point {key} at it{hint}; "
            f"relative paths are relative to the spec file")


def _weights(w: str, arch: str, spec_dir: Path) -> str:
    """A weights value checked and resolved: enum names and ``source:``/``none`` as is, paths absolute."""
    if w == "none" or catalog.is_weights(arch, w):
        return w
    if w.startswith("source:"):  # which sources exist is checked by runner.preflight (and validate)
        if not w.removeprefix("source:"):
            raise UserError("model.weights: source: needs a name, e.g. source:mnist-5k")
        return w
    candidate = Path(_abs(w, spec_dir))
    if candidate.suffix in (".pt", ".pth", ".ckpt", ".bin") or candidate.exists():
        return str(candidate)
    raise UserError(f"model.weights: {w!r} is neither a weights name of {arch} "
                    f"({', '.join(catalog.weight_names(arch))}) nor an existing checkpoint file; "
                    f"use one of those, source:<name> or none")


def resolve(spec: Spec, spec_dir: Path, text: str = "") -> Config:
    spec = spec.model_copy(deep=True)
    m, d = spec.model, spec.data
    given = [m.weights] if spec.study is None else list(spec.study.sources or [m.weights])
    if spec.study is not None and "none" in given:
        raise UserError("study.sources: none is the scratch baseline (study.baseline), not a source; list the "
                        "pretrained weights to compare, e.g. sources: [source:mnist-5k, IMAGENET1K_V1]")
    arms = {}
    for g in given:
        w = _weights(g.weights if isinstance(g, Source) else g, m.arch, spec_dir)
        # an arm is named by the spec's name for it, else a checkpoint file's name, else its weights value; the
        # whole path stays in its trials' params (weights)
        name = g.name if isinstance(g, Source) else (Path(w).name if Path(w).is_absolute() else w)
        if name in arms or name == "scratch":
            raise UserError(f"study.sources: two arms would be called {name!r}; give each a name, e.g. "
                            f"- {{name: mine, weights: {g.weights if isinstance(g, Source) else g}}}")
        arms[name] = w
    if spec.study is not None and spec.study.baseline == "scratch":
        arms["scratch"] = "none"
    inp = catalog.input_spec(m.arch, m.weights)
    if d.image_size is None:
        d.image_size = inp["crop"]
    elif d.image_size != inp["crop"]:
        if catalog.size_kwarg(m.arch) and catalog.is_weights(m.arch, m.weights):
            raise UserError(f"data.image_size: {m.arch} with {m.weights} takes exactly {inp['crop']} px (its "
                            f"pretrained position embedding / window grid is fixed); set image_size: {inp['crop']}")
        inp = dict(inp, crop=d.image_size, resize=round(d.image_size / 0.875))
    digits = d.dataset.startswith(("builtin:digits", "builtin:mnist"))  # small grey digits: mild crops, no flips
    if d.augment.scale is None:
        d.augment.scale = (0.7, 1.0) if digits else (0.08, 1.0)
    if d.augment.hflip is None:
        d.augment.hflip = not digits
    if d.dataset.startswith("imagefolder:"):
        d.dataset = "imagefolder:" + _abs(d.dataset.removeprefix("imagefolder:"), spec_dir)
    if d.dataset.startswith("torchvision:"):
        if d.root is None:
            raise UserError(f"data.root: torchvision:{d.dataset.split(':', 1)[1]} needs data.root, the folder "
                            f"that holds its files")
        d.root = _abs(d.root, spec_dir)
    n = catalog.num_blocks(m.arch)
    space = spec.search.space
    ub = space.unfrozen_blocks
    if isinstance(ub, Range) and ub.high == "max":
        space.unfrozen_blocks = Range(low=ub.low, high=n, log=ub.log)
    elif ub == "max":
        space.unfrozen_blocks = n
    # the environment MLflow users already have, where the spec does not say
    if "uri" not in spec.tracking.model_fields_set and os.environ.get("MLFLOW_TRACKING_URI"):
        spec.tracking.uri = os.environ["MLFLOW_TRACKING_URI"]
    if spec.tracking.experiment is None and os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        spec.tracking.experiment = os.environ["MLFLOW_EXPERIMENT_NAME"]
    uri = spec.tracking.uri
    if "://" not in uri:
        raise UserError(f"tracking.uri: {uri!r} is not a tracking URI; use sqlite:///mlflow.db or "
                        f"http://host:port (MLflow 3 refuses a plain ./mlruns folder)")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # as MLflow reads it: the working dir
        spec.tracking.uri = "sqlite:///" + _abs(uri.removeprefix("sqlite:///"), Path.cwd())
    if "://" not in spec.storage:  # written in the spec: relative to it; the default: the working directory
        spec.storage = _abs(spec.storage, spec_dir if "storage" in spec.model_fields_set else Path.cwd())
    cells = []
    if spec.study is not None:
        depths = sorted({n if d == "max" else int(d) for d in spec.study.depths}) if spec.study.depths \
            else space_depths(space, n)
        spec.study.depths = depths
        cells = [(arm, n if w == "none" else d) for arm, w in arms.items() for d in ([n] if w == "none" else depths)]
    return Config(spec=spec, spec_text=text, spec_dir=str(spec_dir), experiment=spec.tracking.experiment or spec.name,
                  arms=arms, input=inp, max_blocks=n, cells=cells)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg.dump()), sort_keys=False, default_flow_style=None)
