"""MLflow: one experiment per spec name, one parent run per sweep, one nested child run per trial.

The driver creates the experiment and the parent run before any trial starts (concurrent creation races,
mlflow#4123). Trials create their child runs with the ``mlflow.parentRunId`` tag through ``MlflowClient`` -
no active-run globals, so several trials in one process or on one node never mix their runs. Writes are
retried with backoff: sqlite answers "database is locked" under concurrent writers, and a tracking server
may be restarting.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, TypeVar

from tl_sweep import redact
from tl_sweep.contract import Tag
from tl_sweep.errors import UserError

T = TypeVar("T")
PARENT_TAG, ROLE_TAG, TRIAL_ID_TAG = Tag.PARENT, Tag.ROLE, Tag.TRIAL_ID
ERROR_TAG, SUPERSEDED_TAG = Tag.ERROR, Tag.SUPERSEDED
RETRY_SECONDS = 60.0  # how long a call is retried before it fails (or, for a write, is kept in the outbox)
# a write to a run is retried this long, then kept on local disk until the server is back
OUTBOX_AFTER = float(os.environ.get("TL_SWEEP_OUTBOX_AFTER", "20"))
OPEN_WAIT = 1800.0  # a trial cannot train without its run: opening one waits this long for the server


# what a failure that may pass looks like: a locked sqlite, an unreachable or overloaded server. The status codes
# must stand alone: a message that quotes a run id ("...aa504...") is not a 504.
_TRANSIENT = re.compile(r"locked|connection|timed out|temporarily|max retries|\b50[234]\b")


def _transient(e: Exception) -> bool:
    return _TRANSIENT.search(str(e).lower()) is not None


def _retry(fn: Callable[..., T], *args, window: float = RETRY_SECONDS, **kwargs) -> T:
    """Call an MLflow client method, retrying transient failures (locked sqlite, unreachable server)."""
    delay, deadline = 0.1, time.monotonic() + window
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow wraps sqlalchemy/requests errors in several types
            if not _transient(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@functools.lru_cache(maxsize=8)
def client(uri: str):
    from mlflow.tracking import MlflowClient

    # MLflow's own HTTP retries would hold one call for ~4 minutes on a dead server; _retry decides instead
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri)


def normalise_uri(uri: str) -> str:
    """A relative ``sqlite:///x.db`` becomes absolute against the working directory, as MLflow reads it, so
    trials running in other directories write to the same store. A server URI's ``user:password@`` moves to
    MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (inherited by local Ray workers),
    so no config, trial context, Tune file or MLflow param ever holds the password."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        raise UserError(f"tracking.uri: {uri!r} is not a tracking URI; use sqlite:///mlflow.db or "
                        f"http://host:port (MLflow 3 refuses a plain ./mlruns folder)")
    if uri.startswith(("http://", "https://")) and redact.has_password(uri):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(uri)
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        return redact.strip_userinfo(uri)
    return uri


def check(uri: str) -> None:
    """Refuse, in one line and before any work, a tracking URI that cannot be used."""
    check_address(uri)
    try:
        from filelock import FileLock

        # two sweeps creating one sqlite database at once race in its migrations
        sqlite = uri.startswith("sqlite:///")
        with FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300) if sqlite else nullcontext():
            _retry(client(uri).search_experiments, max_results=1)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"tracking.uri: cannot use {redact.uri(uri)}: {redact.text(first)}") from None


