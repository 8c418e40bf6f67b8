"""MLflow Models (a pyfunc from code, a ``pt2`` torch model), the registry, loading a logged model, and the
system metrics monitor."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tl_sweep.errors import UserError
from tl_sweep.tracking.calls import client, retry


@contextmanager
def _active(uri: str, run_id: str):
    """``run_id`` as MLflow's active run (what its ``log_model`` writes to), ended afterwards with the status it
    had, whatever happens: a failure to log a model is not the trial's failure."""
    import mlflow

    status = retry(client(uri).get_run, run_id).info.status
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status=status if status != "RUNNING" else "FINISHED")


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
    package = Path(__file__).resolve().parents[1]  # tl_sweep: mlflow_model.py and the code it imports
    mlflow.set_tracking_uri(uri)
    with _active(uri, run_id):
        info = retry(mlflow.pyfunc.log_model, name=name, python_model=str(package / "mlflow_model.py"),
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
    with _active(uri, run_id):
        info = retry(mlflow.pytorch.log_model, model, name=name, serialization_format="pt2",
                      input_example=torch.zeros(2, 3, crop, crop).numpy(), pip_requirements=_requirements())
    return info.model_uri


def link_metrics(uri: str, run_id: str, model_uris: list[str], keys: list[str]) -> None:
    """The last value of each of ``run_id``'s metrics ``keys`` linked to each logged model (MLflow 3): its
    Models page then shows and compares them. Each is sent again with the run's own key, value, time and step,
    which MLflow stores once: the run's metric history is unchanged (a new point at step 0 would sit in the
    epoch chart of ``val_acc``)."""
    from mlflow.entities import Metric

    from tl_sweep.tracking import metric_history

    rows = [h[-1] for h in (metric_history(uri, run_id, k) for k in keys) if h]
    for u in model_uris:
        batch = [Metric(m.key, m.value, m.timestamp, m.step, model_id=u.removeprefix("models:/")) for m in rows]
        if batch:
            retry(client(uri).log_batch, run_id, metrics=batch)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "mlflow", "pillow", "pandas", "numpy")]


def register(uri: str, model_uri: str, name: str, tags: dict[str, str], alias: str = "champion",
             description: str = "") -> str:
    """Register ``model_uri`` as a new version of ``name``, point ``alias`` at it, tag and describe it (the
    registry's version page shows both); returns the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    version = retry(mlflow.register_model, model_uri, name, tags=tags)
    retry(client(uri).set_registered_model_alias, name, alias, version.version)
    if description:
        retry(client(uri).update_model_version, name, version.version, description=description)
    return version.version


def version_tags(uri: str, model_uri: str) -> dict[str, str]:
    """The tags of the registered version ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` names; {} for
    any other model URI (a logged model, a run's)."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or rest.startswith("m-"):
        return {}
    name, _, which = rest.replace("@", "/@").partition("/")
    c = client(uri)
    try:
        v = retry(c.get_model_version_by_alias, name, which[1:]) if which.startswith("@") else \
            retry(c.get_model_version, name, which)
    except Exception:  # noqa: BLE001 - loading the model says what is wrong with the URI
        return {}
    return dict(v.tags)


def load_pyfunc(uri: str, model_uri: str):
    """``mlflow.pyfunc.load_model`` against this store; an unknown URI is a one-line error."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing model or version
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"MODEL: cannot load {model_uri} from {uri} ({first}); give models:/m-… (as tl-sweep run "
                        f"prints it), runs:/<run id>/<model name>, "
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
