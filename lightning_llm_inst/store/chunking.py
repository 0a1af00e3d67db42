"""Chunk assembly for the store writer: inputs to rows, rows to chunk buffers, bytes counted.

Stage: the caller's side of :class:`~lightning_llm_inst.store.writer.StoreWriter`. Tensors
are checked and viewed as numpy arrays in their storage dtype; each dataset ("column")
collects rows into a chunk buffer that, once full, goes to the compression workers. Every
buffered byte is counted in a :class:`ByteBudget`, which makes the producer wait (or lets it
drop) when the writer's bound is reached.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_llm_inst.store.format import ACTIVATION_DTYPES, ACTIVATIONS, NAME_RULE, name_problem

__all__ = ["BufferPool", "ByteBudget", "Column", "as_numpy", "check_name"]


def as_numpy(value: Any, what: str, allowed: Mapping[str, str]) -> tuple[np.ndarray, str]:
    """Return ``(array in storage dtype, logical dtype name)`` for a tensor or array.

    The array may be a view of the caller's memory; the writer copies it into chunk buffers
    before returning to the caller.
    """
    torch = sys.modules.get("torch")  # never import torch just to check a type
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        name = str(t.dtype).removeprefix("torch.")
        if name not in allowed:
            raise TypeError(f"{what} has dtype {t.dtype}; allowed: {', '.join('torch.' + k for k in allowed)}")
        if name == "bfloat16":
            return t.view(torch.int16).numpy().view(np.uint16), name
        return t.numpy(), name
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name == "bfloat16":  # ml_dtypes' bfloat16
            return value.view(np.uint16), name
        if name not in allowed or value.dtype.byteorder == ">":
            raise TypeError(f"{what} has dtype {value.dtype}; allowed: {', '.join(allowed)}")
        return value, name
    raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_name(name: Any, what: str) -> str:
    """``name`` if it can name an HDF5 dataset (and so a hook point or token field)."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{what} name {name!r} is not valid: it {problem}; use {NAME_RULE}")
    return name


class ByteBudget:
    """Bytes held by the writer, with waiting for room (``block``) and a high-water mark."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._blocked_s = 0.0
        self._blocked_since: float | None = None
        self._cond = threading.Condition()
        self._failed = False

    def acquire(self, n: int, ceiling: int) -> None:
        """Take ``n`` bytes, waiting while that would pass ``ceiling`` and others hold some."""
        with self._cond:
            if self.held + n > ceiling and self.held > 0 and not self._failed:
                self._blocked_since = t0 = time.perf_counter()
                while self.held + n > ceiling and self.held > 0 and not self._failed:
                    self._cond.wait()
                self._blocked_s += time.perf_counter() - t0
                self._blocked_since = None
            self._take(n)

    @property
    def blocked_s(self) -> float:
        """Seconds the producer has waited for room, including a wait in progress."""
        since = self._blocked_since
        return self._blocked_s + (time.perf_counter() - since if since is not None else 0.0)

    def fits(self, n: int, ceiling: int) -> bool:
        with self._cond:
            return self.held + n <= ceiling

    def force(self, n: int) -> None:
        """Take ``n`` bytes without waiting (the caller made room for them beforehand)."""
        with self._cond:
            self._take(n)

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    def fail(self) -> None:
        """Wake every waiter: the writer has failed and will take no more."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()


class BufferPool:
    """Chunk buffers kept for reuse (fresh pages cost more than the copy into them), up to
    ``max_bytes`` in all; the writer keeps that much out of its budget for them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(buf: np.ndarray) -> tuple:
        return buf.shape, buf.dtype.str

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, np.dtype(dtype).str))
            if free:
                buf = free.pop()
                self.bytes -= buf.nbytes
                return buf
        return np.empty(shape, dtype=dtype)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            if self.bytes + buf.nbytes <= self.max_bytes:
                self._free.setdefault(self._key(buf), []).append(buf)
                self.bytes += buf.nbytes


@dataclass(eq=False)
class Column:
    """One dataset of the store and the caller thread's partly filled chunk for it.

    ``start_chunk`` / ``start_filled`` mark where the current batch began, and ``keep``
    holds the batch's first chunk if it was handed to the workers while the batch was open,
    so an aborted batch can be rolled back exactly.
    """

    kind: str  # ACTIVATIONS or TOKENS
    name: str
    dtype: str  # logical dtype name
    feature_shape: tuple[int, ...]
    chunk_rows: int = 0
    planes: bool = False  # buffers hold byte planes (already in HDF5 shuffle order)
    buf: np.ndarray | None = None  # rows: [chunk_rows, *feature_shape]; planes: uint8 [itemsize, chunk_rows * F]
    filled: int = 0
    chunk_index: int = 0  # within the open shard
    start_chunk: int = 0
    start_filled: int = 0
    keep: np.ndarray | None = None
    raw_bytes: int = 0
    stored_bytes: int = 0
    rows: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def storage(self) -> np.dtype:
        return np.dtype(ACTIVATION_DTYPES[self.dtype])

    @property
    def row_elems(self) -> int:
        return int(np.prod(self.feature_shape, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.storage.itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    def new_buffer(self, pool: BufferPool | None = None) -> np.ndarray:
        if self.planes:
            shape, dtype = (self.storage.itemsize, self.chunk_rows * self.row_elems), np.dtype(np.uint8)
        else:
            shape, dtype = (self.chunk_rows, *self.feature_shape), self.storage
        return pool.get(shape, dtype) if pool is not None else np.empty(shape, dtype=dtype)

    def put(self, src: np.ndarray, src_planes: bool, pos: int, n: int) -> None:
        """Copy rows ``pos .. pos+n`` of ``src`` (rows, or byte planes) after the filled rows."""
        assert self.buf is not None
        f, a = self.row_elems, self.filled
        if self.planes:
            dst = self.buf[:, a * f : (a + n) * f]
            if src_planes:
                dst[...] = src[:, pos * f : (pos + n) * f]
            else:  # shuffle on the CPU: [n * F, itemsize] -> [itemsize, n * F]
                dst[...] = np.ascontiguousarray(src[pos : pos + n]).view(np.uint8).reshape(n * f, -1).T
        elif src_planes:
            rows = np.ascontiguousarray(src[:, pos * f : (pos + n) * f].T).view(self.storage)
            self.buf[a : a + n] = rows.reshape(n, *self.feature_shape)
        else:
            self.buf[a : a + n] = src[pos : pos + n]

    def zero_tail(self, buf: np.ndarray, valid: int) -> None:
        """Zero the rows after ``valid``: HDF5 stores edge chunks whole."""
        if self.planes:
            buf[:, valid * self.row_elems :] = 0
        else:
            buf[valid:] = 0

    def copy_prefix(self, dst: np.ndarray, src: np.ndarray, n: int) -> None:
        if self.planes:
            dst[:, : n * self.row_elems] = src[:, : n * self.row_elems]
        else:
            dst[:n] = src[:n]

    def mark_batch_start(self) -> None:
        self.start_chunk, self.start_filled, self.keep = self.chunk_index, self.filled, None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dtype": self.dtype, "storage_dtype": self.storage.str, "chunk_rows": self.chunk_rows}
        if self.kind == ACTIVATIONS:
            d["shape"] = list(self.feature_shape)
        d.update(rows=self.rows, raw_bytes=self.raw_bytes, stored_bytes=self.stored_bytes)
        return d