def check_address(uri: str) -> None:
    """The part of :func:`check` that needs no MLflow (so a wrong address is one line in a fraction of a second):
    a sqlite file's folder exists and is writable, a server answers."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise UserError(f"tracking.uri: folder {db.parent} does not exist; create it or point "
                            f"tracking.uri at sqlite:///<existing folder>/mlflow.db")
        if not os.access(db.parent, os.W_OK):
            raise UserError(f"tracking.uri: cannot write in {db.parent}; choose a writable folder")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(redact.strip_userinfo(uri).rstrip("/") + "/health", timeout=10) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            from urllib.parse import urlsplit

            reason, at = getattr(e, "reason", e), urlsplit(redact.strip_userinfo(uri))
            port = at.port or (443 if at.scheme == "https" else 80)
            raise UserError(f"tracking.uri: MLflow server {redact.uri(uri)} is not reachable ({reason}); start it "
                            f"(mlflow server --host {at.hostname or '127.0.0.1'} --port {port}) or fix the "
                            f"address") from None
    elif not uri.startswith(("databricks", "postgresql", "mysql", "mssql", "file:")):
        raise UserError(f"tracking.uri: unsupported URI {redact.uri(uri)!r}; use sqlite:///mlflow.db or http://host:port")


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, absolute, so trials in any cwd find them."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None  # a server decides (mlflow server --serve-artifacts)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = _retry(c.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"tracking.experiment: experiment {name!r} was deleted in {uri}; restore it "
                            f"(mlflow experiments restore) or choose another name")
        return exp.experiment_id
    root = artifact_root(uri)
    location = Path(root, name).as_uri() if root else None
    try:
        return _retry(c.create_experiment, name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another driver created it first
        return _retry(c.get_experiment_by_name, name).experiment_id


def _clean(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as strings with no secret in them (``redact``): error messages and sources can carry URIs."""
    return {k: redact.text(str(v)) for k, v in tags.items()}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


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


def start_parent(uri: str, exp_id: str, run_name: str, config: dict, files: dict[str, str],
                 tags: dict[str, str]) -> str:
    """Create the sweep's parent run: resolved config as params, spec + resolved config as artifacts."""
    from mlflow.entities import Param

    c = client(uri)
    run = _retry(c.create_run, exp_id, run_name=run_name, tags=_clean({ROLE_TAG: "sweep", **tags}))
    rid = run.info.run_id
    params = [Param(k, redact.text(str(v))[:6000]) for k, v in _flatten(config).items()]
    for i in range(0, len(params), 100):
        _retry(c.log_batch, rid, params=params[i:i + 100])
    log_texts(uri, rid, files)
    return rid


def log_estimates(uri: str, exp_id: str, run_id: str | None, metrics: dict[str, float], table: str,
                  tags: dict[str, str]) -> str:
    """Transferability estimates on ``run_id`` (a study's parent run), or on a new run of their own."""
    if run_id is None:
        run_id = _retry(client(uri).create_run, exp_id, run_name="transferability estimates",
                        tags=_clean({ROLE_TAG: "estimate", **tags})).info.run_id
        log_batch(uri, run_id, metrics)
        log_texts(uri, run_id, {"estimates.md": table + "\n"})
        _retry(client(uri).set_terminated, run_id, "FINISHED")
    else:
        log_batch(uri, run_id, metrics)
        log_texts(uri, run_id, {"estimates.md": table + "\n"})
    return run_id


