"""YAML spec → validated, fully resolved config.

:func:`load` reads a spec file (``yaml.safe_load``), applies ``--set key.path=value`` overrides, checks
every key against the schema (:mod:`tl_sweep.spec.schema`), and resolves what the spec leaves implicit: defaults,
``max`` in ``unfrozen_blocks``, relative paths (relative to the spec file), the input size from the weights'
metadata, absolute tracking/storage locations (trials run in other working directories).

Every problem is a :class:`~tl_sweep.errors.UserError` whose message is one line naming the file, the key
path, what is wrong and how to fix it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tl_sweep import catalog, redact, tracking
from tl_sweep.errors import UserError
# the schema: every key a spec may hold (the names are this module's too)
from tl_sweep.spec.schema import (BUILTIN, Augment, DataCfg, Dim, Failures, ModelCfg, Range, Regime,  # noqa: F401
                                  Resources, Scalar, Scheduler, Search, Source, Space, Spec, Study, Target,
                                  Tracking, min_epochs, space_depths, values_of)


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
    """The BaseModel class a field holds, if any (``Optional[X]``/``X | None`` and ``list[X]`` included)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if (sub := _submodel(arg)) is not None:
                return sub
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
        if sub is not None and isinstance(value, list):  # a list of sections (study.targets, sources)
            for i, item in enumerate(value):
                _check_keys(item, sub, f"{path}{key}[{i}].", where)
        elif sub is not None:
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
    errors = err.errors()
    # a value that may be a string or a section (study.sources): the section's own error says what is wrong
    e = next((x for x in errors if any(str(p)[:1].isupper() and str(p).isidentifier() for p in x["loc"])),
             errors[0]) if errors[0]["type"] == "string_type" else errors[0]
    loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    # Union members show up as loc entries (e.g. 'Range', 'list[...]'); keep only real keys and indices.
    loc = [p for p in loc if not any(ch in p for ch in "[]()") and p not in ("int", "float", "str", "bool")
           and not (p[:1].isupper() and p.isidentifier())]  # a union's member (Range, Source), not a key
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
        cfg = resolve(spec, path.resolve().parent, text)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg.model_copy(update={"spec_file": str(path.resolve()), "notes": _read_as(overrides)})


