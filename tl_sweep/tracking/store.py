"""What a tracking URI is: :func:`resolve_uri` decides it once (made absolute, a password moved out, its kind
named); :func:`check` probes it once per process, before any work."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tl_sweep import redact
from tl_sweep.errors import UserError
from tl_sweep.tracking.calls import client, retry

# what each kind of store is, by the URI's scheme: whether every node of a cluster reaches the same store
KINDS = {"sqlite": ("sqlite:///",), "server": ("http://", "https://"), "database": ("postgresql", "mysql", "mssql"),
         "databricks": ("databricks",)}
SHARED = {"server", "database", "databricks"}  # a sqlite file is on one node


@dataclass(frozen=True)
class Store:
    """A resolved tracking URI and its kind (``sqlite``, ``server``, ``database``, ``databricks``)."""

    uri: str
    kind: str

    @property
    def shared(self) -> bool:
        """Whether the nodes of a cluster all reach this store (not a file on one node)."""
        return self.kind in SHARED


def resolve_uri(uri: str) -> Store:
    """The one place a tracking URI is read. A relative ``sqlite:///x.db`` becomes absolute against the working
    directory, as MLflow reads it, so trials running in other directories write to the same store. A server URI's
    ``user:password@`` moves to MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (inherited
    by local Ray workers), so no config, trial context, Tune file or MLflow param ever holds the password. A URI
    of no kind tl-sweep can use is one line (``file:`` stores: MLflow 3 refuses them)."""
    if "://" not in uri:
        raise UserError(f"tracking.uri: {uri!r} is not a tracking URI; use sqlite:///mlflow.db or "
                        f"http://host:port (MLflow 3 refuses a plain ./mlruns folder)")
    kind = next((k for k, schemes in KINDS.items() if uri.startswith(schemes)), None)
    if kind is None:
        raise UserError(f"tracking.uri: unsupported URI {redact.uri(uri)!r}; use sqlite:///mlflow.db or "
                        f"http://host:port (or a database: postgresql://, mysql://, mssql://)")
    if kind == "sqlite" and not uri.startswith("sqlite:////"):
        return Store("sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve()), kind)
    if kind == "server" and redact.has_password(uri):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(uri)
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        return Store(redact.strip_userinfo(uri), kind)
    return Store(uri, kind)


def check(uri: str) -> None:
    """Refuse, in one line and before any work, a tracking URI that cannot be used: one call to the store (which
    also creates a new sqlite database's tables), after :func:`check_address`. A sweep calls it once."""
    check_address(uri)
    try:
        from filelock import FileLock

        # two sweeps creating one sqlite database at once race in its migrations
        sqlite = uri.startswith("sqlite:///")
        with FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300) if sqlite else nullcontext():
            retry(client(uri).search_experiments, max_results=1)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"tracking.uri: cannot use {redact.uri(uri)}: {redact.text(first)}") from None


def check_address(uri: str) -> None:
    """The part of :func:`check` that needs no MLflow (so the CLI says a wrong address in one line in a fraction of
    a second, before it imports torch, Ray or MLflow): a sqlite file's folder exists and is writable, a server
    answers."""
    kind = resolve_uri(uri).kind
    if kind == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise UserError(f"tracking.uri: folder {db.parent} does not exist; create it or point "
                            f"tracking.uri at sqlite:///<existing folder>/mlflow.db")
        if not os.access(db.parent, os.W_OK):
            raise UserError(f"tracking.uri: cannot write in {db.parent}; choose a writable folder")
    elif kind == "server":
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


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, absolute, so trials in any cwd find them."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None  # a server decides (mlflow server --serve-artifacts)
