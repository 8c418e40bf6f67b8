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


def test_a_worker_whose_memory_grew_past_its_bound_asks_to_be_replaced():
    """Real measurements of this process: the most of the first 3 trials' figures is the bound's base (a
    heap's noise at the start is not growth); memory a trial left behind (still referenced) trips
    it, once, with the figures in words."""
    import gc

    cpu = torch.device("cpu")
    w = limits.WorkerMemory(growth=0.1)
    assert w.after_trial(limits.WorkerMemory.measure(cpu)) is None  # the first trial: the base
    # and what is alive then (the first trial's imports too) is frozen: later collections skip it
    assert gc.get_freeze_count() > 10_000 and len(gc.get_objects()) < gc.get_freeze_count() // 10
    assert w.after_trial(limits.WorkerMemory.measure(cpu)) is None  # nothing left behind
    noise = [torch.ones(48 << 20, dtype=torch.uint8)]  # the third trial's heap, higher for no lasting reason
    assert w.after_trial(limits.WorkerMemory.measure(cpu)) is None and w.base == w.last  # the base: the most
    noise.clear()
    assert w.after_trial(limits.WorkerMemory.measure(cpu)) is None
    over = int(w.base * 0.1) + (64 << 20) + (100 << 20)  # past the bound, however large this process is
    leaked = [torch.ones(over, dtype=torch.uint8)]  # what a trial left referenced
    why = w.after_trial(limits.WorkerMemory.measure(cpu))
    assert why and "over its bound" in why and "the most of its first 3 trials" in why and "+ 10% + 64 MiB" in why
    kept = leaked[0].nbytes  # what a worker keeps on purpose is not growth
    assert limits.WorkerMemory.measure(cpu, kept) < w.last - kept // 2
    off = limits.WorkerMemory(growth=None)  # resources.worker_growth: null
    for held in (1, 1, 1):
        off.after_trial(held)
    assert off.after_trial(10 << 30) is None
    leaked.clear()
    gc.unfreeze()  # this test process is not a worker


def test_trials_per_gpu_by_memory_and_by_cpus():
    n, why = limits.trials_per_gpu(3 << 30, 140 << 30, cpus_per_gpu=15, cpu_per_trial=1)
    assert n == 15 and "31 by memory" in why and "15 by CPUs" in why  # 0.9 × 140 / (3 + 1) GiB = 31
    n, _ = limits.trials_per_gpu(30 << 30, 80 << 30, cpus_per_gpu=15, cpu_per_trial=1)
    assert n == 2  # 0.9 × 80 / 31 = 2.3
    n, why = limits.trials_per_gpu(None, None, cpus_per_gpu=8, cpu_per_trial=1)
    assert n == limits.PER_GPU_UNMEASURED == 4 and "no GPU on the driver" in why
    assert limits.trials_per_gpu(None, None, cpus_per_gpu=3, cpu_per_trial=2)[0] == 1  # never none