def _read_as(overrides: list[str]) -> list[str]:
    """How an override of a search dimension was read where a user may have meant something else: a list of two
    numbers is the choice of those two, not the range between them."""
    notes = []
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            v = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        if (".space." in key or key.startswith("study.spaces.")) and isinstance(v, list) and len(v) == 2 and \
                all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            notes.append(f"--set {item}: read as the choice of {v[0]} or {v[1]} (a list is categorical); a range "
                         f"is --set '{key.strip()}={{low: {v[0]}, high: {v[1]}}}'")
    return notes


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
    store: str = "sqlite"  # what kind of tracking store spec.tracking.uri is (tracking.Store.kind)
    notes: list[str] = []  # how an override was read where it may mean something else (the CLI says them)
    # a transfer matrix: one single-target study per (target, architecture), each a Config of its own
    parts: list["Config"] = []
    target: str = ""  # a part's target name ("" for a study that is not part of a matrix)
    part: str = ""  # a part's name: the target's, with the architecture where sources differ in it

    @property
    def matrix(self) -> bool:
        return bool(self.parts)

    def trainings(self) -> tuple[int, int, int]:
        """(search trials, selection re-trainings, final re-trainings) this config will run (at most, where a
        cell ends with fewer than ``candidates`` configurations with a result)."""
        s = self.spec
        if self.parts:
            per = [p.trainings() for p in self.parts]
            return sum(x[0] for x in per), sum(x[1] for x in per), sum(x[2] for x in per)
        if s.study is None:
            return s.search.num_trials, 0, 0
        st = s.study
        n = len(self.cells) * st.search_repeats
        return n * st.trials_per_cell, n * min(st.candidates, st.trials_per_cell) * st.selection_seeds, \
            n * st.repeats

    @property
    def tracking_store(self) -> tracking.Store:
        """The tracking store (``tracking.resolve_uri`` decided its URI and kind once, in :func:`resolve`)."""
        return tracking.Store(self.spec.tracking.uri, self.store)

    def digest(self) -> str:
        """A hash of the resolved config: a sweep's lineage (its parent run and a registered model carry it)."""
        return hashlib.sha256(json.dumps(self.dump(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def params(self) -> dict[str, str]:
        """The resolved config as the sweep's MLflow params: flat dotted keys, lists as JSON, each value a string
        of at most 6,000 characters (MLflow's limit) with no secret in it."""
        return {k: redact.text(str(v))[:6000] for k, v in _flatten(self.dump()).items()}

    def differences(self, logged: dict[str, str]) -> list[str]:
        """How this config differs from the one a sweep logged (its parent run's params), as ``key: then -> now``.

        A key both have must agree. A key the sweep's tl-sweep did not have yet (a later release added it) was
        at its default then: it must be at its default now. ``resolved.*`` keys derive from the others; with
        ``resources.gpu: auto``, what the GPU plan chose (``resources.gpu``, ``search.max_concurrent``) was
        logged in their place by releases before 2026-12-07, and is the plan's, not the spec's."""
        now = self.params()
        planned = set()
        if self.spec.resources.gpu == "auto":
            planned.add("resources.gpu")
            if "max_concurrent" not in self.spec.search.model_fields_set:
                planned.add("search.max_concurrent")
        defaults = {k: redact.text(str(v))[:6000] for k, v in _flatten(
            Spec(name="_", study=Study()).model_dump(mode="json")).items()}
        out = []
        for key, value in now.items():
            if key.startswith("resolved.") or key in planned:
                continue
            then = logged.get(key, defaults.get(key, value))
            if then != value:
                out.append(f"{key}: {then} -> {value}")
        return out

    def dump(self) -> dict[str, Any]:
        """The resolved config as plain data (YAML/JSON/MLflow params)."""
        d = self.spec.model_dump(mode="json")
        search, selection, finals = self.trainings()
        d["resolved"] = {"experiment": self.experiment, "arms": self.arms,
                         "input": {k: list(v) if isinstance(v, tuple) else v for k, v in self.input.items()},
                         "max_blocks": self.max_blocks, "cells": [f"{a}@k={k}" for a, k in self.cells],
                         "trainings": {"search": search, "selection": selection, "final": finals,
                                       "total": search + selection + finals}}
        if self.parts:
            d["resolved"]["parts"] = {p.part: {"target": p.target, "arch": p.spec.model.arch, "arms": p.arms,
                                               "cells": [f"{a}@k={k}" for a, k in p.cells],
                                               "trainings": sum(p.trainings())} for p in self.parts}
        return d


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


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
    if cfg.parts:  # a matrix: each target's data
        return next((problem for problem in map(data_problem, cfg.parts) if problem), None)
    d = cfg.spec.data
    folder = d.dataset.removeprefix("imagefolder:") if d.dataset.startswith("imagefolder:") else \
        d.root if d.dataset.startswith("torchvision:") else None
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


def matrix_specs(spec: Spec) -> list[tuple[str, str, Spec]]:
    """A transfer matrix's parts as single-target study specs: (target name, part name, spec), one per target and
    architecture of its sources (each architecture with a scratch baseline of its own, so every NTG compares like
    with like). A study with one target and one architecture is a plain study: ``[]``."""
    st = spec.study
    if st is None:
        return []
    given = list(st.sources or [spec.model.weights])
    archs: dict[str, list] = {}
    for g in given:
        archs.setdefault(g.arch if isinstance(g, Source) and g.arch else spec.model.arch, []).append(g)
    if st.targets is None and list(archs) == [spec.model.arch]:
        return []
    names = [g.name if isinstance(g, Source) else g for g in given]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"study.sources: two sources are called {twice[0]!r}; give each its own name, e.g. "
                        f"{{name: {twice[0].removeprefix('source:')}-small, weights: ..., arch: ...}}")
    if spec.tracking.register_as:
        raise UserError("tracking.register_as: a transfer matrix has a winner per target, not one model to "
                        "register; leave register_as out (each target's winners are logged as MLflow Models)")
    targets = st.targets or [None]
    out = []
    for t in targets:
        data = spec.data if t is None else DataCfg.model_validate(
            {**spec.data.model_dump(exclude_unset=True), **t.model_dump(exclude_unset=True, exclude={"name"})})
        tname = t.name if t is not None else "data"
        for arch, mine in archs.items():
            arms = [g.name if isinstance(g, Source) else g for g in mine] + ["scratch"]
            sub = spec.model_dump(exclude_unset=True)
            sub["model"] = {**sub.get("model", {}), "arch": arch}
            if "weights" in sub["model"] and not any(
                    (g.weights if isinstance(g, Source) else g) == sub["model"]["weights"] for g in mine):
                sub["model"]["weights"] = "none"  # the model's weights are a source of another architecture
            sub["data"] = data.model_dump(exclude_unset=True)
            sub["study"] = {**sub["study"], "targets": None,
                            "sources": [g.model_dump(exclude_unset=True) if isinstance(g, Source) else g for g in mine],
                            "spaces": {a: v for a, v in st.spaces.items() if a in arms}}
            name = tname if len(archs) == 1 else f"{tname}-{arch.replace('_', '-')}"
            where = f"study.targets[{tname}]" if t is not None else f"study.sources ({arch})"
            try:
                out.append((tname, name, Spec.model_validate(sub)))
            except ValidationError as err:
                raise UserError(f"{where}: {_first_error(err, '', []).args[0].lstrip(': ')}") from None
    return out


def resolve(spec: Spec, spec_dir: Path, text: str = "") -> Config:
    parts = []
    for target, name, sub in matrix_specs(spec):
        try:
            part = resolve(sub, spec_dir, text)
        except UserError as e:
            raise UserError(f"study.targets[{target}]: {e}" if spec.study.targets else str(e)) from None
        parts.append(part.model_copy(update={"target": target, "part": name}))
    if parts:  # the matrix: its own spec as written (paths as its parts resolved them), its parts
        spec = spec.model_copy(deep=True, update={"tracking": parts[0].spec.tracking, "storage": parts[0].spec.storage})
        arms = {a: w for p in parts for a, w in p.arms.items()}
        return Config(spec=spec, spec_text=text, spec_dir=str(spec_dir), experiment=parts[0].experiment, arms=arms,
                      input=parts[0].input, max_blocks=parts[0].max_blocks, store=parts[0].store, parts=parts)
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
        if w == "none" and spec.study is None:  # a plain sweep from scratch: its arm is called what it is
            name = "scratch"
        elif name in arms or name == "scratch":
            raise UserError(f"study.sources: two arms would be called {name!r}; give each a name, e.g. "
                            f"- {{name: mine, weights: {g.weights if isinstance(g, Source) else g}}}")
        arms[name] = w
    if spec.study is not None and spec.study.baseline == "scratch":
        arms["scratch"] = "none"
    for arm in spec.study.spaces if spec.study is not None else ():
        if arm not in arms:
            raise UserError(f"study.spaces.{arm}: no arm is called {arm!r}; the study's arms are "
                            f"{', '.join(arms)}")
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
    d.exclude = [("imagefolder:" + _abs(x.removeprefix("imagefolder:"), spec_dir)) if x.startswith("imagefolder:")
                 else x for x in d.exclude]
    if d.dataset.startswith("torchvision:"):
        if d.root is None:
            raise UserError(f"data.root: torchvision:{d.dataset.split(':', 1)[1]} needs data.root, the folder "
                            f"that holds its files")
        d.root = _abs(d.root, spec_dir)
    for src in spec.sources:  # a defined source's data paths, as data's are: relative to the spec file
        if src.dataset.startswith("imagefolder:"):
            src.dataset = "imagefolder:" + _abs(src.dataset.removeprefix("imagefolder:"), spec_dir)
        if src.root is not None:
            src.root = _abs(src.root, spec_dir)
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
    store = tracking.resolve_uri(spec.tracking.uri)  # a relative sqlite file: against the working directory
    spec.tracking.uri = store.uri
    if "://" not in spec.storage:  # written in the spec: relative to it; the default: the working directory
        spec.storage = _abs(spec.storage, spec_dir if "storage" in spec.model_fields_set else Path.cwd())
    cells = []
    if spec.study is not None:
        depths = sorted({n if d == "max" else int(d) for d in spec.study.depths}) if spec.study.depths \
            else space_depths(space, n)
        spec.study.depths = depths
        cells = [(arm, n if w == "none" else d) for arm, w in arms.items() for d in ([n] if w == "none" else depths)]
    return Config(spec=spec, spec_text=text, spec_dir=str(spec_dir), experiment=spec.tracking.experiment or spec.name,
                  arms=arms, input=inp, max_blocks=n, cells=cells, store=store.kind)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg.dump()), sort_keys=False, default_flow_style=None)
