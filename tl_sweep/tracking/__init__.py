"""MLflow: one experiment per spec name, one parent run per sweep, one nested child run per trial.

The driver creates the experiment and the parent run before any trial starts (concurrent creation races,
mlflow#4123). Trials create their child runs with the ``mlflow.parentRunId`` tag through ``MlflowClient`` -
no active-run globals, so several trials in one process or on one node never mix their runs. Writes are
retried with backoff: sqlite answers "database is locked" under concurrent writers, and a tracking server
may be restarting.

The package's parts: :mod:`~tl_sweep.tracking.store` (what a URI is, and whether it can be used),
:mod:`~tl_sweep.tracking.calls` (the client and its retries), :mod:`~tl_sweep.tracking.outbox` (writes an outage
held back), :mod:`~tl_sweep.tracking.models` (logged models, the registry, system metrics); this module: the
experiment, the parent and trial runs, and reading them back.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tl_sweep import redact
from tl_sweep.contract import Tag
from tl_sweep.errors import UserError
from tl_sweep.tracking.calls import RETRY_SECONDS, client, retry
from tl_sweep.tracking.models import (SystemMetrics, link_metrics, load_pyfunc, log_model,  # noqa: F401
                                      log_torch_model, register, version_tags)
from tl_sweep.tracking.outbox import Outbox, sync, waiting  # noqa: F401
from tl_sweep.tracking.store import Store, artifact_root, check, check_address, reachable, resolve_uri  # noqa: F401

PARENT_TAG, ROLE_TAG, TRIAL_ID_TAG = Tag.PARENT, Tag.ROLE, Tag.TRIAL_ID
ERROR_TAG, SUPERSEDED_TAG = Tag.ERROR, Tag.SUPERSEDED
OPEN_WAIT = 1800.0  # a trial cannot train without its run: opening one waits this long for the server


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = retry(c.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"tracking.experiment: experiment {name!r} was deleted in {uri}; restore it "
                            f"(mlflow experiments restore) or choose another name")
        return exp.experiment_id
    root = artifact_root(uri)
    location = Path(root, name).as_uri() if root else None
    try:
        return retry(c.create_experiment, name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another driver created it first
        return retry(c.get_experiment_by_name, name).experiment_id


def _clean(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as strings with no secret in them (``redact``): error messages and sources can carry URIs."""
    return {k: redact.text(str(v)) for k, v in tags.items()}


def source_tags(spec_file: str) -> dict[str, str]:
    """MLflow's standard source tags: who ran what, from which file, at which git commit."""
    import getpass
    import subprocess

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": spec_file or "tl-sweep"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    if spec_file:
        try:
            commit = subprocess.run(["git", "-C", str(Path(spec_file).parent), "rev-parse", "HEAD"], text=True,
                                    capture_output=True, timeout=10)
            if commit.returncode == 0:
                tags["mlflow.source.git.commit"] = commit.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return tags


