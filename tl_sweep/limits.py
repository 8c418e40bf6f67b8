"""A trial's resource limits: its memory budget on a CPU, its share of a GPU, and what "out of memory" means.

``resources.memory_gb`` on a CPU trial is watched by :class:`MemoryLimit`; ``resources.gpu < 1`` caps the
trial's share of GPU memory (:func:`share_gpu`), so the trial that outgrows its share fails, not its neighbours.
:func:`is_out_of_memory` recognises every way torch and Python say it.
"""

from __future__ import annotations

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
        import ctypes
        import ctypes.util

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        except (OSError, AttributeError, TypeError):
            pass
