"""A trial's resource limits: its memory budget on a CPU, its share of a GPU, and what "out of memory" means.

``resources.memory_gb`` on a CPU trial is watched by :class:`MemoryLimit`; ``resources.gpu < 1`` caps the
trial's share of GPU memory (:func:`share_gpu`), so the trial that outgrows its share fails, not its neighbours.
:func:`is_out_of_memory` recognises every way torch and Python say it.
"""

from __future__ import annotations

import functools
import os

import torch


class TrialOutOfMemory(MemoryError):
    """A CPU trial grew past ``resources.memory_gb`` (raised in the trial's thread by :class:`MemoryLimit`)."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's and the CPU allocator's out-of-memory errors, Python's MemoryError and the budget's own."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def share_gpu(device: torch.device, share: float) -> None:
    """Trials sharing a GPU (``resources.gpu < 1``): each may hold at most its share of the GPU's memory."""
    if device.type == "cuda" and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share)


class MemoryLimit:
    """``resources.memory_gb`` on a CPU trial: the most memory its worker process may hold.

    A watcher thread reads the process's anonymous resident memory (``RssAnon``: tensors, not the
    memory-mapped image cache) every 10 ms; past the budget it raises :class:`TrialOutOfMemory` in the trial's
    thread (``PyThreadState_SetAsyncExc``: delivered as soon as the running operation returns), so the trial
    ends FAILED as out of memory and frees what it held, instead of the kernel's OOM killer ending a worker
    that other trials share. A soft limit: one operation may overshoot before it is stopped. (A hard
    ``RLIMIT_DATA`` was tried first: Ray's own threads then failed their allocations too and aborted.)
    """

    def __init__(self, nbytes: int | None):
        import threading

        self.stop, self.thread, self.held, self.limit = threading.Event(), None, 0, nbytes or 0
        if nbytes and os.path.exists("/proc/self/status"):
            self.target = threading.get_ident()
            self.thread = threading.Thread(target=self._watch, name="tl-sweep-memory", daemon=True)
            self.thread.start()

    @staticmethod
    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _watch(self) -> None:
        import ctypes

        while not self.stop.wait(0.01):
            self.held = self.rss_anon()
            if self.held > self.limit:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target),
                                                           ctypes.py_object(TrialOutOfMemory))
                return

    def restore(self) -> None:
        import ctypes

        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None  # and drop an exception not delivered yet
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target), None)

    @staticmethod
    def give_back() -> None:
        """Free what a failed trial held: the CUDA cache, and freed heap back to the OS (glibc), so a reused
        worker starts its next trial small."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            _libc().malloc_trim(0)
        except (OSError, AttributeError, TypeError):
            pass


@functools.cache
def _libc():
    """glibc, found once (``find_library`` runs ``ldconfig -p`` in a subprocess each time it is asked)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"))


