"""GPU scheduling without a GPU: Ray advertises GPUs this machine lacks (``num_gpus``), and a sweep with
``resources.gpu: 0.25`` packs 4 trials onto each advertised GPU; every trial is told which GPU is its own and,
finding no CUDA device, trains on the CPU and says so on its MLflow run. The trials of each GPU share 4 worker
processes, reused trial after trial; a worker that ran out of memory takes no further trial; no worker aborts
at its end (Ray's session logs).

The sweep runs in a subprocess that starts Ray itself with the advertised GPUs (what ``ray start --num-gpus``
does on a cluster), watches how much GPU Ray has handed out while trials run, then runs ``tl-sweep run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
session = ray.init(num_cpus=4 * gpus + 1, num_gpus=gpus, include_dashboard=False,
                   logging_level="ERROR").address_info["session_dir"]
cpus, held, stop = 4 * gpus + 1, [0.0, 0.0], threading.Event()

def watch():  # the most GPU and CPU Ray had handed out at once (a trial holds its share while it lives)
    while not stop.wait(0.02):
        free = ray.available_resources()
        held[0] = max(held[0], gpus - free.get("GPU", 0.0))
        held[1] = max(held[1], cpus - free.get("CPU", 0.0))

threading.Thread(target=watch, daemon=True).start()
code = cli.main(sys.argv[3:])
stop.set()
ray.shutdown()
json.dump({"code": code, "gpu": held[0], "cpu": held[1], "session": session}, open(out, "w"))
"""


def sweep(tmp_path, gpus: int, *sets: str):
    """``tl-sweep run`` on Ray with ``gpus`` advertised GPUs: (its JSON summary, the process, the trial runs)."""
    db, out = tmp_path / "mlflow.db", tmp_path / "out.json"
    args = ["run", str(SPEC), "--set", "study=null", "--set", "model.weights=none", "--set", "search.max_concurrent=8",
            "--set", "search.space.epochs=2", "--set", "search.space.unfrozen_blocks=0",
            "--set", "data.train_per_class=4", "--set", "data.image_size=16", "--set", "scheduler.kind=fifo",
            "--set", "resources.gpu=0.25", "--set", "resources.cpu=1", "--set", "tracking.log_models=false",
            "--set", f"tracking.uri=sqlite:///{db}", "--set", "tracking.experiment=gpu",
            *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # Ray hands them out
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(gpus), str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["code"] == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("gpu")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]
    return result, proc, sorted(runs, key=lambda r: r.info.start_time)


def no_worker_aborted(session: str) -> None:
    """Ray's worker logs of the sweep's session: no worker died in an abort, no object was lost with one."""
    logs = list(Path(session, "logs").glob("worker-*"))
    assert logs, session
    for f in logs:
        text = f.read_text(errors="replace")
        assert "Fatal Python error" not in text and "lost objects" not in text, f"{f}: {text[-2000:]}"


def test_quarter_gpu_trials_pack_four_per_advertised_gpu_in_four_reused_workers(tmp_path, gpus=2, trials=10):
    result, proc, runs = sweep(tmp_path, gpus, f"search.num_trials={trials}", "search.space.batch_size=16")
    # every advertised GPU fully handed out, as 4 trials of 1 CPU and a quarter GPU each, never more (a CPU to
    # spare: the GPUs are what limits them)
    assert result["gpu"] == pytest.approx(gpus) and result["cpu"] == 4 * gpus, result
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs)
    own = [r.data.tags.get("tl_sweep.gpu_ids") for r in runs]
    assert set(own) == {str(g) for g in range(gpus)}, own  # each trial told its own GPU; every GPU used
    workers = {}
    for r in runs:
        workers.setdefault(r.data.tags["tl_sweep.worker"], []).append(r.data.tags["tl_sweep.gpu_ids"])
    # 4 worker processes per GPU, each reused for later trials on its own GPU (not a process per trial)
    assert len(workers) == 4 * gpus and all(len(set(g)) == 1 for g in workers.values()), workers
    # what its worker held after its last trial
    reused = [r for r in runs if "system/worker_memory_mb" in r.data.metrics]
    assert len(reused) == trials - 4 * gpus and all(r.data.metrics["system/worker_memory_mb"] > 0 for r in reused)
    real = torch.cuda.device_count()  # 0 here: every trial falls back; on a GPU machine, those given a real one
    for r in runs:
        if int(r.data.tags["tl_sweep.gpu_ids"]) < real:
            assert r.data.tags["tl_sweep.device"] == "cuda:0" and "tl_sweep.warning" not in r.data.tags
        else:  # an advertised GPU with no CUDA device behind it: the trial trained on the CPU and says why
            assert r.data.tags["tl_sweep.device"] == "cpu"
            assert "sees no CUDA device here; trained on the CPU" in r.data.tags["tl_sweep.warning"]
            assert "sees no CUDA device" in proc.stdout + proc.stderr
        assert r.data.metrics["val_acc"] >= 0
    no_worker_aborted(result["session"])


