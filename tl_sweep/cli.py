"""``tl-sweep run | submit | validate | report | predict | models | ui``.

User errors (:class:`~tl_sweep.errors.UserError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tl_sweep import redact
from tl_sweep.errors import UserError

# The interpreter's last garbage collections at exit scan every object torch, Ray and MLflow created: 2.4 s of a
# one-trial sweep's 21 s here. Frozen after every other exit handler (Ray's shutdown included), they are not.
atexit.register(gc.freeze)


def _err(msg: str) -> None:
    print(f"tl-sweep: error: {msg}", file=sys.stderr)


def _notes(cfg) -> None:
    for note in cfg.notes:
        print(f"tl-sweep: note: {note}", file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    """Progress goes to stderr; results (tables, run and job ids) to stdout."""
    print(msg, file=sys.stderr, flush=True)


def cmd_validate(args) -> int:
    from tl_sweep import sources, spec

    cfg = spec.load(args.spec, args.set)
    _notes(cfg)
    sources.check(cfg)  # the spec names sources that exist, and its data is where it says
    if (problem := spec.data_problem(cfg)) is not None:
        raise UserError(f"{cfg.spec_file}: {problem}")
    print(spec.to_yaml(cfg), end="")
    if cfg.matrix:  # the matrix's size, per target and in all
        per = {}
        for p in cfg.parts:
            per[p.target] = per.get(p.target, 0) + sum(p.trainings())
        _log("tl-sweep: transfer matrix: " + ", ".join(f"{t} {n} trainings" for t, n in per.items())
             + f"; {sum(cfg.trainings())} in all")
    return 0


def _ray_job_working_dir() -> str | None:
    """The name of the unpacked ``working_dir`` this process runs in, when it is a Ray Job's driver."""
    import json

    try:
        runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    cwd = Path.cwd()
    if runtime_env.get("working_dir") and "runtime_resources" in cwd.parts:
        return cwd.name  # Ray's _ray_pkg_<content hash>
    return None


