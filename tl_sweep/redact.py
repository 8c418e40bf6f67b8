"""Secrets stay out of everything tl-sweep prints or records.

A secret is the password of a URI (``http://user:password@host``, ``postgresql://user:password@db/x``) or the
value of an environment variable that holds one (the Ray token, MLflow's and the clouds' credentials).
:func:`text` replaces each with ``***`` in a line before it is printed, logged to MLflow (params, tags, text
artifacts) or written to a report; :func:`uri` shows a URI without its password.
"""

from __future__ import annotations

import os
import re

SECRET_ENV = ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "POSTGRES_PASSWORD", "HF_TOKEN")
MASK = "***"
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^@\s/]+)@")


def uri(value: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://user:***@host/...``."""
    return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", value)


def secrets() -> list[str]:
    """The secret values set in this process's environment (longest first, so none is half-masked)."""
    found = {v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4}
    return sorted(found, key=len, reverse=True)


def text(value: str) -> str:
    """``value`` with every URI password and every secret of the environment replaced by ``***``."""
    out = uri(value)
    for s in secrets():
        out = out.replace(s, MASK)
    return out


def has_password(value: str) -> bool:
    return bool(_USERINFO.search(value))


def strip_userinfo(value: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://host/...`` (for a plain health probe)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@", r"\1", value)


class Stream:
    """A text stream that masks secrets in everything written to it (the CLI's stdout and stderr)."""

    def __init__(self, inner):
        self._inner = inner

    def write(self, value: str) -> int:
        self._inner.write(text(value))
        return len(value)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
