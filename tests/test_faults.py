"""Faults a long sweep meets: failing trials, an unreachable or restarting tracking server, two sweeps on one
sqlite store, a full disk under the cache; and random bad specs (hypothesis)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from conftest import SPEC, free_port, running_mlflow_server, sets, tl, tl_command
from tl_sweep import tracking

TINY = sets("study=null", "search.space.epochs=1", "scheduler.kind=fifo", "search.space.batch_size=64")


@pytest.mark.slow
def test_nan_trials_fail_with_a_reason_and_the_sweep_goes_on(tmp_path):
    db = tmp_path / "m.db"
    proc = tl("run", SPEC, *TINY, "--set", "search.num_trials=6", "--set", "search.space.lr_mult=[1.0, 1.0e+12]",
               "--set", "search.space.epochs=2", "--set", "search.space.batch_size=32",
               "--set", "search.space.optimizer=sgd", "--set", f"tracking.uri=sqlite:///{db}",
               "--set", "tracking.log_models=false", cwd=tmp_path)
    runs = [r for r in MlflowClient(f"sqlite:///{db}").search_runs(["1"])
            if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(runs) == 6, proc.stdout[-2000:] + proc.stderr[-2000:]
    bad = [r for r in runs if float(r.data.params["lr_mult"]) > 1]
    good = [r for r in runs if float(r.data.params["lr_mult"]) == 1]
    assert bad and good, "the seeded search should try both values"
    for r in bad:
        assert r.info.status == "FAILED" and "loss became" in r.data.tags["tl_sweep.error"]
    assert all(r.info.status == "FINISHED" for r in good)
    assert proc.returncode == 0
    assert proc.stdout.count("failed: trial") == len(bad)


@pytest.mark.slow
def test_unreachable_tracking_server_is_refused_before_training(tmp_path):
    port = free_port()
    proc = tl("run", SPEC, *TINY, "--set", f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not reachable" in lines[0] and "ray:" not in proc.stdout
    assert f"mlflow server --host 127.0.0.1 --port {port})" in lines[0]  # the server it was told, not 5000


class Outage:
    """The road to a real MLflow server on 127.0.0.1, which the test cuts and mends: a TCP relay on its own port.
    ``down()`` closes the relay's listening socket and every connection through it, so a client meets what a
    dead or restarting server gives it (connection refused, a request cut mid-way); ``up()`` listens again on
    the same port. The server behind it keeps running: no ~10-20 s restart (mlflow's imports, on a busy
    machine) between the cut and the mend, so the trials around it need not train for as long."""

    def __init__(self, server_port: int):
        import threading

        self.server_port, self.port, self._lock = server_port, free_port(), threading.Lock()
        self._listener, self._open = None, set()
        self.up()

    def up(self) -> None:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        import socket

        with self._lock:
            listener, self._listener = self._listener, None
        for s in [*([listener] if listener else []), *self._take()]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() or recv()
            except OSError:
                pass
            s.close()

    def _take(self) -> set:
        with self._lock:
            taken, self._open = self._open, set()
        return taken

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # down()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.server_port), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # down() ran meanwhile: this one is cut too
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def outage_sweep(uri, tmp_path, experiment, epochs):
    """Two trials; a write waits 5 s for the server, then goes to the outbox."""
    return subprocess.Popen(tl_command("run", spec=SPEC, sets_=(
                             "study=null", "search.num_trials=2", "search.max_concurrent=2",
                             f"search.space.epochs={epochs}", "search.space.unfrozen_blocks=[4]", "scheduler.kind=fifo",
                             f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                             "tracking.system_metrics=false", f"storage={tmp_path / 'results'}")),
                            cwd=tmp_path, env=dict(os.environ, TL_SWEEP_OUTBOX_AFTER="5"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def tune_epochs(storage) -> dict[str, int]:
    """Trial id -> the last epoch it reported to Tune (its result.json in storage): what the server cannot see."""
    import json

    return {p.parent.name: json.loads(p.read_text().splitlines()[-1])["epoch"] for p in storage.rglob("result.json")
            if p.read_text().strip()}


def until_trials_log(client, experiment, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial" and r.data.metrics]
        if len(trials) == 2:
            return exp
        time.sleep(0.3)
    raise AssertionError("the trials did not start logging")


def every_epoch_once(client, exp, epochs):
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(trials) == 2
    for r in trials:  # counted through the REST API: every epoch of every trial arrived, once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps
        assert r.info.status == "FINISHED" and r.data.tags["tl_sweep.epochs_run"] == str(epochs)
    return trials


@pytest.mark.slow
def test_tracking_outages_mid_sweep_and_at_the_end_lose_no_metric(tmp_path):
    """The server becomes unreachable for 10 s mid-sweep (2× the writes' retry window) while two trials train:
    their writes wait in the node's outbox and arrive, each once, when it is back - during the sweep. Then it
    goes away again before the trials end and stays away: the sweep still finishes (exit 0) and says what waits;
    ``tl-sweep sync`` delivers it once the server is back, and the report says what was delayed."""
    with running_mlflow_server(tmp_path) as (_, port):
        road = Outage(port)
        uri = f"http://127.0.0.1:{road.port}"  # what the sweep, `sync` and `report` are told
        epochs = 40  # ~0.75 s an epoch, two at a time: both still train ~15 s after the server is back
        sweep = outage_sweep(uri, tmp_path, "outage", epochs)
        try:
            client = MlflowClient(f"http://127.0.0.1:{port}")  # the test's own reads go straight to the server
            exp = until_trials_log(client, "outage")
            road.down()
            time.sleep(10)
            reported = tune_epochs(tmp_path / "results")  # progress the server could not see while it was away
            road.up()
            training = {t: e for t, e in reported.items() if e < epochs}
            assert len(reported) == 2 and training, reported
            deadline = time.time() + 120
            while time.time() < deadline:  # a trial still training delivers its queued epochs itself, in the sweep
                runs = {r.data.tags["tl_sweep.trial_id"]: r for r in client.search_runs([exp.experiment_id])
                        if r.data.tags.get("tl_sweep.role") == "trial"}
                if all(len(client.get_metric_history(runs[t].info.run_id, "val_acc")) >= e
                       for t, e in training.items()):
                    break
                time.sleep(0.3)
            else:
                raise AssertionError("queued epochs were not delivered while the sweep ran")
            road.down()  # and away again, until after the sweep
            out, _ = sweep.communicate(timeout=600)
            assert sweep.returncode == 0, out[-3000:]
            assert "writes wait on this node (nothing is lost): tl-sweep sync" in out
            waiting = tracking.waiting(uri)
            assert waiting > 0
            road.up()
            synced = tl("sync", "--tracking-uri", uri, cwd=tmp_path)
            assert synced.returncode == 0 and f"delivered {waiting} of {waiting} writes" in synced.stdout, synced.stdout
            assert tracking.waiting(uri) == 0
            trials = every_epoch_once(client, exp, epochs)
            assert all(int(r.data.tags.get("tl_sweep.delayed_writes", 0)) > 0 for r in trials)
            parent = next(r for r in client.search_runs([exp.experiment_id])
                          if r.data.tags.get("tl_sweep.role") == "sweep")
            assert parent.info.status == "FINISHED"
            rep = tl("report", "--tracking-uri", uri, "--run", parent.info.run_id, "--out", tmp_path / "rep",
                     cwd=tmp_path)
            assert rep.returncode == 0, rep.stderr[-2000:]
            assert "A tracking outage held back" in (tmp_path / "rep" / "report.md").read_text()
        finally:
            if sweep.poll() is None:
                sweep.kill()
            road.down()


@pytest.mark.slow
def test_two_sweeps_at_once_on_one_sqlite_store(tmp_path):
    db = tmp_path / "shared.db"
    args = lambda name: tl_command("run", SPEC, *TINY, *sets(  # noqa: E731
        "search.num_trials=3", f"tracking.uri=sqlite:///{db}", f"tracking.experiment={name}",
        f"storage={tmp_path / name}", "tracking.log_models=false"))
    procs = [subprocess.Popen(args(n), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in ("one", "two")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-1500:] for o in outs]
    assert not any("database is locked" in o for o in outs)
    client = MlflowClient(f"sqlite:///{db}")
    for name in ("one", "two"):
        exp = client.get_experiment_by_name(name)
        trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "trial"]
        assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)


def test_full_disk_under_the_cache_is_one_line_and_leaves_nothing_half_written(tmp_path):
    code = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # any bigger file: "File too large"
        from tl_sweep.errors import UserError
        from tl_sweep import data
        try:
            data.prepare("builtin:digits", size=64, seed=0, split=(0.6, 0.2, 0.2), log=print)
        except UserError as e:
            print("USERERROR", e)
    """)
    env = dict(os.environ, TL_SWEEP_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "USERERROR cannot write the image cache" in out and "TL_SWEEP_CACHE" in out, out
    leftovers = list((tmp_path / "cache" / "images").glob("*"))
    assert leftovers == [], leftovers  # neither the cache nor its temporary file
    from tl_sweep import data

    os.environ["TL_SWEEP_CACHE"], old = str(tmp_path / "cache"), os.environ["TL_SWEEP_CACHE"]
    try:
        p = data.prepare("builtin:digits", size=64, seed=0, split=(0.6, 0.2, 0.2), log=lambda m: None)
        assert not p.reused  # built now, not a half-written file from before
    finally:
        os.environ["TL_SWEEP_CACHE"] = old


# ------------------------------------------------------------------------------- random bad specs

VALID = yaml.safe_load(SPEC.read_text())
KEYS = ["name", "seed", "model", "model.arch", "model.weights", "model.head", "data", "data.dataset",
        "data.classes", "data.train_per_class", "data.image_size", "search", "search.num_trials",
        "search.space", "search.space.lr_mult", "search.space.unfrozen_blocks", "search.space.epochs",
        "search.space.batch_size", "search.space.optimizer", "scheduler", "scheduler.kind", "resources.cpu",
        "tracking.uri", "study", "study.sources", "study.repeats", "regime.kind", "bogus", "model.bogus"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 1000), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-3, 12), max_size=3),
                   st.dictionaries(st.sampled_from(["low", "high", "log", "x"]), st.integers(-3, 12), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_mutated_specs_never_trace_back(cli, tmp_path, mutations):
    spec = yaml.safe_load(yaml.safe_dump(VALID))
    for key, value in mutations:
        *path, last = key.split(".")
        cur = spec
        for k in path:
            cur = cur.setdefault(k, {}) if isinstance(cur, dict) else cur
        if isinstance(cur, dict):
            cur[last] = value
    p = tmp_path / "mutated.yaml"
    p.write_text(yaml.safe_dump(spec))
    code, out, err = cli("validate", p)
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_trial_that_raises_is_failed_with_its_reason_and_listed(tmp_path):
    # inception_v3 cannot run 32 px images: every trial's forward raises (a real RuntimeError, not a stub)
    db = tmp_path / "m.db"
    proc = tl("run", SPEC, *TINY, "--set", "search.num_trials=2", "--set", "model.arch=inception_v3",
               "--set", "model.weights=none", "--set", "search.space.unfrozen_blocks=1", "--set",
               "failures.max_failures=0", "--set", f"tracking.uri=sqlite:///{db}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # every trial failed: the sweep did
    assert proc.stdout.count("failed: trial") == 2
    runs = [r for r in MlflowClient(f"sqlite:///{db}").search_runs(["1"])]
    trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(trials) == 2
    for r in trials:
        assert r.info.status == "FAILED" and r.data.tags["tl_sweep.error"].startswith("RuntimeError")
    parent = next(r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep")
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("overrides, expected", [
    (["data.split=[0.8, 0.2, 0.0]"], "has none; add a test/ folder"),
    (["tracking.uri=mlruns"], "is not a tracking URI"),
    (["tracking.uri=sqlite:////nonexistent/dir/m.db"], "does not exist; create it"),
])
def test_more_one_line_errors(cli, tmp_path, monkeypatch, overrides, expected):
    monkeypatch.chdir(tmp_path)  # in-process: the same main() a shell's tl-sweep runs, without 5 s of imports
    code, out, err = cli("run", SPEC, *sets(*overrides))
    assert code == 2, out[-1500:] + err[-1500:]
    # progress lines may come first (stderr is also progress); the error is one line, the last, no traceback
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("tl-sweep: error:")]
    assert errors == [lines[-1]] and expected in lines[-1] and "Traceback" not in err, err


@pytest.mark.slow  # its second case runs a one-trial sweep
def test_resume_refuses_what_it_cannot_resume(cli, tmp_path, monkeypatch):
    """Each refusal comes before any data is prepared or Ray started (in-process: nothing but the check runs)."""
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'm.db'}"
    code, out, err = cli("run", SPEC, *TINY, "--set", f"tracking.uri={db}", "--resume")
    assert code == 2 and "has no sweep to resume" in err and "data:" not in err
    code, out, err = cli("run", SPEC, *TINY, "--set", "search.num_trials=1", "--set", f"tracking.uri={db}",
                         "--set", f"storage={tmp_path / 'tune'}")
    assert code == 0, err[-1500:]
    code, out, err = cli("run", SPEC, *TINY, "--set", "search.num_trials=1", "--set", f"tracking.uri={db}",
                         "--set", f"storage={tmp_path / 'tune'}", "--resume")
    assert code == 2 and "already finished" in err and "data:" not in err
    code, out, err = cli("run", SPEC, *TINY, "--set", "search.num_trials=2", "--set", f"tracking.uri={db}",
                         "--set", f"storage={tmp_path / 'tune'}", "--resume")
    assert code == 2 and "ran another spec" in err and "data:" not in err
    assert "(search.num_trials: 1 -> 2)" in err  # which key differs
    code, out, err = cli("run", SPEC, *TINY, "--set", f"tracking.uri=http://127.0.0.1:{free_port()}", "--resume")
    assert code == 2 and "is not reachable" in err and len(err.strip().splitlines()) == 1


def test_a_ray_address_nothing_answers_at_is_one_line_before_any_mlflow_run(tmp_path):
    """RAY_ADDRESS (or --address) where no cluster listens: one line, exit 2, in seconds (Ray itself would retry
    for minutes), and no MLflow run was created, so none is left RUNNING."""
    import time

    db = tmp_path / "m.db"
    t0 = time.perf_counter()
    proc = tl("run", SPEC, *TINY, *sets(f"tracking.uri=sqlite:///{db}"), cwd=tmp_path,
              env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{free_port()}"), timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:" in line and len(proc.stderr.strip().splitlines()) == 1
    assert took < 30, took
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_runs(["0", "1"])


@pytest.mark.slow
def test_a_best_trial_at_chance_is_logged_but_not_registered(tmp_path):
    """A validation split that holds every image once under each of its two classes: any classifier scores
    exactly the majority-class rate (50%) on it, however it trained. The winner is logged as a model, not
    registered, and the run says why in one line (every trial scoring the same, fANOVA has nothing to rank)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 10)):
        images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(2 * n)]
        for c, cls in enumerate("ab"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(n):  # train: different images per class; val: the same images under both
                images[i if split == "val" else c * n + i].save(tmp_path / "d" / split / cls / f"{i}.png")
    db = tmp_path / "m.db"
    proc = tl("run", SPEC, *TINY, cwd=tmp_path, sets_=(
        f"data.dataset=imagefolder:{tmp_path / 'd'}", "data.classes=null", "data.train_per_class=null",
        "data.image_size=16", "model.weights=none", "search.num_trials=4", "search.space.batch_size=8",
        "tracking.register_as=at-chance", f"tracking.uri=sqlite:///{db}"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT above chance" in proc.stdout and "majority-class rate (what always answering" in proc.stdout
    lines = [x for x in proc.stderr.splitlines() if "not registered as at-chance" in x]
    assert len(lines) == 1 and "register_below_chance=true" in lines[0], proc.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{db}")
    assert not client.search_registered_models()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    assert mlflow.search_logged_models(experiment_ids=["1"], output_format="list")  # logged all the same


def test_a_class_folder_alone_is_one_line(cli, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "cats").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "d" / "cats" / f"{i}.png")
    code, out, err = cli("run", SPEC, *sets("study=null", f"data.dataset=imagefolder:{tmp_path / 'd'}",
                                            "data.classes=null", "data.train_per_class=null",
                                            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"))
    assert code == 2, err[-1500:]
    (line,) = err.strip().splitlines()[-1:]
    assert "one class (cats); a classifier needs at least 2" in line and "Traceback" not in err
