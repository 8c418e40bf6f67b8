"""Cache files that prove they are whole before they are used.

Every cache tl-sweep writes (the decoded images, their label file, stored features) is written to a temporary
name and renamed when complete, with its size and CRC-32 recorded beside it in ``<file>.sum``. Before a
process first uses a cache file, :func:`problem` compares the file with that record: a file truncated by a
crash in another process, altered by a disk error or a stray write, or left without its record is reported,
and the caller rebuilds it instead of training on it. CRC-32 (zlib, ~7 GB/s here) catches truncation and
corruption; it is not a defence against someone who may write to your cache folder on purpose.

A file checked once is not checked again by the same process while it and its record keep their size, mtime
and inode.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Callable

_CHECKED: set[tuple] = set()


def root() -> Path:
    """This node's cache folder: ``TL_SWEEP_CACHE``, else ``~/.cache/tl-sweep``."""
    return Path(os.environ.get("TL_SWEEP_CACHE", Path.home() / ".cache" / "tl-sweep")).expanduser()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sum")


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write(path: Path, fill: Callable[[str], None]) -> None:
    """Create ``path`` whole or not at all: ``fill(tmp)`` writes a temporary file in the same folder, which is
    checksummed, recorded and renamed into place. Raises ``OSError`` (no room, no permission) with nothing
    left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    fd, tmp_sum = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".sum.tmp")
    os.close(fd)
    try:
        fill(tmp)
        record = {"size": os.path.getsize(tmp), "crc32": crc32(Path(tmp))}
        Path(tmp_sum).write_text(json.dumps(record))
        os.replace(tmp_sum, _sidecar(path))  # the record first: a data file never stands without one
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp_sum).unlink(missing_ok=True)


def problem(path: Path) -> str | None:
    """``None`` when ``path`` is the file that was recorded; otherwise what is wrong with it, in words."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    try:
        rec = _sidecar(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, rec.st_mtime_ns, rec.st_ino)
        if key in _CHECKED:
            return None
        record = json.loads(_sidecar(path).read_text())
        size, crc = int(record["size"]), int(record["crc32"])
    except FileNotFoundError:
        return "no size and checksum recorded (written by an older tl-sweep or cut short)"
    except (ValueError, KeyError, TypeError):
        return f"its record {_sidecar(path).name} is unreadable"
    if st.st_size != size:
        return f"{st.st_size} bytes where {size} were written (truncated or overwritten)"
    if crc32(path) != crc:
        return "its CRC-32 differs from the one recorded when it was written (altered since)"
    _CHECKED.add(key)
    return None


def discard(path: Path) -> None:
    """Remove a damaged cache file and its record."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
