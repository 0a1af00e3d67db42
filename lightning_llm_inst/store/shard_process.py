"""Shards written by a separate process: the writer thread sends chunks down a pipe.

Stage: the writer thread of :class:`~lightning_llm_inst.store.writer.StoreWriter`, when it is
created with ``shard_process=True`` (GPU captures do this). :class:`ProcessShard` has the
interface of :class:`~lightning_llm_inst.store.shard.OpenShard`, but the HDF5 calls run in a
child process (``_shard_child.py``): h5py keeps the GIL inside them, and a chunk write the
kernel stalls for writeback would otherwise stall every Python thread of the caller -- the
one launching the model's kernels included. Here the writer thread only ``os.write``s the
stored bytes into a pipe, which releases the GIL. The file is the same, byte for byte in
its chunks; fsync and rename stay in this process (:meth:`publish`).
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import select
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lightning_llm_inst.store.chunking import Column
from lightning_llm_inst.store.codecs import Codec
from lightning_llm_inst.store.format import TMP_SUFFIX, checksum_path, dataset_path, fsync_path, shard_name

__all__ = ["ProcessShard", "ShardProcess"]

_CHILD = Path(__file__).with_name("_shard_child.py")


class ShardProcess:
    """The child process of one writer, started on first use, stopped by :meth:`close`."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is not None:
            raise OSError(errno_mod.EPIPE, f"the shard-writing process exited with code {self._proc.returncode}")
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-u", os.fspath(_CHILD)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, bufsize=0, close_fds=True)
            try:  # room for a few chunks in the pipe
                import fcntl

                fcntl.fcntl(self._proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 22)
            except OSError:
                pass
        return self._proc

    def send(self, head: dict[str, Any], payload: Any = None) -> None:
        view = memoryview(payload).cast("B") if payload is not None else None
        head["size"] = view.nbytes if view is not None else 0
        data = json.dumps(head).encode()
        with self._lock:
            fd = self._start().stdin.fileno()  # type: ignore[union-attr]
            _write_all(fd, struct.pack("<I", len(data)) + data)
            if view is not None and view.nbytes:
                _write_all(fd, view)

    def receive(self, block: bool = True) -> dict[str, Any] | None:
        """The child's next message; ``None`` when ``block`` is False and none is waiting."""
        proc = self._start()
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        if not block and not select.select([fd], [], [], 0)[0]:
            return None
        head = _read_exact(fd, 4)
        if not head:
            raise OSError(errno_mod.EPIPE, f"the shard-writing process exited (code {proc.wait()})")
        (n,) = struct.unpack("<I", head)
        return json.loads(_read_exact(fd, n))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self.send_to(proc, {"op": "exit"})
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()

    @staticmethod
    def send_to(proc: subprocess.Popen, head: dict[str, Any]) -> None:
        data = json.dumps({**head, "size": 0}).encode()
        _write_all(proc.stdin.fileno(), struct.pack("<I", len(data)) + data)  # type: ignore[union-attr]


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)  # releases the GIL while the kernel copies
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            return b""
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _raise(msg: dict[str, Any], where: Path) -> None:
    code = msg.get("errno")
    if code:
        raise OSError(code, msg.get("strerror") or msg.get("error"), os.fspath(where))
    raise OSError(errno_mod.EIO, msg.get("error") or "the shard-writing process failed", os.fspath(where))


class ProcessShard:
    """One shard being written by the writer's :class:`ShardProcess` (the interface of
    :class:`~lightning_llm_inst.store.shard.OpenShard`)."""

    def __init__(self, directory: Path, index: int, columns: list[Column], codec: Codec, attrs: dict[str, Any],
                 process: ShardProcess) -> None:
        self.index = index
        self.directory = directory
        self.final = directory / shard_name(index)
        self.tmp = directory / (shard_name(index) + TMP_SUFFIX)
        self.columns = columns
        self.process = process
        self.chunks: dict[str, dict[int, tuple[int, int, int]]] = {c.key: {} for c in columns}
        self.lengths: dict[str, int] = {c.key: 0 for c in columns}
        self._open = True
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in codec.h5py_kwargs().items()}
        process.send({"op": "open", "tmp": os.fspath(self.tmp), "attrs": _plain(attrs), "codec": kw, "datasets": [
            {"key": c.key, "path": dataset_path(c.kind, c.name), "shape": list(c.feature_shape),
             "chunk_rows": c.chunk_rows, "storage": c.storage.str, "dtype": c.dtype} for c in columns]})

    def _check(self) -> None:
        msg = self.process.receive(block=False)
        if msg is not None and not msg.get("ok"):
            _raise(msg, self.tmp)

    def write_chunk(self, col: Column, chunk_index: int, valid_rows: int, data: bytes | np.ndarray, crc: int) -> None:
        self._check()
        start = chunk_index * col.chunk_rows
        self.lengths[col.key] = max(self.lengths[col.key], start + valid_rows)
        self.process.send({"op": "chunk", "key": col.key, "rows": self.lengths[col.key],
                           "offset": [start] + [0] * len(col.feature_shape)}, data)
        self.chunks[col.key][chunk_index] = (crc, memoryview(data).nbytes, valid_rows * col.row_bytes)

    def truncate(self, col: Column, chunk_index: int) -> None:
        rows = chunk_index * col.chunk_rows
        if self.lengths[col.key] > rows:
            self.lengths[col.key] = rows
            self.process.send({"op": "truncate", "key": col.key, "rows": rows})
        table = self.chunks[col.key]
        for ci in [ci for ci in table if ci >= chunk_index]:
            del table[ci]

    def totals(self, col: Column) -> tuple[int, int]:
        table = self.chunks[col.key].values()
        return sum(r for _, _, r in table), sum(s for _, s, _ in table)

    def close_file(self, rows: int) -> None:
        checksums = []
        for c in self.columns:
            got = self.lengths[c.key]
            table = self.chunks[c.key]
            if got != rows or sorted(table) != list(range(len(table))):
                raise RuntimeError(f"shard {self.tmp} dataset {c.key} holds {got} rows in chunks {sorted(table)}, "
                                   f"expected {rows} rows")
            checksums.append([checksum_path(c.kind, c.name), [table[i][0] for i in range(len(table))]])
        self.process.send({"op": "close", "rows": rows, "checksums": checksums})
        msg = self._reply()
        if not msg.get("ok"):
            _raise(msg, self.tmp)  # still open: abort() has the child close and delete it
        self._open = False

    def _reply(self) -> dict[str, Any]:
        """The answer to the last ``close`` / ``abort`` (skipping early error reports)."""
        while True:
            msg = self.process.receive()
            assert msg is not None
            if not msg.get("early"):
                return msg

    def publish(self, fsync: bool) -> None:
        if fsync:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.final)
        if fsync:
            fsync_path(self.directory)

    def abort(self) -> None:
        try:
            if self._open:
                self._open = False
                self.process.send({"op": "abort"})
                self._reply()
        except OSError:
            pass
        try:
            self.tmp.unlink()
        except OSError:
            pass


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
