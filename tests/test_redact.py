"""Secrets stay out of what tl-sweep prints and records: a password in the tracking URI and tokens in the
environment never reach stdout/stderr, MLflow params/tags/artifacts, the report, Tune's files or Ray's logs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from conftest import SERVER_ROOTS, SPEC, tl
from tl_sweep import redact


def test_uri_passwords_and_environment_secrets_are_masked(monkeypatch):
    assert redact.uri("http://ann:pa55@10.0.0.5:5000/x") == "http://ann:***@10.0.0.5:5000/x"
    assert redact.uri("postgresql://mlflow:hunter22@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact.uri("http://10.0.0.5:5000") == "http://10.0.0.5:5000"  # nothing to hide
    assert redact.strip_userinfo("http://ann:pa55@h:1/p") == "http://h:1/p"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abcdef123456")
    assert redact.text("token abcdef123456 in a line") == "token *** in a line"


def grep(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                blob = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n}" for n in needles if n.encode() in blob]
    return hits


@pytest.mark.slow
def test_a_sweep_and_its_report_never_write_a_secret(mlflow_server, tmp_path):
    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    uri = mlflow_server.replace("http://", f"http://ann:{password}@")  # the test server ignores credentials
    env = dict(os.environ, RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_USERNAME="ann",
               MLFLOW_TRACKING_PASSWORD=password, MLFLOW_EXPERIMENT_NAME=f"secrets-{uuid.uuid4().hex[:6]}")
    sets = ["study=null", "search.num_trials=2", "search.space.epochs=1", "search.space.unfrozen_blocks=[0, 2]",
            "scheduler.kind=fifo", "model.weights=none", f"tracking.uri={uri}", f"storage={tmp_path / 'tune'}"]
    run = tl("run", spec=SPEC, sets_=tuple(sets), cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "ann:***@" in run.stdout + run.stderr or "ann:" not in run.stdout + run.stderr
    rep = tl("report", "--tracking-uri", uri, "--experiment", env["MLFLOW_EXPERIMENT_NAME"], "--out",
             tmp_path / "report", cwd=tmp_path, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "report" / "report.md").is_file()
    outputs = run.stdout + run.stderr + rep.stdout + rep.stderr
    assert password not in outputs and token not in outputs
    # the store (params, tags, text artifacts: resolved.yaml, report), Tune's files and reports, Ray's logs
    ray_logs = Path("/tmp/ray/session_latest/logs").resolve()
    hits = grep(tmp_path, [password, token]) + grep(SERVER_ROOTS[mlflow_server], [password, token])
    hits += grep(ray_logs, [password, token]) if ray_logs.is_dir() else []
    assert not hits, hits


def test_submit_refuses_a_uri_with_a_password_before_touching_the_cluster(cli):
    code, out, err = cli("submit", SPEC, "--address", "http://127.0.0.1:1",
                         "--set", "tracking.uri=http://ann:secret99@127.0.0.1:5000")
    assert code == 2 and "carries a password" in err and "secret99" not in err + out
    assert len(err.strip().splitlines()) == 1