def cmd_run(args) -> int:
    from tl_sweep import spec

    # a Ray Job's driver (tl-sweep submit, or `ray job submit --working-dir wd -- tl-sweep run ...`, a KubeRay
    # RayJob): Ray may remove the unpacked working_dir under the running driver; work from a stable copy
    job = os.environ.get("TL_SWEEP_JOB") or _ray_job_working_dir()
    if job:
        from tl_sweep.data import cache_root

        stable = cache_root() / "jobs" / job
        shutil.copytree(os.getcwd(), stable, dirs_exist_ok=True)
        os.chdir(stable)
    cfg = spec.load(args.spec, args.set)  # a spec error is one line in a fraction of a second: before torch, Ray
    _notes(cfg)
    if (problem := spec.data_problem(cfg)) is not None:
        raise UserError(f"{cfg.spec_file}: {problem}")
    from tl_sweep import tracking

    tracking.check_address(cfg.spec.tracking.uri)  # before torch, Ray and MLflow load
    from tl_sweep import cluster

    cluster.ray_address(args.address)  # a cluster that does not answer: one line, seconds at most
    most = "at most " if cfg.spec.study is not None and cfg.spec.study.allocate == "halving" else ""
    _log(f"tl-sweep: {'resuming' if args.resume else 'running'} {cfg.experiment!r} ({most}{sum(cfg.trainings())} "
         f"trainings); loading torch, Ray and MLflow…")
    from tl_sweep import runner

    again = " ".join(["tl-sweep", "run", shlex.quote(args.spec), *(f"--set {shlex.quote(s)}" for s in args.set),
                      *(["--address", args.address] if args.address else [])])
    try:
        if cfg.matrix:
            from tl_sweep import matrix

            return _matrix_done(cfg, matrix.run(cfg, address=args.address, log=_log, report_dir=args.report_dir,
                                                resume=args.resume))
        summary = runner.run(cfg, address=args.address, log=_log, report_dir=args.report_dir, resume=args.resume)
    except runner.Interrupted as e:  # the sweep had started: --resume continues it
        raise KeyboardInterrupt(f"{e}; continue with: {again} --resume") from None
    except KeyboardInterrupt as e:  # before its parent run existed: nothing to resume
        raise KeyboardInterrupt(f"{e or 'interrupted before the sweep started'}; run it again with: {again}") \
            from None
    if summary.report is not None and summary.report.key:  # a study's key table, or a sweep's line on chance
        print(summary.report.key)
    print()
    finals = (f" + {len(summary.selection)} selection re-trainings + {len(summary.finals)} final re-trainings"
              if summary.finals else "")
    print(f"sweep {summary.status.lower()} in {summary.seconds:.0f}s: {len(summary.trials)} search trials{finals}; "
          f"best by validation:")
    print(table(summary.trials))
    rates = [f"{k} {100 * v:.1f}%" for k, v in summary.chance.items() if v is not None]
    if rates:
        print(f"majority-class rate (what always answering the commonest class scores): {', '.join(rates)}")
    failed = [r for r in summary.trials + summary.selection + summary.finals if r.status == "FAILED"]
    for r in failed:
        print(f"failed: trial {r.trial} ({r.config.arm}, k={r.config.unfrozen_blocks}, lr_mult={r.config.lr_mult}): "
              f"{r.error}")
    uri = cfg.spec.tracking.uri
    print()
    if summary.delayed:
        print(f"mlflow: a tracking outage held back {summary.delayed} writes on this node; delivered at the end")
    if summary.waiting:
        print(f"mlflow: the server is unreachable; {summary.waiting} writes wait on this node (nothing is lost): "
              f"tl-sweep sync --tracking-uri {uri}, then tl-sweep report --run {summary.parent_run_id}")
        return 0 if summary.status == "FINISHED" else 1
    _links(uri, summary.experiment_id, summary.parent_run_id)
    return 0 if summary.status == "FINISHED" else 1


def table(results, limit: int = 8) -> str:
    """The best trials as an aligned text table."""
    from tl_sweep.contract import percent

    cols = ["trial", "arm", "unfrozen_blocks", "optimizer", "batch_size", "lr_mult", "epochs", "best_val_acc",
            "status"]
    heads = ["trial", "arm", "k", "optimizer", "bs", "lr_mult", "epochs", "best val %", "status"]
    fmt = lambda c, v: percent(v) if c == "best_val_acc" else (  # noqa: E731
        f"{v:.3g}" if isinstance(v, float) else str(v))
    body = [[fmt(c, r.row().get(c)) for c in cols] for r in results[:limit]]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(heads)] + [line(b) for b in body])


def _links(uri: str, exp_id: str, run_id: str, label: str = "sweep") -> None:
    from tl_sweep import tracking

    base = "http://127.0.0.1:5000" if uri.startswith("sqlite:///") else uri
    if uri.startswith("sqlite:///"):
        print(f"browse: tl-sweep ui --tracking-uri {uri}   (then open the links below)")
    print(f"runs:   {tracking.ui_link(base, exp_id)}")
    print(f"{label + ':':<7} {tracking.ui_link(base, exp_id, run_id)}")


def _matrix_done(cfg, summary) -> int:
    """A transfer matrix's end: its table, what ran, where to look."""
    if summary.report is not None:
        print(summary.report.key)
    print()
    ran = sum(len(s.trials) + len(s.selection) + len(s.finals) for s in summary.parts.values())
    print(f"matrix {summary.status.lower()} in {summary.seconds:.0f}s: {len(cfg.parts)} studies, {ran} trainings "
          f"run now" + (f", {len(summary.kept)} {'study' if len(summary.kept) == 1 else 'studies'} kept from before"
                        if summary.kept else ""))
    print()
    _links(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id, "matrix")
    return 0 if summary.status == "FINISHED" else 1


