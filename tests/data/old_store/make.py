"""Make store.tar.gz: run spec.yaml with an older tl-sweep checkout and interrupt it (SIGINT, as Ctrl-C) once 3
search trials have finished. Usage: python make.py /path/to/old/checkout (its dependencies installed)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORE = Path("/tmp/tl-sweep-old-store")


def finished() -> int:
    try:
        with sqlite3.connect(STORE / "mlflow.db") as db:
            return db.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid where "
                              "t.key = 'tl_sweep.role' and t.value = 'trial' and r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def main(checkout: str) -> None:
    shutil.rmtree(STORE, ignore_errors=True)
    STORE.mkdir()
    shutil.copy(HERE / "spec.yaml", STORE / "spec.yaml")
    env = {**os.environ, "PYTHONPATH": checkout, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "tl_sweep", "run", "spec.yaml"], cwd=STORE, env=env)
    while finished() < 3 and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    print("exit", proc.wait(timeout=300))
    with tarfile.open(HERE / "store.tar.gz", "w:gz") as tar:
        for p in ("mlflow.db", "optuna.db", "mlartifacts", "ray_results"):
            if (STORE / p).exists():
                tar.add(STORE / p, arcname=p)


if __name__ == "__main__":
    main(sys.argv[1])
