"""Ring buffers between the compute stream and the store writer.

Stage: after the pack step, before the writer. On a GPU, each captured tensor is packed into
a slice of a preallocated device ring; a side stream waits on the slice's "packed" event and
copies it into a slice of a preallocated pinned host pool (bounded by the memory budget);
the drain thread waits on the "copied" event, frees the device slice, hands the host bytes
to the writer and frees the host slice. Nothing is allocated per batch and the compute
stream never synchronises. On a CPU the same path runs with one host ring and no streams.

Both rings are FIFO: space comes back in the order it was taken (a slice freed early waits
for the older ones).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ALIGN", "ByteRing", "CaptureBuffers", "Slice"]

ALIGN = 256  # slice offsets: aligned for vector loads and stores


@dataclass(frozen=True)
class Slice:
    ring: ByteRing
    offset: int
    nbytes: int
    charged: int  # nbytes rounded up to ALIGN

    def view(self) -> torch.Tensor:
        return self.ring.buffer[self.offset : self.offset + self.nbytes]


class ByteRing:
    """A FIFO allocator over one preallocated uint8 buffer, with waiting for room."""

    def __init__(self, buffer: torch.Tensor, name: str) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("a ring needs a 1-D uint8 buffer")
        self.buffer = buffer
        self.capacity = buffer.numel()
        self.name = name
        self._live: deque[Slice] = deque()
        self._done: set[int] = set()  # ids of live slices already freed (out of order)
        # the end of the buffer skipped by a wrap, charged to the slice before the skip: it is
        # free again once that slice is (the ring's tail then wraps past it)
        self._skipped: dict[int, int] = {}
        self._head = 0  # next free byte
        self.used = 0
        self.peak = 0
        self._waited_s = 0.0
        self._waiting_since: float | None = None
        self._cond = threading.Condition()
        self._failed: BaseException | None = None

    def _place(self, nbytes: int) -> tuple[int, int] | None:
        if not self._live:
            self._head = 0
            return (0, nbytes) if nbytes <= self.capacity else None
        tail = self._live[0].offset
        if self._head > tail or (self._head == tail and self.used == 0):
            if self.capacity - self._head >= nbytes:
                return self._head, nbytes
            if tail >= nbytes:  # wrap: skip the end of the buffer
                return 0, nbytes + (self.capacity - self._head)
            return None
        if tail - self._head >= nbytes:
            return self._head, nbytes
        return None

    def alloc(self, nbytes: int, block: bool = True) -> Slice | None:
        """Take ``nbytes`` (at a 256-byte aligned offset); wait for frees if ``block`` else
        return None when full."""
        want = nbytes
        nbytes = -(-nbytes // ALIGN) * ALIGN
        if nbytes > self.capacity:
            raise ValueError(f"{self.name}: {want} bytes asked of a ring of {self.capacity}")
        with self._cond:
            place = self._place(nbytes)
            if place is None and block:
                self._waiting_since = t0 = time.perf_counter()
                while place is None and self._failed is None:
                    self._cond.wait(timeout=1.0)
                    place = self._place(nbytes)
                self._waited_s += time.perf_counter() - t0
                self._waiting_since = None
            if self._failed is not None:
                raise self._failed
            if place is None:
                return None
            offset, charged = place
            if charged > nbytes:  # a wrap: the skipped end stays taken until the slice before it is freed
                before = id(self._live[-1])
                self._skipped[before] = self._skipped.get(before, 0) + charged - nbytes
            s = Slice(self, offset, want, nbytes)
            self._live.append(s)
            self._head = offset + nbytes  # aligned: every offset stays a multiple of ALIGN
            self.used += charged
            self.peak = max(self.peak, self.used)
            return s

    @property
    def waited_s(self) -> float:
        """Seconds producers have waited for room, including a wait in progress."""
        since = self._waiting_since
        return self._waited_s + (time.perf_counter() - since if since is not None else 0.0)

    def free(self, s: Slice) -> None:
        """Give ``s`` back. Space is reclaimed in FIFO order: a slice freed early is kept
        until every older one is free too."""
        with self._cond:
            if id(s) in self._done or not any(x is s for x in self._live):
                raise RuntimeError(f"{self.name}: slice at {s.offset} is not live (freed twice?)")
            self._done.add(id(s))
            while self._live and id(self._live[0]) in self._done:
                old = self._live.popleft()
                self._done.discard(id(old))
                self.used -= old.charged + self._skipped.pop(id(old), 0)
            self._cond.notify_all()

    def fits(self, nbytes: int) -> bool:
        with self._cond:
            return self._place(nbytes) is not None

    def fail(self, exc: BaseException) -> None:
        """Wake waiters with ``exc``: the consumer has died."""
        with self._cond:
            self._failed = exc
            self._cond.notify_all()


class CaptureBuffers:
    """The device ring, the host pool and the side stream of one capture.

    Args:
        device: where the captured tensors live.
        host_bytes: host pool size (pinned when ``device`` is CUDA): the memory bound.
        device_bytes: device ring size (CUDA only).
    """

    def __init__(self, device: torch.device | str, host_bytes: int, device_bytes: int = 0) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        pinned = self.pinned = self.cuda and torch.cuda.is_available()
        self.host = ByteRing(torch.empty(host_bytes, dtype=torch.uint8, pin_memory=pinned), "host pool")
        self.device_ring: ByteRing | None = None
        self.side_stream: Any = None
        if self.cuda:
            self.device_ring = ByteRing(torch.empty(device_bytes, dtype=torch.uint8, device=self.device), "GPU ring")
            self.side_stream = torch.cuda.Stream(device=self.device)

    @property
    def max_slice(self) -> int:
        """The largest slice both rings can always give (a quarter of the smaller)."""
        cap = self.host.capacity if self.device_ring is None else min(self.host.capacity, self.device_ring.capacity)
        return max(1, cap // 4)

    def free_bytes(self) -> int:
        """Bytes free in the fuller of the two rings."""
        free = self.host.capacity - self.host.used
        if self.device_ring is not None:
            free = min(free, self.device_ring.capacity - self.device_ring.used)
        return free

    def release(self) -> None:
        """Give the pinned pool back to the system once the capture is over (the caching host
        allocator would otherwise keep it resident)."""
        self.host.buffer = torch.empty(0, dtype=torch.uint8)
        if self.device_ring is not None:
            self.device_ring.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        if self.cuda:
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()

    def fail(self, exc: BaseException) -> None:
        self.host.fail(exc)
        if self.device_ring is not None:
            self.device_ring.fail(exc)

    def stats(self) -> dict[str, Any]:
        out = {"host_pool_bytes": self.host.capacity, "host_pool_peak_bytes": self.host.peak,
               "host_pool_wait_s": self.host.waited_s, "host_pool_pinned": self.pinned}
        if self.device_ring is not None:
            out.update(gpu_ring_bytes=self.device_ring.capacity, gpu_ring_peak_bytes=self.device_ring.peak,
                       gpu_ring_wait_s=self.device_ring.waited_s)
        return out
