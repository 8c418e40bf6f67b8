"""The Ray Tune trainable's failure rules (the trainable itself runs in the scenario tests: test_sweep,
test_faults, test_resume)."""

from __future__ import annotations

import torch

from test_train import PARAMS, ctx
from tl_sweep import limits, train, trainable


def test_out_of_memory_errors_are_classified_as_such():
    c = ctx({"kind": "fixed"})
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried")
    for e in (cuda, cpu, limits.TrialOutOfMemory()):
        kind, reason = trainable.deterministic_failure(e, PARAMS, c)
        assert kind == "OutOfMemory" and "batch_size 20, 16px" in reason and "lower batch_size" in reason
    assert trainable.deterministic_failure(train.TrialError("loss became nan"), PARAMS, c) == ("TrialError",
                                                                                           "loss became nan")
    assert trainable.deterministic_failure(RuntimeError("worker lost"), PARAMS, c) is None  # retried by Tune


def test_a_resume_checkpoint_waits_for_its_epoch_and_for_checkpoint_seconds():
    """failures.checkpoint_every epochs, and only once checkpoint_seconds of the trial passed since the last:
    a trial of a few seconds writes none (redoing it is cheaper than the 128 MB a resnet18 with Adam writes)."""
    due = trainable.resume_due
    assert [due(e, 1, 0.0, 0.0) for e in (1, 2, 3)] == [True] * 3  # checkpoint_seconds: 0, every epoch
    assert [due(e, 2, 0.0, 0.0) for e in (1, 2, 3, 4)] == [False, True, False, True]
    assert not due(1, 1, 30.0, 2.5) and due(5, 1, 30.0, 31.0)  # a short stretch is not worth a checkpoint
    assert not due(2, 0, 0.0, 100.0)  # checkpoint_every: 0, never
    from tl_sweep import spec

    assert spec.Failures().checkpoint_seconds == 30.0 and spec.Failures().checkpoint_every == 1
