"""GPU scheduling without a GPU: Ray advertises GPUs this machine lacks (``num_gpus``), and a sweep with
``resources.gpu: 0.25`` packs 4 trials onto each advertised GPU; every trial is told which GPU is its own and,
finding no CUDA device, trains on the CPU and says so on its MLflow run.

The sweep runs in a subprocess that starts Ray itself with the advertised GPUs (what ``ray start --num-gpus``
does on a cluster), watches how much GPU Ray has handed out while trials run, then runs ``tl-sweep run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import SPEC

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process

DRIVER = r"""
import json, sys, threading, time
import ray
from tl_sweep import cli

gpus, out = int(sys.argv[1]), sys.argv[2]
ray.init(num_cpus=4 * gpus + 1, num_gpus=gpus, include_dashboard=False, logging_level="ERROR")
cpus, held, stop = 4 * gpus + 1, [0.0, 0.0], threading.Event()

def watch():  # the most GPU and CPU Ray had handed out at once (a trial holds its share while it lives)
    while not stop.wait(0.02):
        free = ray.available_resources()
        held[0] = max(held[0], gpus - free.get("GPU", 0.0))
        held[1] = max(held[1], cpus - free.get("CPU", 0.0))

threading.Thread(target=watch, daemon=True).start()
code = cli.main(sys.argv[3:])
stop.set()
json.dump({"code": code, "gpu": held[0], "cpu": held[1]}, open(out, "w"))
ray.shutdown()
"""


@pytest.mark.parametrize("gpus, trials", [(1, 6), (2, 8)])
def test_quarter_gpu_trials_pack_four_per_advertised_gpu(tmp_path, gpus, trials):
    db, out = tmp_path / "mlflow.db", tmp_path / "out.json"
    args = ["run", str(SPEC), "--set", "study=null", "--set", "model.weights=none",
            "--set", f"search.num_trials={trials}", "--set", "search.max_concurrent=8",
            "--set", "search.space.epochs=2", "--set", "search.space.batch_size=16",
            "--set", "search.space.unfrozen_blocks=0", "--set", "data.train_per_class=4",
            "--set", "data.image_size=16", "--set", "scheduler.kind=fifo",
            "--set", "resources.gpu=0.25", "--set", "resources.cpu=1", "--set", "tracking.log_models=false",
            "--set", f"tracking.uri=sqlite:///{db}", "--set", "tracking.experiment=gpu"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # Ray hands them out
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(gpus), str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["code"] == 0, proc.stderr[-3000:]
    # every advertised GPU fully handed out, as 4 trials of 1 CPU and a quarter GPU each, never more (a CPU to
    # spare: the GPUs are what limits them)
    assert result["gpu"] == pytest.approx(gpus) and result["cpu"] == 4 * gpus, result

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("gpu")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs)
    own = [r.data.tags.get("tl_sweep.gpu_ids") for r in runs]
    assert set(own) == {str(g) for g in range(gpus)}, own  # each trial told its own GPU; every GPU used
    real = torch.cuda.device_count()  # 0 here: every trial falls back; on a GPU machine, those given a real one
    for r in runs:
        if int(r.data.tags["tl_sweep.gpu_ids"]) < real:
            assert r.data.tags["tl_sweep.device"] == "cuda:0" and "tl_sweep.warning" not in r.data.tags
        else:  # an advertised GPU with no CUDA device behind it: the trial trained on the CPU and says why
            assert r.data.tags["tl_sweep.device"] == "cpu"
            assert "sees no CUDA device here; trained on the CPU" in r.data.tags["tl_sweep.warning"]
            assert "sees no CUDA device" in proc.stdout + proc.stderr
        assert r.data.metrics["val_acc"] >= 0
