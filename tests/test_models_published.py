"""The winner as an MLflow Model: a real (tiny) hymenoptera sweep registers its best model; a fresh Python
process loads models:/NAME@champion with mlflow.pyfunc and classifies real ants/bees JPEGs; mlflow.pytorch loads
the torch.export copy; ``tl-sweep predict`` prints the table and writes the grid PNG."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import HYMENOPTERA, ROOT, tl

SPEC = ROOT / "search_spaces" / "hymenoptera.yaml"
pytestmark = pytest.mark.slow  # every test here starts Ray or a server process


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera_data is not on this machine")
    tmp = tmp_path_factory.mktemp("published")
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    # the store comes from the environment alone, as an MLflow user has it set
    env = dict(os.environ, MLFLOW_TRACKING_URI=db, MLFLOW_EXPERIMENT_NAME="from-env")
    proc = tl("run", SPEC, "--report-dir", tmp / "report", cwd=tmp, env=env, timeout=900, sets_=(
        "study=null", "model.weights=none", "search.num_trials=2", "search.space.epochs=1", "data.image_size=32",
        "search.space.unfrozen_blocks=5", "scheduler.kind=fifo", "tracking.register_as=ants-bees",
        # one epoch from scratch is about chance: registered anyway, since the registry and predict are under test
        "tracking.register_below_chance=true"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "models:/ants-bees@champion" in proc.stderr
    from mlflow.tracking import MlflowClient

    assert MlflowClient(db).get_experiment_by_name("from-env") is not None  # it landed in that store
    return tmp, db


def test_a_fresh_process_loads_the_champion_and_classifies_real_jpegs(registered):
    tmp, db = registered
    ant = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
    code = f"""
import mlflow, numpy as np
from PIL import Image
mlflow.set_tracking_uri({db!r})
m = mlflow.pyfunc.load_model("models:/ants-bees@champion")
out = m.predict([{str(ant)!r}])
print(sorted(out.columns), out.loc[0, "label"], round(float(out.loc[0, "probability"]), 3))
arr = np.asarray(Image.open({str(ant)!r}).convert("RGB"))[None]  # a uint8 H×W×3 batch, as the signature says
print(m.predict(arr).loc[0, "label"] in ("ants", "bees"))
from mlflow.tracking import MlflowClient
v = MlflowClient().get_model_version_by_alias("ants-bees", "champion")
print(sorted(v.tags))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("['ants', 'bees', 'label', 'probability']")
    assert lines[0].split()[-2] in ("ants", "bees") and 0.5 <= float(lines[0].split()[-1]) <= 1
    assert lines[1] == "True"
    assert {"source_weights", "data_fingerprint", "spec_hash", "arm"} <= set(eval(lines[2]))


def test_mlflow_pytorch_loads_the_exported_copy(registered):
    tmp, db = registered
    code = f"""
import mlflow, torch
from mlflow.tracking import MlflowClient
mlflow.set_tracking_uri({db!r})
v = MlflowClient().get_model_version_by_alias("ants-bees", "champion")
run = MlflowClient().get_run(v.run_id)
models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                     filter_string=f"source_run_id = '{{v.run_id}}'")
torch_model = next(m for m in models if m.name.endswith("-torch"))
net = mlflow.pytorch.load_model(torch_model.model_uri)
print(tuple(net(torch.zeros(2, 3, 32, 32)).shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(2, 2)"


def test_predict_prints_a_table_and_writes_the_grid(registered, cli):
    tmp, db = registered
    folder = HYMENOPTERA / "val"
    code, out, err = cli("predict", "models:/ants-bees@champion", folder / "ants", folder / "bees", "--top", "2",
                         "--grid", tmp / "grid.png", "--tracking-uri", db)
    assert code == 0, err
    assert "predicted" in out and "accuracy on the 153 images in class folders" in out
    assert (tmp / "grid.png").stat().st_size > 10_000
    code, out, err = cli("predict", "models:/ants-bees@champion", ROOT / "README.md", "--tracking-uri", db)
    assert code == 2 and "not a readable image" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("predict", "models:/nope@champion", folder / "ants", "--tracking-uri", db)
    assert code == 2 and "cannot load models:/nope@champion" in err and len(err.strip().splitlines()) == 1