def cmd_estimate(args) -> int:
    from tl_sweep import spec

    cfg = spec.load(args.spec, args.set)  # spec errors first, before torch is imported
    _notes(cfg)
    from tl_sweep import runner, tracking, transferability
    from tl_sweep.contract import Tag

    if not args.no_log:
        tracking.check(cfg.spec.tracking.uri)
    for part in cfg.parts or [cfg]:  # a matrix: each target's cells (metrics and run named by the target)
        repeats, arms = runner.preflight(part, _log)
        est = transferability.estimate(runner.trial_context(part, repeats[0], arms), transferability.cells_of(part),
                                       log=_log)
        table = transferability.table(est)
        print(f"{part.part}:\n{table}" if part.part else table)
        if not args.no_log:
            uri = cfg.spec.tracking.uri
            tags = {**tracking.source_tags(cfg.spec_file), **({Tag.TARGET: part.target} if part.part else {})}
            run_id = tracking.log_estimates(uri, tracking.experiment_id(uri, cfg.experiment), None,
                                            transferability.metrics_of(est), table, tags)
            _log(f"mlflow: estimates{' of ' + part.part if part.part else ''} logged as run {run_id} of "
                 f"experiment {cfg.experiment!r}")
    return 0


def cmd_sync(args) -> int:
    from tl_sweep import tracking

    uri = tracking.resolve_uri(args.tracking_uri).uri
    box = tracking.Outbox(uri)
    before = box.count()
    if not before:
        print(f"nothing waits for {uri} on this node ({box.dir})")
        return 0
    sent, left = tracking.sync(uri)
    print(f"delivered {sent} of {before} writes held back by an outage to {uri}"
          + (f"; {left} still wait: the server is unreachable, run tl-sweep sync again" if left else ""))
    return 0 if not left else 1


