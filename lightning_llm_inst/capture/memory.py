"""How a capture's memory cap (``max_memory_gb``) is cut, and what a capture needs of it.

Stage: sizing, before and during the first forward. The cap is split between the host pool
(the pipeline's ring) and the store writer's budget (``InstrumentationConfig.memory_split``);
the writer's chunk size is picked to fit its budget. Every byte the capture holds is in one of
the two, including the first forward to a new store, which the writer holds whole until it ends
(that forward sets the store's layout; later forwards stream through in chunks). A capture
with ``capture_gradients`` has two writers (activations, gradients) with half the budget
each. From the rows a capture produces, :meth:`MemoryPlan.fits` says whether a cap holds it and
:meth:`MemoryPlan.least_gb` finds the least cap that does, for errors that name a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lightning_llm_inst.config import InstrumentationConfig
from lightning_llm_inst.store.format import parse_bytes

__all__ = ["MemoryPlan", "TOKEN_FIELDS", "default_chunk_size"]

TOKEN_FIELDS = 4
"""Token columns of a capture: input_ids, sequence_id, position, step (and ``forward_row`` in a
gradient store)."""
MIN_CHUNK = 4096
POOL_MAX = 64 * 2**20
"""The writer keeps ``min(POOL_MAX, budget // 8)`` of its budget for reusable chunk buffers."""


def default_chunk_size(cuda: bool, writer_bytes: int, hooks: int, workers: int,
                       token_fields: int = TOKEN_FIELDS) -> int:
    """4 MiB on a GPU, 1 MiB on a CPU -- or less, down to 4 KiB, where the writer's budget
    could not hold the chunks of every column at that size (two per column and one more, one
    per worker, and its pool of reusable buffers)."""
    size = 4 * 2**20 if cuda else 2**20
    room = writer_bytes - min(POOL_MAX, writer_bytes // 8) - workers * 1024
    fits = int(room / (2 * (hooks + token_fields) + 1 + workers * (1 + 1 / 128)))
    return size if fits >= size else max(MIN_CHUNK, fits // MIN_CHUNK * MIN_CHUNK)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory of a capture of ``hooks`` hook points under ``config`` (``cuda``: the
    model is on a GPU, where chunks are larger)."""

    config: InstrumentationConfig
    hooks: int
    cuda: bool = False

    @property
    def max_memory_gb(self) -> float:
        return self.config.max_memory_gb

    @property
    def writers(self) -> int:
        """Store writers sharing the writer budget: 2 with ``capture_gradients``, else 1."""
        return 2 if self.config.capture_gradients else 1

    @property
    def columns(self) -> int:
        """Columns of the larger store: the hook points and the token fields."""
        return self.hooks + TOKEN_FIELDS + (self.writers - 1)

    def sizes(self, gb: float | None = None) -> tuple[int, int, int]:
        """``(host pool bytes, budget bytes of each writer, chunk size)`` under a cap of ``gb``
        (default: the configured one)."""
        cfg = self.config if gb is None else replace(self.config, max_memory_gb=gb)
        host, writer = cfg.memory_split()
        writer //= self.writers
        chunk = parse_bytes(cfg.chunk_size, "chunk_size") if cfg.chunk_size is not None else \
            default_chunk_size(self.cuda, writer, self.hooks, cfg.workers(), self.columns - self.hooks)
        return host, writer, chunk

    def fits(self, row_bytes: int, first_batch_bytes: int = 0, gb: float | None = None) -> bool:
        """Whether a cap of ``gb`` holds rows of up to ``row_bytes`` bytes (one hook point's
        row) and a first batch of ``first_batch_bytes``: the host pool holds a row, and each
        writer holds, besides its workers' share and its pool, the whole first batch with an
        open chunk per column and one more -- or two chunks per column and one more."""
        host, writer, chunk = self.sizes(gb)
        if row_bytes > host:
            return False
        biggest = max(chunk, row_bytes)  # a chunk holds chunk // row rows, at least one
        workers = self.config.workers()
        columns = self.columns
        fixed = workers * (biggest + biggest // 128 + 1024) + min(POOL_MAX, writer // 8)
        return fixed + max((2 * columns + 1) * biggest, first_batch_bytes + (columns + 1) * biggest) <= writer

    def least_gb(self, row_bytes: int, first_batch_bytes: int = 0) -> float:
        """The least cap (to the MB) that :meth:`fits` these rows."""
        lo, hi = 0.0, max(0.017, self.max_memory_gb)
        while not self.fits(row_bytes, first_batch_bytes, hi):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                return hi
        while hi - lo > 0.001:
            mid = (lo + hi) / 2
            if mid >= 0.017 and self.fits(row_bytes, first_batch_bytes, mid):
                hi = mid
            else:
                lo = mid
        return math.ceil(hi * 1000) / 1000
