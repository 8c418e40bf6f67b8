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