def log_texts(uri: str, run_id: str, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Log text files (name → content) as artifacts of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(redact.text(text))
            _retry(client(uri).log_artifact, run_id, str(Path(tmp) / name), artifact_path)


def log_files(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        _retry(client(uri).log_artifact, run_id, str(p), artifact_path)


def log_datasets(uri: str, run_id: str, name: str, source: str, splits: dict[str, tuple[int, str]]) -> None:
    """The data a run used, as MLflow dataset inputs (the UI's Datasets column): one per split, its context
    (train/val/test) as the tag MLflow reads, the split's digest, and its size as the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=f"{name} ({split})", digest=digest, source_type="tl-sweep",
                                   source=json.dumps({"uri": source}), profile=json.dumps({"num_rows": n})),
                           tags=[InputTag("mlflow.data.context", split)])
              for split, (n, digest) in splits.items()]
    _retry(client(uri).log_inputs, run_id, datasets=inputs, window=OPEN_WAIT)


def finish_parent(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str], status: str) -> None:
    log_batch(uri, run_id, metrics, tags)
    Outbox(uri).write(run_id, {"op": "end", "status": status, "time": int(time.time() * 1000)})


def children(uri: str, exp_id: str, parent_id: str) -> list:
    """All child runs of a parent (every page)."""
    c = client(uri)
    out, token = [], None
    while True:
        page = _retry(c.search_runs, [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                      max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def close_orphans(uri: str, exp_id: str, parent_id: str) -> int:
    """Mark child runs still RUNNING (their process was killed) as KILLED; returns how many."""
    n = 0
    for run in children(uri, exp_id, parent_id):
        if run.info.status == "RUNNING":
            close_run(uri, run.info.run_id, "KILLED", {ERROR_TAG: "trial process ended without closing"})
            n += 1
    return n


def retire_unknown(uri: str, exp_id: str, parent_id: str, known_trials: set[str]) -> int:
    """Soft-delete unfinished child runs whose Tune trial the (resumed) sweep does not know; returns how many."""
    n = 0
    for run in children(uri, exp_id, parent_id):
        if run.info.status != "FINISHED" and run.data.tags.get(TRIAL_ID_TAG) not in known_trials:
            log_batch(uri, run.info.run_id, {}, {SUPERSEDED_TAG: "started after the last saved sweep state of a "
                                                 "killed driver; its trial was proposed again on --resume"})
            _retry(client(uri).delete_run, run.info.run_id)
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
            found = _retry(c.get_run, run_id, window=wait)
            if found.info.status != "FINISHED":
                _retry(c.update_run, run_id, status="RUNNING", window=wait)
            return cls(uri, run_id, found.info.status, found.data.metrics)
        run = _retry(c.create_run, exp_id, run_name=name, tags=_clean({PARENT_TAG: parent_id, **tags}), window=wait)
        _retry(c.log_batch, run.info.run_id, params=[Param(k, redact.text(str(v))) for k, v in params.items()],
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
    found = _retry(client(uri).search_runs, [exp_id], max_results=1, filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"), window=window)
    return found[0].info.run_id if found else None


def log_batch(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
              step: int = 0) -> None:
    """Metrics (at ``step``) and tags in one call; kept in the outbox while the server is unreachable."""
    now = int(time.time() * 1000)
    Outbox(uri).write(run_id, {"op": "batch", "metrics": [(k, float(v), now, step) for k, v in metrics.items()],
                               "tags": _clean(tags or {})})


def close_run(uri: str, run_id: str, status: str, tags: dict[str, str] | None = None,
              metrics: dict[str, float] | None = None, step: int = 0) -> None:
    """The one way a run ends: its last tags and metrics (at ``step``), then its status (unless it ended
    already)."""
    if tags or metrics:
        log_batch(uri, run_id, metrics or {}, tags, step=step)
    Outbox(uri).write(run_id, {"op": "end", "status": status, "time": int(time.time() * 1000), "only_running": True})


# ------------------------------------------------------------------------------ outage: the outbox


class Outbox:
    """Writes an unreachable tracking server could not take, kept on this node's disk, in order, per run.

    A write to a run (metrics, params, tags, an artifact, its end) that still fails after ``OUTBOX_AFTER``
    seconds of retries is appended to ``<cache>/outbox/<store>/<run id>.jsonl`` instead of failing the trial;
    from then on that run's writes queue behind it, so nothing arrives out of order. The next write to the run
    tries to deliver the queue first; the driver delivers every queue of its node before the report, and
    ``tl-sweep sync`` delivers what is left (another node's, or all of it when the server was down at the end).
    Delivery is idempotent (same metric key, value, time and step; same tags, params and artifact paths), and
    each delivered line leaves the file at once, so a crash mid-delivery re-sends at most one write. A write
    the server refuses for good (a run deleted meanwhile) goes to ``rejected.log`` with the reason.
    """

    def __init__(self, uri: str):
        import hashlib

        from tl_sweep import cachefile

        self.uri = uri
        self.dir = cachefile.root() / "outbox" / hashlib.sha1(uri.encode()).hexdigest()[:12]

    def _file(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.jsonl"

    def _lock(self, run_id: str):
        from filelock import FileLock

        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._file(run_id)) + ".lock")

    def runs(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.jsonl")) if self.dir.is_dir() else []

    def count(self) -> int:
        return sum(len(self._file(r).read_text().splitlines()) for r in self.runs())

    def keep(self, run_id: str, entry: dict[str, Any]) -> None:
        if entry.get("op") == "artifact":  # the file may be a temporary: keep a copy
            import shutil
            import uuid

            copy = self.dir / "files" / uuid.uuid4().hex / Path(entry["path"]).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry["path"], copy)
            entry = {**entry, "path": str(copy)}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "uri").write_text(redact.uri(self.uri))
        with open(self._file(run_id), "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, run_id: str, entry: dict[str, Any]) -> None:
        """Send ``entry`` now, or queue it (behind anything already queued for the run)."""
        empty = entry == {"op": "batch"}  # only: deliver what is queued
        if not self._file(run_id).exists():  # the usual case (no outage): no lock, nothing written to disk
            if empty:
                return
            try:
                _send(self.uri, run_id, entry, window=OUTBOX_AFTER)
                return
            except Exception as e:  # noqa: BLE001
                if not _transient(e):
                    raise
                with self._lock(run_id):
                    self.keep(run_id, entry)
                return
        with self._lock(run_id):
            self._deliver(run_id, window=0.0)  # one try: is the server back?
            if self._file(run_id).exists():  # not all of the queue went: this write queues behind it
                if not empty:
                    self.keep(run_id, entry)
                return
            if empty:
                return
            try:
                _send(self.uri, run_id, entry, window=OUTBOX_AFTER)
            except Exception as e:  # noqa: BLE001
                if not _transient(e):
                    raise
                self.keep(run_id, entry)

    def deliver(self, window: float = 5.0) -> tuple[int, int]:
        """Deliver every queued write of this node: (delivered, still waiting)."""
        sent = 0
        for run_id in self.runs():
            with self._lock(run_id):
                sent += self._deliver(run_id, window)
        return sent, self.count()

    def _deliver(self, run_id: str, window: float) -> int:
        """Send the run's queue in order until the server fails (transiently): how many went."""
        path = self._file(run_id)
        lines = path.read_text().splitlines() if path.exists() else []
        done = 0
        try:
            for line in lines:
                try:
                    _send(self.uri, run_id, json.loads(line), window=window)
                except Exception as e:  # noqa: BLE001
                    if _transient(e):
                        raise
                    # the server refuses it for good (a deleted run, an invalid value): set aside, never retried
                    with open(self.dir / "rejected.log", "a") as f:
                        f.write(json.dumps({"run_id": run_id, "entry": json.loads(line),
                                            "error": redact.text(str(e))[:500]}) + "\n")
                done += 1
                rest = lines[done:]
                if rest:
                    path.write_text("\n".join(rest) + "\n")
        except Exception as e:  # noqa: BLE001
            if not _transient(e):
                raise
        finally:
            if done == len(lines):
                path.unlink(missing_ok=True)
        if done:
            _DELAYED[run_id] = _DELAYED.get(run_id, 0) + done
            try:  # how many of the run's writes arrived late: informational, never worth failing for
                _send(self.uri, run_id, {"op": "batch", "tags": {Tag.DELAYED: str(_DELAYED[run_id])}}, window=window)
            except Exception:  # noqa: BLE001
                pass
        return done


_DELAYED: dict[str, int] = {}  # run id -> writes this process delivered late


def _send(uri: str, run_id: str, entry: dict[str, Any], window: float) -> None:
    """One outbox entry to the server (the same call whether it is sent at once or late)."""
    from mlflow.entities import Metric, Param, RunTag

    c, op = client(uri), entry["op"]
    if op == "batch":
        _retry(c.log_batch, run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in entry.get("metrics", [])],
               params=[Param(k, v) for k, v in entry.get("params", {}).items()],
               tags=[RunTag(k, v) for k, v in entry.get("tags", {}).items()], window=window)
    elif op == "artifact":
        _retry(c.log_artifact, run_id, entry["path"], entry.get("artifact_path"), window=window)
        if "/outbox/" in entry["path"]:
            import shutil

            shutil.rmtree(Path(entry["path"]).parent, ignore_errors=True)
    elif op == "end":  # a run's status, unless it ended already (a trial's end is recorded once)
        if not entry.get("only_running") or _retry(c.get_run, run_id, window=window).info.status == "RUNNING":
            _retry(c.set_terminated, run_id, entry["status"], end_time=entry["time"], window=window)
    else:
        raise ValueError(f"unknown outbox entry {op!r}")


def reachable(uri: str, timeout: float = 5.0) -> bool:
    """Whether a tracking server answers now (a sqlite store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def sync(uri: str) -> tuple[int, int]:
    """Deliver what this node's outbox holds for ``uri``: (delivered, still waiting)."""
    return Outbox(uri).deliver()


def waiting(uri: str) -> int:
    """How many writes for ``uri`` wait in this node's outbox."""
    return Outbox(uri).count()


# ----------------------------------------------------------------------------------------- reading


def get_run(uri: str, run_id: str):
    """A run (info, params, metrics, tags); an unknown id is a one-line error."""
    try:
        return _retry(client(uri).get_run, run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own RESOURCE_DOES_NOT_EXIST
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise UserError(f"--run: no run {run_id} in {uri}; copy the id from the MLflow UI or "
                            f"tl-sweep run's output") from None
        raise


def experiment(uri: str, exp_id: str):
    return _retry(client(uri).get_experiment, exp_id)


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every logged value of one metric of a run, in step order."""
    return sorted(_retry(client(uri).get_metric_history, run_id, key), key=lambda m: m.step)


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download one artifact of a run into ``dst``; ``None`` when the run has no such artifact."""
    try:
        return Path(_retry(client(uri).download_artifacts, run_id, path, str(dst)))
    except Exception:  # noqa: BLE001 - absent (e.g. a sweep logged by an older tl-sweep)
        return None


def latest_sweep(uri: str, exp_id: str):
    """The newest parent (sweep) run of an experiment, or ``None``."""
    runs = _retry(client(uri).search_runs, [exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                  order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_sweep(uri: str, experiment_name: str) -> tuple[str, str]:
    """(experiment id, newest parent run id) of an experiment, by name; one-line errors when there is none."""
    c = client(uri)
    exp = _retry(c.get_experiment_by_name, experiment_name)
    if exp is None:
        names = [e.name for e in _retry(c.search_experiments)]
        raise UserError(f"--experiment: no experiment {experiment_name!r} in {uri}; experiments there: "
                        f"{', '.join(names) or 'none'}")
    run = latest_sweep(uri, exp.experiment_id)
    if run is None:
        raise UserError(f"--experiment: experiment {experiment_name!r} has no tl-sweep run yet; run a spec first")
    return exp.experiment_id, run.info.run_id


def reopen(uri: str, run_id: str) -> None:
    """Mark a resumed sweep's parent run RUNNING again."""
    _retry(client(uri).update_run, run_id, status="RUNNING")


# ------------------------------------------------------------------------------------------ models


def log_model(uri: str, run_id: str, ckpt_path: Path, example, *, name: str = "model") -> str:
    """Log a tl-sweep checkpoint on ``run_id`` as an MLflow Model (MLflow 3 logged model, linked to the run):
    pyfunc from code (``tl_sweep/mlflow_model.py``: images in, labels and probabilities out; no pickle), with
    ``example`` (a uint8 N×H×W×3 batch of real training images) as input example. The signature states the
    output (label, probability, one column per class); it leaves the input open, because MLflow's schemas
    cannot say "uint8 arrays of any size, or file paths", and enforcing either would refuse the other.
    Returns the model's URI."""
    import mlflow
    from mlflow.models import infer_signature

    from tl_sweep.classifier import Classifier

    classifier = Classifier.from_file(ckpt_path)
    rows = classifier.predict(list(example))
    import pandas as pd

    output = pd.DataFrame([{"label": r["label"], "probability": r["probability"], **r["probabilities"]} for r in rows])
    package = Path(__file__).resolve().parent
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = _retry(mlflow.pyfunc.log_model, name=name, python_model=str(package / "mlflow_model.py"),
                      artifacts={"checkpoint": str(ckpt_path)}, code_paths=[str(package)],
                      signature=infer_signature(None, output), input_example=example,
                      pip_requirements=_requirements())
    return info.model_uri


def log_torch_model(uri: str, run_id: str, ckpt_path: Path, *, name: str = "pytorch") -> str:
    """The same checkpoint as an ``mlflow.pytorch`` model, serialised with torch.export (``pt2``, no pickle):
    ``mlflow.pytorch.load_model(uri)`` gives a module taking the normalised N×3×crop×crop float batch."""
    import mlflow
    import torch

    from tl_sweep import checkpoint

    ckpt = checkpoint.load(ckpt_path)
    model = checkpoint.build_model(ckpt)
    crop = int(ckpt["input"]["crop"])
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = _retry(mlflow.pytorch.log_model, model, name=name, serialization_format="pt2",
                      input_example=torch.zeros(2, 3, crop, crop).numpy(), pip_requirements=_requirements())
    return info.model_uri


def link_metrics(uri: str, run_id: str, model_uris: list[str], keys: list[str]) -> None:
    """The last value of each of ``run_id``'s metrics ``keys`` linked to each logged model (MLflow 3): its
    Models page then shows and compares them. Each is sent again with the run's own key, value, time and step,
    which MLflow stores once: the run's metric history is unchanged (a new point at step 0 would sit in the
    epoch chart of ``val_acc``)."""
    from mlflow.entities import Metric

    rows = [h[-1] for h in (metric_history(uri, run_id, k) for k in keys) if h]
    for u in model_uris:
        batch = [Metric(m.key, m.value, m.timestamp, m.step, model_id=u.removeprefix("models:/")) for m in rows]
        if batch:
            _retry(client(uri).log_batch, run_id, metrics=batch)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "mlflow", "pillow", "pandas", "numpy")]


def register(uri: str, model_uri: str, name: str, tags: dict[str, str], alias: str = "champion") -> str:
    """Register ``model_uri`` as a new version of ``name``, point ``alias`` at it, tag it; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    version = _retry(mlflow.register_model, model_uri, name, tags=tags)
    _retry(client(uri).set_registered_model_alias, name, alias, version.version)
    return version.version


def load_pyfunc(uri: str, model_uri: str):
    """``mlflow.pyfunc.load_model`` against this store; an unknown URI is a one-line error."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing model or version
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"MODEL: cannot load {model_uri} from {uri} ({first}); give runs:/<run id>/model, "
                        f"models:/<name>@<alias> or a checkpoint file") from None


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where there is one) of
    this node, logged on ``run_id`` every ``interval`` seconds as ``system/<node>/...`` (``system/...`` without a
    node) until :meth:`stop`."""

    def __init__(self, uri: str, run_id: str, node: str | None = None, interval: float = 5.0):
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mlflow.set_tracking_uri(uri)
        self.monitor = SystemMetricsMonitor(run_id, node_id=node, sampling_interval=interval,
                                            samples_before_logging=1)
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.finish()
