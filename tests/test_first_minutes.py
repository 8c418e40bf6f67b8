"""What a newcomer meets first, on a pseudo-terminal as a user has it: a line before the heavy imports, a bar with
an ETA while a source pretrains, and Ctrl-C there saying what is kept and the exact command to run again."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time

import pytest

from conftest import SPEC, tl_command


def read_until(fd: int, pattern: str, timeout: float) -> str:
    """What the terminal showed until ``pattern`` appeared (a regex), or until ``timeout``."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 4096).decode(errors="replace")
        except OSError:  # the process ended and closed the terminal
            break
        seen += chunk
        if re.search(pattern, seen):
            return seen
    return seen


@pytest.mark.slow
def test_a_fresh_cache_shows_pretraining_progress_and_ctrl_c_says_what_to_run(tmp_path):
    """An empty cache: the study's first minutes pretrain its sources. The terminal shows the plan at once, then
    a bar with its ETA ('<' remaining, as tqdm draws it); Ctrl-C ends it in one line that says nothing is kept
    and gives the exact command."""
    env = dict(os.environ, TL_SWEEP_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    cmd = tl_command("run", spec=SPEC, sets_=("study.sources=[source:digits-0-4]",
                                              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal's 160 columns
    t0 = time.time()
    # a terminal's foreground process: Ctrl-C is not ignored (a shell's background job, as CI may start the
    # suite, ignores SIGINT, and Python keeps an inherited SIG_IGN: the first minutes would not stop)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=follower, stdout=follower, stderr=follower, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(follower)
    try:
        first = read_until(leader, r"loading torch", 20)
        assert "tl-sweep: running 'freeze-depth'" in first and time.time() - t0 < 10, first
        shown = read_until(leader, r"pretraining source:digits-0-4:.*\d+/\d+ \[\d+:\d+<\d+:\d+", 120)
        assert re.search(r"pretraining source:digits-0-4:.*\d+/\d+ \[\d+:\d+<\d+:\d+", shown), shown[-2000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        rest = read_until(leader, r"run it again with", 60)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert proc.returncode == 130
    line = next(x for x in rest.splitlines() if "tl-sweep: error:" in x)
    assert "interrupted while pretraining source:digits-0-4: nothing of it is kept" in line, line
    assert f"run it again with: tl-sweep run {SPEC}" in line and "--resume" not in line, line
    assert not list((tmp_path / "cache").glob("sources/*.pt"))  # nothing half-pretrained is taken as cached
