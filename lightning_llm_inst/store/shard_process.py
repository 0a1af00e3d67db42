"""Shards written by a separate process: the writer thread sends chunks down a pipe.

Stage: the writer thread of :class:`~lightning_llm_inst.store.writer.StoreWriter`, when it is
created with ``shard_process=True`` (GPU captures do this). :class:`ProcessShard` has the
interface of :class:`~lightning_llm_inst.store.shard.OpenShard`, but the HDF5 calls run in a
child process (``_shard_child.py``): h5py keeps the GIL inside them, and a chunk write the
kernel stalls for writeback would otherwise stall every Python thread of the caller -- the
one launching the model's kernels included. Here the writer thread copies the stored bytes
into a shared-memory ring and sends a small header down a pipe. The file is the same, byte for byte in
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
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from lightning_llm_inst.store.chunking import Column
from lightning_llm_inst.store.codecs import Codec
from lightning_llm_inst.store.format import TMP_SUFFIX, checksum_path, dataset_path, fsync_path, shard_name

__all__ = ["ProcessShard", "ShardProcess"]

_CHILD = Path(__file__).with_name("_shard_child.py")


class ShardProcess:
    """The child process of one writer, started on first use, stopped by :meth:`close`.

    Chunk bytes travel through a shared-memory ring (``ring_bytes``); the pipe carries only
    small headers one way and acknowledgements the other. A slice of the ring is reused once
    the child has written the chunk it held (acknowledgements come back in order).
    """

    def __init__(self, ring_bytes: int = 64 << 20) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._ring_bytes = ring_bytes
        self._shm: Any = None
        self._ring: np.ndarray | None = None
        self._head = 0  # next free byte of the ring
        self._used = 0
        self._pending: deque[tuple[int, int]] = deque()  # (offset, charged) of unacknowledged chunks
        self._inbox: deque[dict[str, Any]] = deque()  # messages read while waiting for acknowledgements

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is not None:
            raise OSError(errno_mod.EPIPE, f"the shard-writing process exited with code {self._proc.returncode}")
        if self._proc is None:
            from multiprocessing import shared_memory

            self._shm = shared_memory.SharedMemory(create=True, size=self._ring_bytes)
            self._ring = np.frombuffer(self._shm.buf, dtype=np.uint8)
            self._proc = subprocess.Popen([sys.executable, "-u", os.fspath(_CHILD), self._shm.name],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
            from multiprocessing import resource_tracker

            resource_tracker.unregister(self._shm._name, "shared_memory")  # the child unlinks the name
        return self._proc

    def send(self, head: dict[str, Any], payload: Any = None) -> None:
        view = memoryview(payload).cast("B") if payload is not None else None
        n = view.nbytes if view is not None else 0
        with self._lock:
            fd = self._start().stdin.fileno()  # type: ignore[union-attr]
            if n and n <= self._ring_bytes // 2:
                offset = self._alloc(n)
                self._ring[offset : offset + n] = np.frombuffer(view, dtype=np.uint8)  # type: ignore[index]
                head.update(shm_offset=offset, shm_size=n)
                view, n = None, 0
            head["size"] = n
            data = json.dumps(head).encode()
            _write_all(fd, struct.pack("<I", len(data)) + data)
            if view is not None and n:  # larger than half the ring: through the pipe
                _write_all(fd, view)

    def _alloc(self, n: int) -> int:
        """Offset of ``n`` free bytes of the ring, waiting for acknowledgements while it is full."""
        n = -(-n // 64) * 64
        while True:
            size = self._ring_bytes
            if not self._pending:
                self._head = 0
            tail = self._pending[0][0] if self._pending else 0
            place = None
            if not self._pending or self._head > tail:
                if size - self._head >= n:
                    place = (self._head, n)
                elif tail >= n:
                    place = (0, n + size - self._head)  # wrap: the end of the ring is skipped
            elif tail - self._head >= n:
                place = (self._head, n)
            if place is not None:
                offset, charged = place
                self._pending.append((offset, charged))
                self._used += charged
                self._head = offset + n
                return offset
            self._read_one(block=True)

    def _read_one(self, block: bool) -> bool:
        """Read one message from the child: an acknowledgement frees ring space, anything else
        goes to the inbox. False when ``block`` is False and nothing is waiting."""
        proc = self._proc
        assert proc is not None
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        if not block and not select.select([fd], [], [], 0)[0]:
            return False
        head = _read_exact(fd, 4)
        if not head:
            raise OSError(errno_mod.EPIPE, f"the shard-writing process exited (code {proc.wait()})")
        (n,) = struct.unpack("<I", head)
        msg = json.loads(_read_exact(fd, n))
        if "ack" in msg:
            for _ in range(msg["ack"]):
                _, charged = self._pending.popleft()
                self._used -= charged
        else:
            self._inbox.append(msg)
        return True

    def receive(self, block: bool = True) -> dict[str, Any] | None:
        """The child's next message other than an acknowledgement; ``None`` when ``block`` is
        False and none is waiting."""
        with self._lock:
            self._start()
            while not self._inbox:
                if not self._read_one(block):
                    return None
            return self._inbox.popleft()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
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
        finally:
            if self._shm is not None:
                self._ring = None
                try:
                    self._shm.close()  # the child unlinked its name once it had mapped it
                except BufferError:  # a view is still alive somewhere: the mapping goes with the process
                    pass
                self._shm = None
            self._pending.clear()
            self._inbox.clear()
            self._used = self._head = 0

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

    def write_chunks(self, col: Column, first_index: int, valid_rows: list[int], datas: list[Any],
                     crcs: list[int]) -> None:
        """Write consecutive chunks from ``first_index`` (a job of the writer), in order."""
        for i, (valid, data, crc) in enumerate(zip(valid_rows, datas, crcs, strict=True)):
            self.write_chunk(col, first_index + i, valid, data, crc)

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
