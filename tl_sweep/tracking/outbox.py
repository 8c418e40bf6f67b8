"""Writes a tracking outage held back: kept on the node's disk, in order, per run, and delivered later."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tl_sweep import redact
from tl_sweep.contract import Tag
from tl_sweep.tracking.calls import client, retry, transient

# a write to a run is retried this long, then kept on local disk until the server is back
OUTBOX_AFTER = float(os.environ.get("TL_SWEEP_OUTBOX_AFTER", "20"))


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
                if not transient(e):
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
                if not transient(e):
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
                    if transient(e):
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
            if not transient(e):
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
        retry(c.log_batch, run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in entry.get("metrics", [])],
               params=[Param(k, v) for k, v in entry.get("params", {}).items()],
               tags=[RunTag(k, v) for k, v in entry.get("tags", {}).items()], window=window)
    elif op == "artifact":
        retry(c.log_artifact, run_id, entry["path"], entry.get("artifact_path"), window=window)
        if "/outbox/" in entry["path"]:
            import shutil

            shutil.rmtree(Path(entry["path"]).parent, ignore_errors=True)
    elif op == "end":  # a run's status, unless it ended already (a trial's end is recorded once)
        if not entry.get("only_running") or retry(c.get_run, run_id, window=window).info.status == "RUNNING":
            retry(c.set_terminated, run_id, entry["status"], end_time=entry["time"], window=window)
    else:
        raise ValueError(f"unknown outbox entry {op!r}")


def sync(uri: str) -> tuple[int, int]:
    """Deliver what this node's outbox holds for ``uri``: (delivered, still waiting)."""
    return Outbox(uri).deliver()


def waiting(uri: str) -> int:
    """How many writes for ``uri`` wait in this node's outbox."""
    return Outbox(uri).count()