def cmd_submit(args) -> int:
    from tl_sweep import cluster

    if not args.address:
        raise UserError("--address: give the cluster's dashboard (http://head:8265) or set RAY_ADDRESS")
    job_id, status = cluster.submit(args.spec, args.set, args.address, wait=not args.no_wait, resume=args.resume,
                                    log=_log)
    print(job_id if args.no_wait else f"job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "SUBMITTED", "RUNNING") else 1


def cmd_report(args) -> int:
    from tl_sweep import report, tracking

    uri = tracking.resolve_uri(args.tracking_uri).uri
    tracking.check(uri)
    if args.run:
        exp_id, parent = tracking.get_run(uri, args.run).info.experiment_id, args.run
    else:
        exp_id, parent = tracking.find_sweep(uri, args.experiment)
    from tl_sweep.contract import Tag

    build = report.build_matrix if Tag.MATRIX in tracking.get_run(uri, parent).data.tags else report.build
    print(build(uri, exp_id, parent, out_dir=args.out, log=_log, log_artifacts=not args.no_log).key)
    return 0


def cmd_predict(args) -> int:
    from tl_sweep import classifier, data

    paths = []
    for p in map(Path, args.paths):
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in data.IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise UserError(f"{p}: no such file or folder; give image files or folders of images")
    if not paths:
        raise UserError(f"{' '.join(args.paths)}: no images there ({', '.join(sorted(data.IMAGE_SUFFIXES))})")
    for p in paths:  # every file an image, before any model is loaded
        classifier.check_image(p)
    if args.model.startswith(("runs:/", "models:/", "m-")):
        from tl_sweep import tracking

        uri = tracking.resolve_uri(args.tracking_uri).uri
        model = tracking.load_pyfunc(uri, args.model)
        tags = tracking.version_tags(uri, args.model)
        if tags.get("below_chance"):
            _log(f"warning: {args.model} was registered although it is not shown above chance "
                 f"({tags['below_chance']}); its confidences below say nothing about its accuracy")
        frame = model.predict([str(p) for p in paths])
        classes = [c for c in frame.columns if c not in ("label", "probability")]
        probs = frame[classes].to_numpy()
    else:
        clf = classifier.Classifier.from_file(args.model)
        classes, probs = clf.classes, clf.probabilities([str(p) for p in paths])
    truth = [p.parent.name if p.parent.name in classes else None for p in paths]
    parents = {p.parent.name for p in paths}
    if all(t is None for t in truth) and len(parents) > 1 and len(paths) > len(parents):
        raise UserError(f"MODEL: it predicts {', '.join(classes)}, and the images sit in class folders "
                        f"{', '.join(sorted(parents))}: a model for other classes; give one trained on these")
    top = max(1, min(args.top, len(classes)))
    rows = []
    for path, p, t in zip(paths, probs, truth):
        order = (-p).argsort()[:top]
        rows.append((str(path), classes[order[0]], f"{p[order[0]]:.3f}", t or "",
                     ", ".join(f"{classes[j]} {p[j]:.3f}" for j in order)))
    head = ("image", "predicted", "probability", "true", f"top {top}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if any(truth):
        n = sum(bool(t) for t in truth)
        right = sum(r[1] == r[3] for r in rows if r[3])
        print(f"accuracy on the {n} images in class folders: {100 * right / n:.1f}%"
              + (f" ({right} of {n}: too few images to say how good the model is)" if n < 30 else ""))
    if args.grid:
        _grid(paths, [r[1] for r in rows], [float(r[2]) for r in rows], truth, Path(args.grid))
        _log(f"grid: {args.grid}")
    return 0


def _grid(paths, predicted, prob, truth, out: Path) -> None:
    """The seed tutorials' visualize_model: each image with its predicted (and true) label."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(paths)
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, pred, p, t in zip(axes.flat, paths, predicted, prob, truth):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ok = t is None or t == pred
        ax.set_title(f"{pred} {p:.2f}" + (f"\n(true: {t})" if t else ""), fontsize=8, color="black" if ok else "red")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cmd_models(args) -> int:
    from tl_sweep import catalog

    rows = []
    for arch in catalog.archs():
        rows.append((arch, catalog.entry(arch)["family"], str(catalog.num_blocks(arch)),
                     str(catalog.input_spec(arch, "DEFAULT")["crop"]),
                     ", ".join(n for n in catalog.weight_names(arch) if n != "DEFAULT")))
    heads = ("arch", "family", "blocks", "input", "weights (plus DEFAULT)")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    for r in [heads, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_ui(args) -> int:
    from tl_sweep import tracking

    uri = tracking.resolve_uri(args.tracking_uri).uri
    tracking.check(uri)
    base = f"http://{args.host}:{args.port}"
    _log(f"starting the MLflow UI for {uri} …")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    root = tracking.artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", Path(root).as_uri()]
    # the server and its workers in their own process group, stopped with us on Ctrl-C or SIGTERM; the server's
    # job runner (MLflow's GenAI jobs: 7 more processes) is off unless the user turned it on
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    server = subprocess.Popen(cmd, start_new_session=True, env=env)

    class Stopped(Exception):
        pass

    def on_sigterm(signum, frame) -> None:  # leaves server.wait() below, which holds the lock a second wait needs
        raise Stopped

    import signal

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if _answers(f"{base}/health", server):  # the link is printed once it opens a page
            print(f"MLflow UI on {base} for {uri}", flush=True)
            print(f"training runs of experiment N: {tracking.ui_link(base, 'N')}  (N is printed by tl-sweep run)",
                  flush=True)
        return server.wait()
    except (KeyboardInterrupt, Stopped):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, previous)


def _answers(url: str, server, timeout: float = 120) -> bool:
    """Wait until ``url`` answers; False when the server process ended first (it said why on stderr)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def parser() -> argparse.ArgumentParser:
    from tl_sweep import __version__

    p = argparse.ArgumentParser(prog="tl-sweep", description="Transfer-learning sweeps: Ray Tune + Optuna + MLflow.")
    p.add_argument("--version", action="version", version=f"tl-sweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("spec", help="the YAML spec, e.g. search_spaces/freeze_depth.yaml")
        sp.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a spec key, e.g. --set search.num_trials=4 (repeatable)")
        return sp

    r = with_spec("run", "run the sweep a spec describes")
    r.add_argument("--address", default=None, help="Ray cluster to join (auto or host:port); default: "
                   "$RAY_ADDRESS, else a local Ray")
    r.add_argument("--resume", action="store_true", help="continue the latest sweep of this spec (after Ctrl-C or "
                   "a killed driver): finished trials are kept, unfinished ones continue from their checkpoints")
    r.add_argument("--report-dir", default=None, help="where report.md, trials.csv and plots go "
                   "(default reports/<experiment>-<run>)")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="rebuild a sweep's report from MLflow alone")
    who = rep.add_mutually_exclusive_group(required=True)
    who.add_argument("--experiment", help="experiment name: its latest sweep")
    who.add_argument("--run", help="the sweep's parent run id")
    rep.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                     help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    rep.add_argument("--out", default=None, help="output folder (default reports/<experiment>-<run>)")
    rep.add_argument("--no-log", action="store_true", help="do not log the report on the parent run again")
    rep.set_defaults(fn=cmd_report)
    es = with_spec("estimate", "transferability estimates (LogME, H-score, LEEP, NCE, a k-NN probe) per cell, without training")
    es.add_argument("--no-log", action="store_true", help="print only; do not log a run in MLflow")
    es.set_defaults(fn=cmd_estimate)
    sy = sub.add_parser("sync", help="deliver MLflow writes a tracking outage held back on this node")
    sy.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    sy.set_defaults(fn=cmd_sync)
    sm = with_spec("submit", "submit the sweep to a Ray cluster as a Ray Job and follow its logs")
    sm.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="the cluster's dashboard, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    sm.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sm.add_argument("--resume", action="store_true", help="continue the latest sweep of this spec on the cluster")
    sm.set_defaults(fn=cmd_submit)
    with_spec("validate", "print the fully resolved config and exit").set_defaults(fn=cmd_validate)
    sub.add_parser("models", help="list every torchvision model: family, blocks, input size, weights"
                   ).set_defaults(fn=cmd_models)
    pr = sub.add_parser("predict", help="classify images with a logged model or a checkpoint")
    pr.add_argument("model", help="models:/m-… (as tl-sweep run prints it), runs:/<run id>/<model name> (the name "
                    "is in the run's Artifacts), models:/<name>@<alias>, or a tl-sweep checkpoint (best.pt)")
    pr.add_argument("paths", nargs="+", help="image files or folders (in class folders: the true label is shown)")
    pr.add_argument("--grid", default=None, help="write a PNG grid of the images with their predicted labels")
    pr.add_argument("--top", type=int, default=1, help="show the K most probable classes")
    pr.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                    help="where runs:/ and models:/ live (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    pr.set_defaults(fn=cmd_predict)
    u = sub.add_parser("ui", help="start the MLflow UI on the sweep's tracking store")
    u.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                   help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(fn=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO chatter around a one-line error
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for results
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # the same when mlflow was imported already
    args = parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = redact.Stream(out), redact.Stream(err)  # no password or token is ever printed
    try:
        return args.fn(args)
    except UserError as e:
        _err(str(e))
        return e.exit_code
    except BrokenPipeError:  # `tl-sweep models | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # the interpreter's last flush goes nowhere
        return 0
    except KeyboardInterrupt as e:
        _err(str(e) or "interrupted before any trial started; nothing to resume: run the same command again")
        return 130
    finally:
        sys.stdout, sys.stderr = out, err


if __name__ == "__main__":
    sys.exit(main())
