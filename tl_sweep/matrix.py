"""A transfer matrix: every source on every target of ``study.targets``, in one command and one MLflow parent run.

A matrix is a list of single-target studies, its *parts* (:func:`tl_sweep.spec.matrix_specs`: one per target and
architecture of its sources), each run by :func:`tl_sweep.runner.run` with the study's rules (equal cells,
search repeats, selection, paired finals, the pooled verdict) under its own run nested in the matrix's: matrix →
target → trials. Halving (``study.allocate: halving``) cuts cells within a target, across its sources × depths:
validation accuracies of different targets are not on one scale, so a cell of one target never competes with
another target's. The matrix's report (:func:`tl_sweep.report.build_matrix`) reads the parts back from MLflow.

``--resume`` continues the latest matrix of the experiment: a target whose run finished is kept as it is, the one
that was running resumes in its own run, the rest start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tl_sweep import runner, tracking
from tl_sweep.contract import Tag
from tl_sweep.spec import Config, to_yaml

log_fn = Callable[[str], None]


@dataclass
class MatrixSummary:
    experiment_id: str
    parent_run_id: str
    parts: dict[str, runner.Summary] = field(default_factory=dict)  # the parts this process ran, by part name
    kept: list[str] = field(default_factory=list)  # parts a resumed matrix found finished
    status: str = "FINISHED"
    report: Any = None
    seconds: float = 0.0


def layout(cfg: Config) -> list[dict[str, str]]:
    """The matrix's parts in order, as its run's ``tl_sweep.matrix`` tag holds them (the report reads it)."""
    return [{"part": p.part, "target": p.target, "arch": p.spec.model.arch} for p in cfg.parts]


def open_matrix(cfg: Config, resumed: str | None, hashed: str) -> tuple[str, str]:
    """The experiment and the matrix's parent run: a new one, or the one being resumed, reopened."""
    s, uri = cfg.spec, cfg.spec.tracking.uri
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    if resumed:
        tracking.reopen(uri, resumed)
        return exp_id, resumed
    targets = list(dict.fromkeys(p.target for p in cfg.parts))
    run_name = f"{s.name}·matrix·{len(targets)} targets·{time.strftime('%Y%m%d-%H%M%S')}"
    files = {"spec.yaml": cfg.spec_text or to_yaml(cfg), "resolved.yaml": to_yaml(cfg)}
    tags = {**tracking.source_tags(cfg.spec_file), Tag.MATRIX: json.dumps(layout(cfg)), Tag.SPEC_HASH: hashed,
            Tag.ARCH: ",".join(dict.fromkeys(p.spec.model.arch for p in cfg.parts)),
            Tag.ARMS: ",".join(cfg.arms)}
    return exp_id, tracking.start_parent(uri, exp_id, run_name, cfg.params(), files, tags)


def run(cfg: Config, *, address: str | None = None, log: log_fn = print, report_dir: str | None = None,
        resume: bool = False) -> MatrixSummary:
    """Run every part of the matrix in turn, then its report; ``resume`` continues the latest matrix."""
    t0 = time.perf_counter()
    uri = cfg.spec.tracking.uri
    tracking.check(uri)
    resumed = runner.resumable(cfg) if resume else None
    exp_id, parent = open_matrix(cfg, resumed, cfg.digest())
    out = MatrixSummary(exp_id, parent)
    had = {r.data.tags.get(Tag.PART): r for r in tracking.children(uri, exp_id, parent)
           if r.data.tags.get(Tag.ROLE) == "target"}
    targets = list(dict.fromkeys(p.target for p in cfg.parts))
    log(f"matrix: {len(targets)} targets × {len([a for a in cfg.arms if a != 'scratch'])} sources in "
        f"{len(cfg.parts)} studies, {sum(cfg.trainings())} trainings; mlflow parent run {parent}"
        + (" (resumed)" if resumed else ""))
    try:
        for i, part in enumerate(cfg.parts, 1):
            before = had.get(part.part)
            if before is not None and before.info.status == "FINISHED":
                out.kept.append(part.part)
                log(f"matrix [{i}/{len(cfg.parts)}] {part.part}: had finished (run {before.info.run_id}); kept")
                continue
            log(f"matrix [{i}/{len(cfg.parts)}] target {part.target} ({part.spec.model.arch}: "
                f"{', '.join(part.arms)}): {sum(part.trainings())} trainings"
                + (f", resuming run {before.info.run_id}" if before is not None else ""))
            out.parts[part.part] = runner.run(
                part, address=address, log=log, report_dir=f"{report_dir}/{part.part}" if report_dir else None,
                resume=before is not None, within=parent, resumed=before.info.run_id if before is not None else None)
    except KeyboardInterrupt:
        out.status = "KILLED"
        raise
    except BaseException:
        out.status = "FAILED"
        raise
    finally:
        out.seconds = time.perf_counter() - t0
        if out.status != "FINISHED":
            tracking.finish_parent(uri, parent, {}, {}, out.status)
    waiting = sum(s.waiting for s in out.parts.values())
    if waiting:  # the tracking server is unreachable: the matrix's report is built once it has every write
        log(f"matrix: {waiting} writes wait in this node's outbox; once delivered (tl-sweep sync), "
            f"tl-sweep report --run {parent} builds the matrix's report")
        tracking.finish_parent(uri, parent, {"matrix_seconds": out.seconds}, {}, out.status)
        return out
    from tl_sweep import report

    try:
        out.report = report.build_matrix(uri, exp_id, parent, out_dir=report_dir, log=log,
                                         known={s.parent_run_id: s.report for s in out.parts.values() if s.report})
    finally:  # the matrix's run ends whatever its report does
        tracking.finish_parent(uri, parent, {"matrix_seconds": out.seconds}, {}, out.status)
    return out
