"""Calls to MLflow: one client per store, and retries of what may pass (a locked sqlite, a server restarting)."""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Callable, TypeVar

T = TypeVar("T")
RETRY_SECONDS = 60.0  # how long a call is retried before it fails (or, for a write, is kept in the outbox)


# what a failure that may pass looks like: a locked sqlite, an unreachable or overloaded server. The status codes
# must stand alone: a message that quotes a run id ("...aa504...") is not a 504.
TRANSIENT = re.compile(r"locked|connection|timed out|temporarily|max retries|\b50[234]\b")


def transient(e: Exception) -> bool:
    return TRANSIENT.search(str(e).lower()) is not None


def retry(fn: Callable[..., T], *args, window: float = RETRY_SECONDS, **kwargs) -> T:
    """Call an MLflow client method, retrying transient failures (locked sqlite, unreachable server)."""
    delay, deadline = 0.1, time.monotonic() + window
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow wraps sqlalchemy/requests errors in several types
            if not transient(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@functools.lru_cache(maxsize=8)
def client(uri: str):
    from mlflow.tracking import MlflowClient

    # MLflow's own HTTP retries would hold one call for ~4 minutes on a dead server; retry decides instead
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri)
