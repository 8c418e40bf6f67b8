"""The sweep's Tune callbacks on the driver: the progress a person reads (runner's scenario tests run the rest)."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

from tl_sweep import callbacks


def trial(i, acc, arm="scratch", epoch=3, role="trial", search=0):
    config = {"unfrozen_blocks": 0, "optimizer": "sgd", "batch_size": 32, "lr_mult": 1.0, "epochs": 3, "arm": arm,
              "seed": 0, "role": role, "search": search}
    return SimpleNamespace(trial_id=f"t{i}", status="TERMINATED", config=config,
                           last_result={"val_acc": acc, "best_val_acc": acc, "epoch": epoch})


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_say_the_arm_and_its_best_in_percent_with_an_eta_for_the_whole_sweep():
    lines = []
    plan = callbacks.Plan(total=6, repeats=2)
    plain = callbacks.Progress(lines.append, plan, stream=io.StringIO())  # not a terminal: lines only
    plain.on_trial_complete(0, [], trial(0, 0.5, arm="source:mnist-5k"))
    plain.on_trial_complete(0, [], trial(1, 0.9, arm="scratch", search=1))
    plain.on_trial_complete(0, [], trial(2, 0.6, arm="source:mnist-5k", role="final"))
    assert lines[0].startswith("[  1/6] source:mnist-5k k=0 repeat 0 · sgd bs=32") and "val 50.0%" in lines[0]
    assert "scratch k=0 repeat 1" in lines[1] and "best scratch 90.0%" in lines[1]
    # the best is per arm: scratch's 90% is not the source's best
    assert lines[2].startswith("[  3/6] final source:mnist-5k") and "best source:mnist-5k 60.0%" in lines[2]
    # no ETA until two more ended after the first (the first paid for the workers' start)
    assert ["eta ~" in x for x in lines] == [False, False, True]
    plan.first -= 10  # 2 trainings in the 10 s since the first ended: 3 left take ~15 s
    assert plan.eta() == "eta ~15s"

    term = Terminal()
    live = callbacks.Progress(lines.append, plan, stream=term)  # the next phase of the same sweep
    running = SimpleNamespace(status="RUNNING")
    live.on_trial_start(0, [running, running], None)
    live.on_trial_complete(0, [running], trial(4, 0.8, epoch=1))
    out = term.getvalue()
    assert "4/6" in out and "1 running" in out  # trainings of the whole sweep, live
    assert "[  4/6] scratch" in out and "(early-stopped)" in out and len(lines) == 3  # the line above the bar
    assert pickle.loads(pickle.dumps(live)).bar is None  # Tune pickles its callbacks: the bar is remade


def test_a_resumed_sweeps_counter_and_eta_go_on_from_its_finished_trainings():
    lines = []
    plan = callbacks.Plan(total=10, done=6)  # six finished before the driver stopped
    progress = callbacks.Progress(lines.append, plan, stream=io.StringIO())
    for i in range(3):
        progress.on_trial_complete(0, [], trial(i, 0.7))
    assert lines[0].startswith("[  7/10]") and lines[2].startswith("[  9/10]")
    plan.first -= 10  # this process's rate: 2 trainings in 10 s since its first; 1 left
    assert plan.eta() == "eta ~5s"