def test_a_worker_that_ran_out_of_memory_takes_no_further_trial(tmp_path):
    """Trials past ``resources.memory_gb`` (a trial on the CPU: no CUDA device behind the advertised GPU) fail out
    of memory with the reason (batch 512 at full fine-tuning needs more) and the sweep goes on; each such worker
    is replaced, said in one line, while the others keep being reused. (Random weights: memory does not depend
    on them, and a 64 px source would be pretrained for this test alone.)"""
    result, proc, runs = sweep(tmp_path, 1, "search.num_trials=8", "search.space.batch_size=[8, 512]",
                               "search.space.unfrozen_blocks=5", "data.train_per_class=60", "data.image_size=64",
                               "resources.memory_gb=1.2", "search.space.optimizer=sgd", "search.space.epochs=1")
    oom = [r for r in runs if r.data.tags.get("tl_sweep.failure") == "OutOfMemory"]
    assert oom and len(oom) < len(runs), [r.data.params["batch_size"] for r in runs]
    for r in runs:
        if r in oom:
            assert r.info.status == "FAILED" and r.data.params["batch_size"] == "512"
            assert "lower batch_size" in r.data.tags["tl_sweep.error"]
            assert "past resources.memory_gb 1.2" in r.data.tags["tl_sweep.error"]
        else:
            assert r.info.status == "FINISHED" and r.data.params["batch_size"] == "8" and r.data.metrics["val_acc"] > 0
    assert proc.stdout.count("failed: trial") == len(oom) and "out of memory (batch_size 512" in proc.stdout
    for r in oom:  # its worker never appears again
        later = [x for x in runs if x.info.start_time > r.info.start_time]
        assert r.data.tags["tl_sweep.worker"] not in {x.data.tags["tl_sweep.worker"] for x in later}
    assert proc.stderr.count("takes no further trial and is replaced: it ran out of memory") == len(oom)
    workers = [r.data.tags["tl_sweep.worker"] for r in runs]
    assert len(set(workers)) < len(runs)  # the others were reused
    no_worker_aborted(result["session"])


def test_auto_shares_each_gpu_by_the_rule_and_says_what_it_chose(tmp_path):
    """``resources.gpu: auto`` (the default) with a GPU Ray sees: no GPU on the driver to measure a step here, so 4
    trials per GPU (and 4 CPUs per GPU to feed them); the plan line says so, and the GPU is fully used."""
    result, proc, runs = sweep(tmp_path, 1, "resources.gpu=auto", "search.num_trials=4",
                               "search.space.batch_size=16")
    line = next(x for x in proc.stderr.splitlines() if x.startswith("resources.gpu auto:"))
    assert "4 trials per GPU (0.25 GPU and 1 CPU each), 8 at a time on 1 GPU" in line, line
    assert "no GPU on the driver to measure a step" in line and "4 by CPUs" in line
    assert result["gpu"] == pytest.approx(1) and len(runs) == 4
    assert {r.data.tags["tl_sweep.gpu_ids"] for r in runs} == {"0"}