class WorkerMemory:
    """A reused trial worker's memory after each of its trials, against what it held after its first few.

    Tune reuses a trial's worker process for the next trial on CPUs and GPUs alike: the CUDA context, cuDNN's
    autotuned kernels, built models, traced graphs and the data already on the device stay, so a trial costs
    its compute and not a new process's start. What a trial leaves behind would stay too (ray#32698): so after
    each trial the worker drops the trial's objects, empties the CUDA cache and measures what it holds (on a GPU
    the memory torch reserves, on a CPU the process's anonymous resident memory), less what it keeps on purpose
    (``kept``: built models, data on the device). Past ``base × (1 + growth) + 64 MiB`` it asks to be
    replaced (:attr:`replace`, sent with each report): the driver gives it no further trial.

    ``base`` is the most it held after any of its first :attr:`SETTLE` trials, and ``growth`` defaults to 25%:
    a CPU worker's anonymous memory moves by ±30 MiB from trial to trial, and its first figures are its lowest,
    so a bound of "first + 10% + 64 MiB" replaced healthy workers (each replacement costs a new process: ~7 s
    of imports here, more with CUDA). A leak of a model's weights per trial (45 MB for a ResNet18) still trips
    it within a few trials. (The steady drift once seen here, ~9 MiB a trial, was glibc's malloc arenas, one
    more per trial thread: the workers' environment caps them, ``cluster.WORKER_ENV``.)
    """

    SLACK = 64 << 20  # allocator granularity and the heap's own noise: not growth
    SETTLE = 3  # trials whose highest figure is the base

    def __init__(self, growth: float | None = 0.25):
        self.growth, self.base, self.last = growth, None, None
        self.measured = 0
        self.replace: str | None = None  # why this worker must take no further trial
        self.trials = 0

    @staticmethod
    def measure(device: torch.device, kept: int = 0) -> int:
        """Bytes the worker holds now, once the trial's garbage is collected, less ``kept``."""
        import gc

        gc.collect()  # cheap: the worker's long-lived objects were frozen at its first trial (see begin)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            held = torch.cuda.memory_reserved(device)
        else:
            MemoryLimit.give_back()
            held = MemoryLimit.rss_anon() if os.path.exists("/proc/self/status") else 0
        return max(0, held - kept)

    def begin(self) -> None:
        """A trial starts in this worker. At its first, the objects alive now (imports, Ray, MLflow) are frozen
        out of the garbage collector's reach, so each measurement's collection scans only trials' objects
        (0.23 s → 0.1 ms here). What the first trial imports (torchvision's models, torch.fx, MLflow's store:
        160,000 objects, 80-95 ms per collection, twice a trial) is frozen after its first measurement."""
        import gc

        if self.trials == 0:
            gc.freeze()
        self.trials += 1

    def after_trial(self, held: int) -> str | None:
        """Record what the worker holds after a trial; returns why it must be replaced, if it must."""
        self.last, self.measured = held, self.measured + 1
        if self.measured == 1:
            import gc

            gc.freeze()  # just collected: what is alive is the worker's for good (imports, kept models and data)
        if self.measured <= self.SETTLE:
            self.base = max(self.base or 0, held)
        elif self.growth is not None and self.replace is None:
            bound = self.base * (1 + self.growth) + self.SLACK
            if held > bound:
                self.replace = (f"it held {held / 2**20:.0f} MiB after a trial, over its bound of "
                                f"{bound / 2**20:.0f} MiB (the most of its first {self.SETTLE} trials, "
                                f"{self.base / 2**20:.0f} MiB, + {self.growth:.0%} + 64 MiB)")
        return self.replace


_WORKER: WorkerMemory | None = None


def worker(growth: float | None = 0.25) -> WorkerMemory:
    """This process's :class:`WorkerMemory` (one per trial worker)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = WorkerMemory(growth)
    _WORKER.growth = growth
    return _WORKER


PROCESS_GPU_BYTES = 1 << 30  # a trial process's own GPU memory besides its tensors: CUDA context, cuDNN/cuBLAS
PER_GPU_UNMEASURED = 4  # trials per GPU when no GPU on the driver can measure a step (benchmarks/packing.py's share)


def trials_per_gpu(step_bytes: int | None, gpu_bytes: int | None, cpus_per_gpu: float, cpu_per_trial: float
                   ) -> tuple[int, str]:
    """``resources.gpu: auto``'s rule: as many trials per GPU as fit in 90% of its memory (each needs its
    measured step's peak plus :data:`PROCESS_GPU_BYTES`) and as the node's CPUs per GPU can feed
    (``resources.cpu`` each); :data:`PER_GPU_UNMEASURED` where the step could not be measured. Returns the
    number and why, in words."""
    by_cpu = max(1, int(cpus_per_gpu // cpu_per_trial))
    if step_bytes is None or gpu_bytes is None:
        by_mem, why = PER_GPU_UNMEASURED, f"{PER_GPU_UNMEASURED} (no GPU on the driver to measure a step)"
    else:
        need = step_bytes + PROCESS_GPU_BYTES
        by_mem = max(1, int(0.9 * gpu_bytes // need))
        why = (f"{by_mem} by memory ({need / 2**30:.1f} GiB per trial: a full fine-tuning step at the largest "
               f"batch measured {step_bytes / 2**30:.2f} GiB, of {gpu_bytes / 2**30:.0f} GiB)")
    n = min(by_cpu, by_mem)
    return n, f"{why}, {by_cpu} by CPUs ({cpus_per_gpu:g} per GPU, {cpu_per_trial:g} per trial)"
