"""Gradients of captured activations: tensor hooks -> gradient batches through the pipeline.

Stage: beside the forward hooks of :mod:`.pipeline` (``capture_gradients``). Each captured
activation that requires grad gets a tensor hook. When a backward pass (any: a loss, a metric,
``torch.autograd.grad``) reaches it, its gradient ``[batch, seq, ...]`` takes the rows the
forward kept (the same token selection: padding, BOS, ids and window filters) through the same
pack, rings and drain thread as activations, into a second writer, as column ``<hook>.grad``.

One forward reached by one backward pass is one gradient batch: it opens at the first gradient
that arrives, streams each hook point's rows as they come (the last layer first) and ends when
the backward pass ends (an autograd engine callback). Hook points the pass did not reach get
zero rows, their gradient when the output does not depend on them. The batch carries the
forward's token fields plus ``forward_row``, the row of the activation store each gradient row
belongs to. A forward that no backward reaches writes no gradient rows; a forward whose rows
were not stored (dropped, aborted) writes none either.

A backward pass that reaches several captured forwards (losses of two forwards summed) streams
the first one reached; the others keep their selected rows on the device until the pass ends,
then go through the rings one after the other.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lightning_llm_inst.capture.tokens import TokenSelection

if TYPE_CHECKING:
    from lightning_llm_inst.capture.pipeline import CapturePipeline

__all__ = ["GRADIENTS_DIR", "GRAD_SUFFIX", "GradientTap", "RowSpan"]

log = logging.getLogger(__name__)

GRAD_SUFFIX = ".grad"
"""A hook point's gradient column is ``<hook name>.grad``."""
GRADIENTS_DIR = "gradients"
"""The gradient store of a capture into ``path`` is ``path/gradients``."""


@dataclass
class RowSpan:
    """Where a forward's rows went in the activation store (set by the drain thread)."""

    rows: int
    start: int | None = None
    """Row of the store (of this rank's folder under DDP) where the forward's rows begin."""
    stored: bool = False
    """The writer took the whole forward (not dropped, not aborted)."""


@dataclass(frozen=True)
class _Shape:
    """What a hook point's gradient needs from its forward: rows and their layout."""

    tokens: int  # batch * seq of the tensor
    feature: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(eq=False)
class WatchedForward:
    """The activations of one forward whose gradients are watched."""

    sel: TokenSelection
    span: RowSpan
    shapes: dict[str, _Shape] = field(default_factory=dict)


@dataclass(eq=False)
class _Pass:
    """One forward's gradients in one backward pass (one gradient batch)."""

    fwd: WatchedForward
    fired: dict[str, int] = field(default_factory=dict)
    held: int = 0  # first gradient batch: bytes packed so far (held whole by the writer)
    row_bytes: int = 0
    kept: dict[str, torch.Tensor] | None = None  # waiting for the pass to end: hook -> [rows, *feature]
    dropped: bool = False


