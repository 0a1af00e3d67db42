"""Activation sinks: captured rows handed to the caller's code instead of a store.

Stage: the end of the capture pipeline, in place of :class:`StoreWriter`. Rows arrive in host
memory (the pinned pool on a GPU) and go straight to :meth:`ActivationSink.on_rows`, with no
compression and no disk: for online statistics, for streaming to another process, or to
measure what capture costs a model apart from storage. The tensors handed over are views of
the pipeline's buffers, valid only during the call: copy what must be kept.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from lightning_llm_inst.store.codecs import make_codec

__all__ = ["ActivationSink", "CountingSink"]


class ActivationSink:
    """Receives each forward's rows. Subclass and override the ``on_*`` methods.

    Calls for one forward come in order: :meth:`on_batch_start`, then :meth:`on_rows` for each
    hook point (a hook point's rows may come in several consecutive parts, ``start`` says where
    a part begins), then :meth:`on_batch_end` -- or :meth:`on_batch_abort` when the forward
    raised. ``on_rows`` of different hook points may run at the same time on different threads.

    With ``capture_gradients``, a backward pass also delivers, after the forward, a batch per
    forward it reaches: the same calls, with hook names ``<hook>.grad``, the forward's token
    fields plus ``forward_row`` (the index of each row among the rows this sink has received
    from forwards), one batch at a time.
    """

    codec = make_codec(None)  # rows arrive as plain row-major tensors

    def __init__(self) -> None:
        self._open: dict[str, int] | None = None
        self._rows = 0
        self._lock = threading.Lock()
        self._stats = {"batches": 0, "rows": 0, "bytes": 0, "dropped_batches": 0, "dropped_rows": 0}
        self._started = time.perf_counter()

    # ---------------------------------------------------------------- to override
    def on_batch_start(self, rows: int, tokens: dict[str, torch.Tensor]) -> None:
        """A forward begins: ``rows`` rows, with their ``input_ids``, ``sequence_id``,
        ``position`` and ``step``."""

    def on_rows(self, hook: str, rows: torch.Tensor, start: int) -> None:
        """Rows ``[start, start + len(rows))`` of ``hook`` for the open forward, ``[n, *feature]``
        on the host (a view valid only during this call)."""

    def on_batch_end(self) -> None:
        """Every hook point of the forward has been delivered."""

    def on_batch_abort(self) -> None:
        """The forward raised: forget its rows."""

    def on_close(self) -> None:
        """The capture is over."""

    # ---------------------------------------------------------------- the pipeline's side
    def begin_batch(self, rows: int, tokens: dict[str, Any] | None = None) -> None:
        self._open = {}
        self._rows = rows
        self.on_batch_start(rows, tokens or {})

    def add(self, hook: str, rows: torch.Tensor) -> None:
        if self._open is None:
            raise RuntimeError(f"rows of {hook!r} outside a forward")
        with self._lock:
            start = self._open.get(hook, 0)
            self._open[hook] = start + rows.shape[0]
            self._stats["bytes"] += rows.numel() * rows.element_size()
        self.on_rows(hook, rows, start)

    def add_packed(self, hook: str, planes: Any, dtype: str, feature_shape: tuple[int, ...]) -> None:
        raise RuntimeError("an ActivationSink takes row-major rows, not byte planes")

    def end_batch(self) -> None:
        self._open = None
        self._stats["batches"] += 1
        self._stats["rows"] += self._rows
        self.on_batch_end()

    def abort_batch(self) -> None:
        self._open = None
        self.on_batch_abort()

    def count_dropped(self, rows: int) -> None:
        self._stats["dropped_batches"] += 1
        self._stats["dropped_rows"] += rows

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.on_close()

    def stats(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._started
        return {**self._stats, "elapsed_s": elapsed,
                "rate_bytes_per_s": self._stats["bytes"] / elapsed if elapsed > 0 else 0.0}


class CountingSink(ActivationSink):
    """Counts rows and bytes per hook point and keeps nothing: activations land in host memory
    and are released at once (the cost of capture without storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows_per_hook: dict[str, int] = {}

    def on_rows(self, hook: str, rows: torch.Tensor, start: int) -> None:
        with self._lock:
            self.rows_per_hook[hook] = self.rows_per_hook.get(hook, 0) + rows.shape[0]
