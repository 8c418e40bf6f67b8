"""The command line: validate, models, version, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import SPEC, wait_http


def test_validate_prints_the_resolved_config(cli):
    code, out, err = cli("validate", SPEC, "--set", "search.num_trials=14")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["search"]["num_trials"] == 14 and resolved["resolved"]["max_blocks"] == 5
    assert resolved["tracking"]["uri"].startswith("sqlite:////")  # absolute: trials run elsewhere


def test_models_lists_every_family(cli):
    code, out, _ = cli("models")
    assert code == 0 and "resnet18" in out and "vit_b_16" in out and len(out.splitlines()) > 80


def test_report_on_an_unknown_experiment_is_one_line(cli, tmp_path):
    code, out, err = cli("report", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no experiment 'nope'" in err


def test_version_and_python_m():
    import tl_sweep

    proc = subprocess.run([sys.executable, "-m", "tl_sweep", "validate", str(SPEC)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "max_blocks: 5" in proc.stdout
    assert tl_sweep.__version__ and tl_sweep.__version__ != "0+unknown"
    proc = subprocess.run([sys.executable, "-m", "tl_sweep", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"tl-sweep {tl_sweep.__version__}"


def test_the_mlflow_environment_is_used_where_the_spec_does_not_say(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    code, out, _ = cli("validate", SPEC)
    resolved = yaml.safe_load(out)
    assert resolved["tracking"]["uri"] == f"sqlite:///{tmp_path / 'env.db'}"
    assert resolved["resolved"]["experiment"] == "from-env"
    code, out, _ = cli("validate", SPEC, "--set", "tracking.uri=sqlite:///spec.db", "--set", "tracking.experiment=x")
    resolved = yaml.safe_load(out)  # the spec (or --set) says: it wins
    assert resolved["tracking"]["uri"].endswith("/spec.db") and resolved["resolved"]["experiment"] == "x"


def test_submit_without_an_address_and_an_unknown_run_are_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _, err = cli("submit", SPEC)
    assert code == 2 and "--address: give the cluster's dashboard" in err
    db = f"sqlite:///{tmp_path / 'm.db'}"
    code, out, err = cli("report", "--run", "0123456789abcdef0123456789abcdef", "--tracking-uri", db)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no run 0123456789abcdef" in err


@pytest.mark.slow
def test_ui_stopped_with_sigterm_leaves_no_server_behind(tmp_path):
    """``tl-sweep ui`` runs MLflow's server (and its workers) in its own process group: SIGTERM to tl-sweep
    stops all of them and frees the port."""
    import signal
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tl_sweep", "ui", "--tracking-uri",
                             f"sqlite:///{tmp_path / 'm.db'}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    children = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert children  # the server's processes, found by their port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not left, left
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        raise AssertionError("the server still answers")
    except OSError:
        pass


def test_first_contact_imports_neither_torch_nor_ray_nor_mlflow(tmp_path):
    """``--help``, ``models``, ``validate`` and a spec error of ``run`` answer from the spec and the model
    catalog alone: none of them imports torch, torchvision, Ray or MLflow (seconds of imports on every call)."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nschedular: {kind: asha}\n")
    probe = ("import sys\nfrom tl_sweep import cli\ntry:\n    rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    rc = e.code\nheavy = [m for m in ('torch', 'torchvision', 'ray', 'mlflow') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(rc)\n")
    for args, code in ((["--help"], 0), (["models"], 0), (["validate", str(SPEC)], 0), (["run", str(typo)], 2),
                       (["validate", str(typo)], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, (args, proc.stderr[-1500:])
        assert "HEAVY []" in proc.stderr, (args, proc.stderr[-500:])
    assert "did you mean scheduler?" in proc.stderr


def test_a_small_trap_each_is_said_not_suffered(cli, tmp_path):
    """`tl-sweep models | head` ends quietly; a two-number list for a search range is read as two choices and
    said so; predict's help names the model URIs that work (runs:/<run>/model never did)."""
    shell = f"{sys.executable} -m tl_sweep.cli models | head -2"
    proc = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    code, out, err = cli("validate", SPEC, "--set", "search.space.epochs=[1, 3]")
    assert code == 0 and "epochs: [1, 3]" in out
    assert "note: --set search.space.epochs=[1, 3]: read as the choice of 1 or 3" in err
    assert "search.space.epochs={low: 1, high: 3}" in err
    proc = subprocess.run([sys.executable, "-m", "tl_sweep", "predict", "--help"], capture_output=True, text=True,
                          timeout=60)
    flat = " ".join(proc.stdout.split())
    assert "models:/m-" in flat and "runs:/<run id>/<model name>" in flat and "<run id>/model," not in flat


def test_a_plain_sweep_from_scratch_names_its_arm_scratch_and_models_take_any_arm_name(cli):
    from tl_sweep import publish, spec

    cfg = spec.load(SPEC, ["study=null", "model.weights=none"])
    assert cfg.arms == {"scratch": "none"}
    for arm in ("my_weights.pth", "source:mnist-5k", "a/b:c%d"):  # MLflow refuses / : . % " ' in a model's name
        name = publish.model_name("freeze-depth", arm, 0)
        assert not set(name) & set("/:.%\"'") and name.startswith("freeze-depth-") and name.endswith("-k0")