def _graph_task() -> int:
    """Id of the backward pass now running (autograd's graph task)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else 0


class GradientTap:
    """The tensor hooks and the gradient batches of one pipeline."""

    def __init__(self, pipeline: CapturePipeline) -> None:
        self._p = pipeline
        self._task: int | None = None  # the backward pass being captured
        self._passes: dict[int, _Pass] = {}  # id(WatchedForward) -> its pass, this backward pass
        self._open: _Pass | None = None  # streaming into the writer
        self._waiting: list[_Pass] = []  # reached by the same backward pass while another streams
        self.checked = False  # the first forward was checked for activations requiring grad
        # tensor hooks run on autograd's device threads (one per device a model spans)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ forward side
    def watch(self, fwd: WatchedForward, hook: str, x: torch.Tensor, feature: tuple[int, ...], tokens: int) -> None:
        """Hook ``x`` (an activation of ``fwd`` that requires grad)."""
        fwd.shapes[hook] = _Shape(tokens, feature, x.dtype, x.device)
        x.register_hook(lambda grad: self._on_grad(fwd, hook, grad))

    def check_first(self, seen: bool) -> None:
        """After the first captured forward: warn once if none of its activations required grad."""
        if self.checked:
            return
        self.checked = True
        if not seen:
            from lightning.fabric.utilities.rank_zero import rank_zero_warn

            rank_zero_warn("capture_gradients=True, but no captured activation of the first batch requires grad "
                           "(it ran under torch.no_grad() or inference mode, as Lightning's validate / test / predict "
                           "loops do): such batches store no gradients")

    # ------------------------------------------------------------------ backward side
    def _on_grad(self, fwd: WatchedForward, hook: str, grad: torch.Tensor) -> None:
        if self._p.closed:
            return
        with self._lock:
            self._take(fwd, hook, grad)

    def _take(self, fwd: WatchedForward, hook: str, grad: torch.Tensor) -> None:
        task = _graph_task()
        if task != self._task:  # a new backward pass (one that raised left its batch open)
            self.abandon()
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        ps = self._passes.get(id(fwd))
        if ps is None:
            ps = self._passes[id(fwd)] = _Pass(fwd)
            if self._open is None:
                self._begin(ps)
            else:
                ps.kept = {}
                self._waiting.append(ps)
        if ps.dropped:
            return
        try:
            if ps.kept is not None:
                shape = fwd.shapes[hook]
                with torch.no_grad():
                    flat = grad.detach().reshape(shape.tokens, *shape.feature)  # [batch * seq, *feature]
                    sel = fwd.sel
                    ps.kept[hook] = flat.clone() if sel.all_rows else flat.index_select(0, sel.index)
                ps.fired[hook] = 1
                return
            self._pack(ps, hook, grad, fwd.shapes[hook].tokens, None if fwd.sel.all_rows else fwd.sel.index)
        except BaseException:
            self.abandon()
            raise

    def _begin(self, ps: _Pass) -> None:
        """Open the gradient batch of ``ps`` in the writer (or drop it, ``on_full="drop"``)."""
        sel = ps.fwd.sel
        if self._p.gradient_batch_dropped(sel.rows):
            ps.dropped = True
            return
        self._p.queue(("gbegin", sel.tokens, ps.fwd.span))
        self._open = ps

    def _pack(self, ps: _Pass, hook: str, grad: torch.Tensor, tokens: int, index: torch.Tensor | None) -> None:
        shape = ps.fwd.shapes[hook]
        self._p.pack_gradient(hook + GRAD_SUFFIX, grad, tokens, index, ps.fwd.sel.rows, shape.feature, ps)
        ps.fired[hook] = 1

    def _finish(self, ps: _Pass) -> None:
        """Zero rows for the hook points the pass did not reach, then end the batch."""
        fwd = ps.fwd
        for hook, shape in fwd.shapes.items():
            if hook not in ps.fired:
                zeros = torch.zeros((fwd.sel.rows, *shape.feature), dtype=shape.dtype, device=shape.device)
                self._pack(ps, hook, zeros, fwd.sel.rows, None)
                self._p.count_zero_filled()
        self._open = None
        self._p.end_gradient_batch(ps.fwd.sel.rows)

    def _end_pass(self) -> None:
        """The backward pass has ended: end the streaming batch, then the waiting ones."""
        with self._lock:
            self._end_pass_locked()

    def _end_pass_locked(self) -> None:
        try:
            if self._open is not None and not self._open.dropped:
                self._finish(self._open)
            for ps in self._waiting:
                self._open = None
                self._begin(ps)
                if ps.dropped:
                    continue
                kept, ps.kept = ps.kept or {}, None
                for hook, rows in kept.items():
                    self._pack(ps, hook, rows, rows.shape[0], None)
                self._finish(ps)
        except BaseException:
            self.abandon()
            raise
        self._reset()

    def abandon_stale(self) -> None:
        """Abort the batch of a backward pass that raised, before a new forward begins."""
        with self._lock:
            if self._task is not None and _graph_task() != self._task:
                self.abandon()

    def abandon(self) -> None:
        """Forget the gradients of the pass now open (it raised, or the capture closes): the
        batch being streamed is aborted, none of its rows are stored."""
        with self._lock:
            if self._open is not None:
                self._p.queue(("gabort",))
            self._reset()

    def _reset(self) -> None:
        self._task = None
        self._passes = {}
        self._open = None
        self._waiting = []


def gradient_metadata(metadata: dict[str, Any], forward_store: str) -> dict[str, Any]:
    """Provenance of a gradient store: the capture's, marked as gradients of ``forward_store``."""
    return {**metadata, "gradients": {"of": forward_store, "suffix": GRAD_SUFFIX, "row_field": "forward_row"}}
