"""Resource limits: the memory watcher stops a trial past its budget; what counts as out of memory."""

from __future__ import annotations

import time

import pytest
import torch

from tl_sweep import limits


def test_memory_limit_stops_the_trial_thread_past_its_budget():
    base = limits.MemoryLimit.rss_anon()
    limit = limits.MemoryLimit(base + (200 << 20))  # 200 MiB more than now
    held = []
    try:
        with pytest.raises(limits.TrialOutOfMemory):
            for _ in range(40):  # up to 1.6 GiB, 40 MiB at a time, every page touched
                held.append(torch.ones(10 << 20))
                time.sleep(0.02)
    finally:
        limit.restore()
    assert limit.held > base + (200 << 20) and len(held) < 40  # stopped soon after the budget, not at the end
    held.clear()
    time.sleep(0.05)  # restored: no late exception arrives here


def test_every_out_of_memory_error_is_recognised():
    assert limits.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert limits.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert limits.is_out_of_memory(limits.TrialOutOfMemory()) and limits.is_out_of_memory(MemoryError())
    assert not limits.is_out_of_memory(RuntimeError("worker lost"))