def start_parent(uri: str, exp_id: str, run_name: str, params: dict[str, str], files: dict[str, str],
                 tags: dict[str, str]) -> str:
    """Create the sweep's parent run: the resolved config as params (``Config.params``), spec + resolved config as
    artifacts."""
    from mlflow.entities import Param

    c = client(uri)
    run = retry(c.create_run, exp_id, run_name=run_name, tags=_clean({ROLE_TAG: "sweep", **tags}))
    rid = run.info.run_id
    rows = [Param(k, redact.text(str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(rows), 100):
        retry(c.log_batch, rid, params=rows[i:i + 100])
    log_texts(uri, rid, files)
    return rid


def log_estimates(uri: str, exp_id: str, run_id: str | None, metrics: dict[str, float], table: str,
                  tags: dict[str, str]) -> str:
    """Transferability estimates on ``run_id`` (a study's parent run), or on a new run of their own."""
    if run_id is None:
        run_id = retry(client(uri).create_run, exp_id, run_name="transferability estimates",
                        tags=_clean({ROLE_TAG: "estimate", **tags})).info.run_id
        log_batch(uri, run_id, metrics)
        log_texts(uri, run_id, {"estimates.md": table + "\n"})
        retry(client(uri).set_terminated, run_id, "FINISHED")
    else:
        log_batch(uri, run_id, metrics)
        log_texts(uri, run_id, {"estimates.md": table + "\n"})
    return run_id


def log_texts(uri: str, run_id: str, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Log text files (name → content) as artifacts of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(redact.text(text))
            retry(client(uri).log_artifact, run_id, str(Path(tmp) / name), artifact_path)


def log_files(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        retry(client(uri).log_artifact, run_id, str(p), artifact_path)


def log_datasets(uri: str, run_id: str, name: str, source: str, splits: dict[str, tuple[int, str]]) -> None:
    """The data a run used, as MLflow dataset inputs (the UI's Datasets column): one per split, its context
    (train/val/test) as the tag MLflow reads, the split's digest, and its size as the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=f"{name} ({split})", digest=digest, source_type="tl-sweep",
                                   source=json.dumps({"uri": source}), profile=json.dumps({"num_rows": n})),
                           tags=[InputTag("mlflow.data.context", split)])
              for split, (n, digest) in splits.items()]
    for attempt in range(5):
        try:
            return retry(client(uri).log_inputs, run_id, datasets=inputs, window=OPEN_WAIT)
        except Exception as e:  # noqa: BLE001 - MLflow wraps sqlalchemy's IntegrityError in MlflowException
            # trials starting together log the same new dataset: MLflow looks it up, then inserts it, and the one
            # that inserts second fails on the table's unique key (a trial failed and was retried for it). The
            # first one's row is there now: logging again links it.
            said = str(e).lower()  # sqlite: "UNIQUE constraint failed: datasets..."; postgres/mysql: "duplicate"
            if "datasets" not in said or not ("unique" in said or "duplicate" in said) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def finish_parent(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str], status: str) -> None:
    log_batch(uri, run_id, metrics, tags)
    Outbox(uri).write(run_id, {"op": "end", "status": status, "time": int(time.time() * 1000)})


def children(uri: str, exp_id: str, parent_id: str) -> list:
    """All child runs of a parent (every page)."""
    c = client(uri)
    out, token = [], None
    while True:
        page = retry(c.search_runs, [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                      max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def close_orphans(uri: str, exp_id: str, parent_id: str,
                  why: str = "trial process ended without closing") -> int:
    """Mark child runs still RUNNING (their process was killed, or the sweep interrupted) as KILLED with ``why``;
    returns how many. A resumed sweep reopens a trial's run where it continues it."""
    n = 0
    for run in children(uri, exp_id, parent_id):
        if run.info.status == "RUNNING":
            close_run(uri, run.info.run_id, "KILLED", {ERROR_TAG: why})
            n += 1
    return n


def retire_unknown(uri: str, exp_id: str, parent_id: str, known_trials: set[str]) -> int:
    """Soft-delete unfinished child runs whose Tune trial the (resumed) sweep does not know; returns how many."""
    n = 0
    for run in children(uri, exp_id, parent_id):
        if run.info.status != "FINISHED" and run.data.tags.get(TRIAL_ID_TAG) not in known_trials:
            log_batch(uri, run.info.run_id, {}, {SUPERSEDED_TAG: "started after the last saved sweep state of a "
                                                 "killed driver; its trial was proposed again on --resume"})
            retry(client(uri).delete_run, run.info.run_id)
            n += 1
    return n


def ui_link(uri_or_base: str, exp_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's training runs, or of one run (``workflowType``: the UI opens in GenAI
    mode otherwise)."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{redact.strip_userinfo(uri_or_base).rstrip('/')}/#/experiments/{exp_id}/{page}?workflowType=machine_learning"


class TrialRun:
    """One trial's nested MLflow run, written through the client API with retries.

    The trial opens it (:meth:`open`) and logs to it; the driver closes it (:func:`close_run`).
    """

    def __init__(self, uri: str, run_id: str, previous: str | None = None, metrics: dict | None = None):
        self.uri, self.run_id = uri, run_id
        self.previous, self.metrics = previous, metrics or {}  # an earlier attempt's status and last metrics

    @classmethod
    def open(cls, uri: str, exp_id: str, parent_id: str, *, name: str, params: dict[str, Any],
             tags: dict[str, str], run_id: str | None = None) -> "TrialRun":
        """Open the trial's run: ``run_id`` (resumed from a checkpoint), else the run an earlier attempt of
        the same Tune trial created (found by its trial id), else a new nested run."""
        from mlflow.entities import Param

        c, wait = client(uri), OPEN_WAIT  # the server may be down for a while: the trial waits for it
        if run_id is None:
            run_id = trial_run_id(uri, exp_id, parent_id, tags[TRIAL_ID_TAG], window=wait)
        if run_id is not None:
            Outbox(uri).write(run_id, {"op": "batch"})  # what an earlier attempt left queued here goes first
            found = retry(c.get_run, run_id, window=wait)
            if found.info.status != "FINISHED":
                retry(c.update_run, run_id, status="RUNNING", window=wait)
            return cls(uri, run_id, found.info.status, found.data.metrics)
        run = retry(c.create_run, exp_id, run_name=name, tags=_clean({PARENT_TAG: parent_id, **tags}), window=wait)
        retry(c.log_batch, run.info.run_id, params=[Param(k, redact.text(str(v))) for k, v in params.items()],
               window=wait)
        return cls(uri, run.info.run_id)

    def last_step(self, metric: str) -> int:
        """The last epoch this run logged ``metric`` for (0 for a new run)."""
        return max((m.step for m in metric_history(self.uri, self.run_id, metric)), default=0)

    def log_epoch(self, epoch: int, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
        log_batch(self.uri, self.run_id, metrics, tags, step=epoch)

    def log_tags(self, tags: dict[str, str]) -> None:
        log_batch(self.uri, self.run_id, {}, tags)

    def log_artifact(self, path: Path) -> None:
        Outbox(self.uri).write(self.run_id, {"op": "artifact", "path": str(path)})


def trial_run_id(uri: str, exp_id: str, parent_id: str, trial_id: str, window: float = RETRY_SECONDS
                 ) -> str | None:
    """The run a Tune trial opened under ``parent_id`` (by its trial id tag), if any."""
    found = retry(client(uri).search_runs, [exp_id], max_results=1, filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"), window=window)
    return found[0].info.run_id if found else None


def log_batch(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
              step: int = 0) -> None:
    """Metrics (at ``step``) and tags in one call; kept in the outbox while the server is unreachable."""
    now = int(time.time() * 1000)
    Outbox(uri).write(run_id, {"op": "batch", "metrics": [(k, float(v), now, step) for k, v in metrics.items()],
                               "tags": _clean(tags or {})})


def close_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None,
              metrics: dict[str, float] | None = None, step: int = 0, correct: bool = False) -> None:
    """The one way a run ends: its last tags and metrics (at ``step``), then its status (unless it ended already;
    with ``correct``, whatever status it has: a resumed sweep setting right what a killed driver left)."""
    if tags or metrics:
        log_batch(uri, run_id, metrics or {}, tags, step=step)
    Outbox(uri).write(run_id, {"op": "end", "status": status, "time": int(time.time() * 1000),
                               "only_running": not correct})


# ----------------------------------------------------------------------------------------- reading


def get_run(uri: str, run_id: str):
    """A run (info, params, metrics, tags); an unknown id is a one-line error."""
    try:
        return retry(client(uri).get_run, run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own RESOURCE_DOES_NOT_EXIST
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise UserError(f"--run: no run {run_id} in {uri}; copy the id from the MLflow UI or "
                            f"tl-sweep run's output") from None
        raise


def experiment(uri: str, exp_id: str):
    return retry(client(uri).get_experiment, exp_id)


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every logged value of one metric of a run, in step order."""
    return sorted(retry(client(uri).get_metric_history, run_id, key), key=lambda m: m.step)


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download one artifact of a run into ``dst``; ``None`` when the run has no such artifact."""
    try:
        return Path(retry(client(uri).download_artifacts, run_id, path, str(dst)))
    except Exception:  # noqa: BLE001 - absent (e.g. a sweep logged by an older tl-sweep)
        return None


def latest_sweep(uri: str, exp_id: str):
    """The newest parent (sweep) run of an experiment, or ``None``."""
    runs = retry(client(uri).search_runs, [exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                  order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_sweep(uri: str, experiment_name: str) -> tuple[str, str]:
    """(experiment id, newest parent run id) of an experiment, by name; one-line errors when there is none."""
    c = client(uri)
    exp = retry(c.get_experiment_by_name, experiment_name)
    if exp is None:
        names = [e.name for e in retry(c.search_experiments)]
        raise UserError(f"--experiment: no experiment {experiment_name!r} in {uri}; experiments there: "
                        f"{', '.join(names) or 'none'}")
    run = latest_sweep(uri, exp.experiment_id)
    if run is None:
        raise UserError(f"--experiment: experiment {experiment_name!r} has no tl-sweep run yet; run a spec first")
    return exp.experiment_id, run.info.run_id


def reopen(uri: str, run_id: str) -> None:
    """Mark a resumed sweep's parent run RUNNING again."""
    retry(client(uri).update_run, run_id, status="RUNNING")


