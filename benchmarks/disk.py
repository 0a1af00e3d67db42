"""The disk ceiling both benchmarks measure: a sequential write, then fsync."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_file(path: Path, nbytes: int, buf: memoryview, block: int, fsync: bool = True) -> tuple[float, float]:
    """Write ``nbytes`` to ``path`` in ``block``-byte writes from ``buf``; return
    ``(seconds writing, seconds in fsync)``."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            mv = buf[: min(block, left)]
            while mv:
                n = os.write(fd, mv)
                mv = mv[n:]
                left -= n
        t1 = time.perf_counter()
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t1
