"""The capture pipeline: forward hooks -> pack -> ring buffers -> drain thread -> store writer.

Stage: everything between a model's forward pass and :class:`StoreWriter`. A pre-hook on
the model's root module opens a "forward" (token selection from ``input_ids`` and the
attention mask -- the call bound to the forward's signature, so either may come by position --
or from a context the caller set); each hook point packs its selected rows
into the rings (:mod:`lightning_llm_inst.buffer`); a post-hook on the root closes the
forward. One drain thread replays these steps on the writer in order, so the model's thread
never waits on compression or disk -- only on ring space when the writer falls behind
(``on_full="block"``), or it skips the whole forward (``"drop"``, counted in the manifest).

During ``generate()`` with a KV cache, the prefill and every decode step are forwards of
their own: decode steps (told by whatever the call carries: a mask longer than its tokens, a
cache holding tokens, ``cache_position`` or ``position_ids``) keep the sequence ids of their
prefill, get their true positions from the attention mask (or go on from the previous
forward's where the mask does not cover the cache) and count up ``step``.

With a gradient writer (``capture_gradients``), activations that require grad also get tensor
hooks (:mod:`.gradients`): a backward pass sends their gradients, the forward's rows only,
through the same rings and drain thread to that writer, one batch per forward and backward pass.

A pipeline left open is closed at interpreter exit, before the writer's own exit handler.
"""

from __future__ import annotations

import atexit
import inspect
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_llm_inst.buffer.pack import pack_rows
from lightning_llm_inst.buffer.ring_buffer import CaptureBuffers, Slice
from lightning_llm_inst.capture.gradients import GRAD_SUFFIX, GradientTap, RowSpan, WatchedForward
from lightning_llm_inst.capture.hooks import HookHandles, HookPoint, register_hooks
from lightning_llm_inst.capture.memory import MemoryPlan
from lightning_llm_inst.capture.tokens import TokenSelection, TokenSelector
from lightning_llm_inst.store.writer import StoreWriter

__all__ = ["BatchContext", "CapturePipeline"]

log = logging.getLogger(__name__)

_MASK_ARGS = ("attention_mask", "mask", "attn_mask")
"""Names under which a root forward receives the attention mask."""
_CACHE_ARGS = ("past_key_values", "cache", "past_key_value", "layer_past")
"""Names under which transformers releases have passed the KV cache to a model's forward."""


@dataclass
class BatchContext:
    """What the caller knows of the next forward when the model is not called with
    ``input_ids`` (e.g. a LightningModule whose ``forward`` takes the batch)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None


@dataclass
class _Forward:
    sel: TokenSelection | None
    dropped: bool = False
    begun: bool = False
    fired: dict[str, int] = field(default_factory=dict)
    pending: Callable[[], TokenSelection] | None = None
    """Selection still to be made (token ids on their way to the host), at the first hook."""
    held: int = 0
    """Bytes of the first forward to a new store packed so far (held whole by the writer)."""
    row_bytes: int = 0
    """The largest row of the first forward's hook points so far."""
    span: RowSpan | None = None
    """Where the drain thread put the forward's rows (for its gradient rows)."""
    watched: WatchedForward | None = None
    """Its activations whose gradients are watched (``capture_gradients``)."""
    grad_seen: bool = False
    """An activation of the forward required grad."""


@dataclass(frozen=True)
class _Layout:
    """What a hook point's pack needs that does not change from forward to forward."""

    dtype: torch.dtype
    dtype_name: str
    feature: tuple[int, ...]
    row_elems: int
    itemsize: int
    fused: bool  # the extension's pack_copy takes it


@dataclass
class _Counters:
    forwards: int = 0
    forwards_dropped: int = 0
    rows: int = 0
    bytes_packed: int = 0
    hook_calls: int = 0
    slices: int = 0
    hook_s: float = 0.0
    gradient_batches: int = 0
    gradient_batches_dropped: int = 0
    gradient_batches_skipped: int = 0  # their forward's rows were not stored
    gradient_rows: int = 0
    gradient_bytes: int = 0
    gradient_zero_filled: int = 0  # hook points a backward pass did not reach: zero rows
    started: float = field(default_factory=time.perf_counter)


class CapturePipeline:
    """Capture hook points of one model into one store writer.

    Args:
        writer: the store writer (owned by the pipeline from now on: the drain thread calls it).
        hook_points: resolved hook points.
        selector: which tokens become rows.
        buffers: the rings; their host pool bounds the pipeline's own memory.
        storage_dtype: dtype rows are stored in; ``None`` keeps each tensor's dtype.
        on_full: ``"block"`` or ``"drop"`` when the rings are full.
        impl: pack implementation, ``"torch"`` or ``"cuda"``.
        sequence_offset, sequence_stride: sequence ids given to forwards without explicit ids
            are ``offset + k * stride`` (rank and world size under DDP keep them unique).
        copy_threads: threads copying host slices into the writer (default: several on a GPU,
            where a forward can yield tens of GB/s, one on a CPU).
        memory: how the memory cap was cut into the host pool and the writer's budget; a
            first forward that does not fit it is refused, and errors about memory name the cap
            and the least one that would do.
        gradient_writer: where the gradients of captured activations go (a second store
            writer, or ``writer`` itself for a sink); ``None``: gradients are not captured.

    Memory: the host pool and the writer's budget bound every byte the capture holds. The
    first forward to a new store is held whole by the writer (it sets the store's layout),
    counted against its budget: a first forward that cannot fit is refused at the hook point
    where it outgrows the budget, and the first forward ends only once the writer has taken
    it, so that a cap too small for the store's layout is an error of that forward.
    """

    def __init__(self, writer: StoreWriter, hook_points: list[HookPoint], selector: TokenSelector,
                 buffers: CaptureBuffers, *, storage_dtype: torch.dtype | None = None, on_full: str = "block",
                 impl: str = "torch", sequence_offset: int = 0, sequence_stride: int = 1,
                 copy_threads: int | None = None, memory: MemoryPlan | None = None,
                 gradient_writer: StoreWriter | Any | None = None) -> None:
        self.writer = writer
        self.gradient_writer = gradient_writer
        self.memory = memory
        self.hook_points = list(hook_points)
        self.selector = selector
        self.buffers = buffers
        self.storage_dtype = storage_dtype
        self.on_full = on_full
        self.impl = impl
        self.shuffle = writer.codec.shuffle and buffers.cuda  # on a CPU the writer's workers shuffle
        self._next_sequence = sequence_offset
        self._sequence_stride = sequence_stride
        self._last_sequence_ids: torch.Tensor | None = None
        self._next_position: np.ndarray | None = None  # [batch] where the last forward's sequences go on
        self._signatures: dict[int, inspect.Signature | None] = {}
        self._step = 0
        self._context: BatchContext | None = None
        self._forward: _Forward | None = None
        self._row_bytes: int | None = None  # bytes per selected row over all hook points
        self._handles: HookHandles | None = None
        self._root_handles: list[Any] = []
        self._switch_interval: float | None = None
        self._counters = _Counters()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self.enabled = True
        """False: forwards run uncaptured (e.g. batches a resumed run already stored)."""
        if copy_threads is None:
            copy_threads = min(8, max(1, (os.cpu_count() or 1) // 2)) if buffers.cuda else 1
        self._copies = ThreadPoolExecutor(copy_threads, thread_name_prefix="llm-inst-copy") if copy_threads > 1 \
            else None
        self._layouts: dict[tuple, _Layout] = {}
        self._group_rows: dict[str, int] = {}  # hook -> rows per packed group (the store's chunk rows)
        self._to_store = isinstance(writer, StoreWriter)
        # the writer has no layout yet: the first forward is held whole (see the class docstring)
        self._first_forward = self._to_store and bool(self.hook_points) and writer.chunk_rows(
            self.hook_points[0].name) is None
        self._grads = GradientTap(self) if gradient_writer is not None else None
        # the gradient writer has no layout yet: its first batch is held whole, as the first forward
        self._first_grad = self._grads is not None and isinstance(gradient_writer, StoreWriter) and bool(
            self.hook_points) and gradient_writer.chunk_rows(self.hook_points[0].name + GRAD_SUFFIX) is None
        self._grad_row_bytes: int | None = None  # bytes per gradient row over all hook points
        # drain thread: rows of the store before the next forward's; the open gradient batch is skipped
        self._rows_out = writer.rows_committed if self._to_store else 0
        self._open_span: RowSpan | None = None
        self._grad_skip = False
        self._grad_rows = 0
        self._grad_rows_sent = 0  # model side: rows of the gradient batches ended so far
        self._events: Any = None  # extension events for the fused pack + copy
        if buffers.cuda and impl == "cuda":
            from lightning_llm_inst.buffer import _backend

            self._backend = _backend
            self._events = _backend.EventPool()
            self._side_handle = buffers.side_stream.cuda_stream
            self._host_base = buffers.host.buffer.data_ptr()
        self._drain = threading.Thread(target=self._drain_loop, name="llm-inst-drain", daemon=True)
        self._drain.start()
        self._live_key = _track(self)

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """Register the root pre/post hooks and the hook points' hooks on ``model``."""
        if self._handles is not None:
            raise RuntimeError("the pipeline is already attached to a model")
        self._handles = register_hooks(model, self.hook_points, self._on_hook)
        if self.buffers.cuda:  # the model thread must not wait 5 ms for the GIL between launches
            want = float(os.environ.get("LLM_INST_SWITCH_INTERVAL_S", "0.0005"))
            self._switch_interval = sys.getswitchinterval()
            if 0 < want < self._switch_interval:
                sys.setswitchinterval(want)
        self._root_handles = [
            model.register_forward_pre_hook(self._on_root_start, with_kwargs=True),
            model.register_forward_hook(self._on_root_end),
        ]

    def detach(self) -> None:
        """Remove every hook (idempotent); a forward still open is aborted."""
        if self._forward is not None:
            self.abort_forward()
        if self._handles is not None:
            self._handles.remove()
            self._handles = None
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    @property
    def attached(self) -> bool:
        return self._handles is not None

    def set_context(self, context: BatchContext | None) -> None:
        """Token ids / mask / sequence ids for the next forwards whose root call lacks them."""
        self._context = context

    def _on_root_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._forward is not None:  # the previous forward raised before its end hook
            self.abort_forward()
        if self._grads is not None:  # a backward pass that raised left its gradient batch open
            self._grads.abandon_stale()
        self._raise_if_failed()
        if not self.enabled:
            return
        call = self._arguments(module, args, kwargs)
        input_ids = call.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            input_ids = args[0] if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point() \
                else None
        mask = next((m for m in map(call.get, _MASK_ARGS) if isinstance(m, torch.Tensor)), None)
        seq_ids = None
        ctx = self._context
        if input_ids is None:
            if ctx is None:
                raise RuntimeError(
                    "the instrumented model was called without input_ids and no batch context was set; "
                    "call it with input_ids=... or give the capture the batch's input_ids")
            input_ids, seq_ids = ctx.input_ids, ctx.sequence_ids
            mask = ctx.attention_mask if ctx.attention_mask is not None else mask
        elif ctx is not None and ctx.input_ids.shape[0] == input_ids.shape[0]:
            seq_ids = ctx.sequence_ids
            if mask is None and ctx.attention_mask is not None and _same_tensor(ctx.input_ids, input_ids):
                mask = ctx.attention_mask  # the batch's mask, for a model called with its ids alone
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
        b, t = input_ids.shape[0], input_ids.shape[-1]
        last = self._last_sequence_ids
        past = None
        if last is not None and last.numel() == b and _is_decode_step(call, t, mask):
            self._step += 1
            if mask is None or mask.shape[-1] == t:  # the mask does not cover the cached tokens
                past = self._next_position
        else:
            self._step = 0
            if seq_ids is None:
                seq_ids = self._next_sequence + self._sequence_stride * torch.arange(b, dtype=torch.int64)
                self._next_sequence += self._sequence_stride * b
            self._last_sequence_ids = _sequence_ids(seq_ids)
        device = self._device_of(module)
        seq_ids, step = self._last_sequence_ids, self._step
        if input_ids.device.type == "cuda" or (mask is not None and mask.device.type == "cuda"):
            # Copy the ids and mask to pinned memory behind the work already queued and make the
            # selection at the first hook: the GPU then still has this forward's first layers to
            # run while the host waits for the copy, instead of idling while it selects.
            ids_h = _to_pinned(input_ids)
            mask_h = _to_pinned(mask) if mask is not None else None
            ready = torch.cuda.Event()
            ready.record()

            def pending() -> TokenSelection:
                ready.synchronize()
                return self.selector.select(ids_h, mask_h, seq_ids, step=step, device=device, past=past)

            self._forward = _Forward(None, pending=pending)
            return
        self.begin_forward(self.selector.select(input_ids, mask, seq_ids, step=step, device=device, past=past))

    def _arguments(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The root call's arguments by name: positional ones bound to the forward's signature
        (cached per module), keyword ones as given (``**kwargs`` of the forward included)."""
        if not args:
            return kwargs
        key = id(module)
        sig = self._signatures.get(key, False)
        if sig is False:
            try:
                sig = inspect.signature(module.forward)
            except (TypeError, ValueError):
                sig = None
            self._signatures[key] = sig
        if sig is None:
            return kwargs
        try:
            bound = sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return kwargs
        out = dict(bound)
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(out.get(p.name), dict):
                out.update(out.pop(p.name))
        return out

    @staticmethod
    def _device_of(module: nn.Module) -> torch.device:
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def _on_root_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._forward is not None:
            self.end_forward()

    # ------------------------------------------------------------------ forwards
    def begin_forward(self, sel: TokenSelection) -> None:
        self._raise_if_failed()
        fwd = _Forward(sel)
        self._start(fwd)
        self._forward = fwd

    def _start(self, fwd: _Forward) -> None:
        """Queue the writer's ``begin`` for a forward whose selection is known (or its drop)."""
        if fwd.sel is None:
            assert fwd.pending is not None
            fwd.sel, fwd.pending = fwd.pending(), None
        self._next_position = fwd.sel.next_position
        rows = fwd.sel.rows
        if self.on_full == "drop" and rows and self._row_bytes is not None:
            if rows * self._row_bytes > self.buffers.free_bytes():
                fwd.dropped = True
                self._counters.forwards_dropped += 1
                self._commands.put(("dropped", rows))
                return
        fwd.span = RowSpan(rows)
        self._commands.put(("begin", rows, fwd.sel.tokens, fwd.span))
        fwd.begun = True

    def _on_hook(self, hp: HookPoint, x: torch.Tensor) -> None:
        fwd = self._forward
        if fwd is None or fwd.dropped:
            return
        t0 = time.perf_counter()
        if fwd.sel is None:
            self._start(fwd)
            if fwd.dropped:
                return
        sel = fwd.sel
        assert sel is not None
        b, t = sel.batch_size, sel.seq_len
        shape = x.shape
        if len(shape) >= 2 and shape[0] == b and shape[1] == t:
            feature = tuple(shape[2:]) or (1,)
        elif shape[0] == b * t:
            feature = tuple(shape[1:]) or (1,)
        else:
            raise ValueError(f"hook point {hp.name!r}: output of shape {tuple(shape)} does not start with "
                             f"[batch, seq] = [{b}, {t}] (or [batch * seq])")
        index = None if sel.all_rows else sel.index
        first = fwd if self._first_forward else None
        nbytes = self._pack_tensor(hp.name, x, b * t, index, sel.rows, feature, first)
        fwd.fired[hp.name] = fwd.fired.get(hp.name, 0) + 1
        if self._grads is not None and x.requires_grad:  # never under no_grad / inference mode
            fwd.grad_seen = True
            if sel.rows:
                if fwd.watched is None:
                    assert fwd.span is not None
                    fwd.watched = WatchedForward(sel, fwd.span)
                self._grads.watch(fwd.watched, hp.name, x, feature, b * t)
        self._counters.hook_calls += 1
        self._counters.bytes_packed += nbytes
        self._counters.hook_s += time.perf_counter() - t0

    def _pack_tensor(self, hook: str, x: torch.Tensor, tokens: int, index: torch.Tensor | None, rows: int,
                     feature: tuple[int, ...], first: Any, grad: bool = False) -> int:
        """Pack the ``rows`` rows ``index`` (None: all ``tokens``) of ``x`` (``[tokens, *feature]``
        once reshaped) for column ``hook`` of the writer (``grad``: of the gradient writer), in
        parts that fit the rings; ``first``: the batch held whole by a writer with no layout yet
        (checked against the memory cap), or None. Returns the bytes packed."""
        lay = self._layout(x, feature)
        row_bytes = lay.row_elems * lay.itemsize
        if first is not None:
            self._check_first_forward(first, hook, rows, row_bytes, grad)
        per_part = max(1, self.buffers.max_slice // max(1, row_bytes))
        group = self._groups_of(hook, self.gradient_writer if grad else self.writer) if self.shuffle else None
        if group is not None and per_part > group:  # parts of whole groups: each starts a chunk
            per_part -= per_part % group
        with torch.no_grad():
            for a in range(0, rows, per_part) if rows else [0]:
                n = min(per_part, rows - a)
                if n == rows:
                    part_index = index
                else:
                    part_index = index[a : a + n] if index is not None else torch.arange(a, a + n, device=x.device)
                self._pack_part(hook, x, tokens, part_index, lay, n * row_bytes, group, grad)
        return rows * row_bytes

    def _check_first_forward(self, fwd: Any, hook: str, rows: int, row_bytes: int, grad: bool = False) -> None:
        """Refuse, before packing it, a first forward (held whole by the writer) or a row that
        the memory cap cannot hold. ``fwd``: the forward, or the first gradient batch."""
        fwd.held += rows * row_bytes
        fwd.row_bytes = max(fwd.row_bytes, row_bytes)
        plan = self.memory
        if plan is None:
            return
        done = len(fwd.fired) + 1
        if not plan.fits(fwd.row_bytes):
            raise ValueError(self._cap_message(
                f"rows of hook point {hook!r} have {row_bytes} bytes, and the host pool must hold a row and the "
                f"store writer two chunks of at least a row per column", plan.least_gb(fwd.row_bytes)))
        if not plan.fits(fwd.row_bytes, fwd.held):
            what = "gradient batch" if grad else "batch"
            whole = fwd.held * len(self.hook_points) // done  # if the hook points still to run are alike
            raise ValueError(self._cap_message(
                f"the first {what} ({rows} rows) holds at least {fwd.held} bytes of activations ({done} of "
                f"{len(self.hook_points)} hook points), and it is held whole until it ends since it sets the "
                f"store's layout (later batches stream in chunks); capture a smaller first batch, or",
                plan.least_gb(fwd.row_bytes, max(whole, fwd.held))))

    def _cap_message(self, what: str, least: float | None) -> str:
        """One line: ``what`` does not fit the cap the user set, and the least cap that does."""
        cap = f"max_memory_gb={self.memory.max_memory_gb}" if self.memory is not None else "the capture's memory"
        sep = " set" if what.endswith(", or") else "; set"
        return f"{cap} is too small: {what}{sep} max_memory_gb to at least {least:g}" if least is not None else \
            f"{cap} is too small: {what}"

    def _explain(self, exc: BaseException) -> BaseException:
        """A writer error about its budget (``max_buffer_bytes``), restated as one about the cap
        the user set, with the least cap that would do."""
        text = str(exc)
        if self.memory is None or not isinstance(exc, ValueError) or "max_buffer_bytes=" not in text:
            return exc
        fwd_rows = max((lay.row_elems * lay.itemsize for lay in self._layouts.values()), default=0)
        staged = getattr(exc, "first_batch_bytes", None) or 0
        out = ValueError(self._cap_message(f"the store writer's share of it ({self.writer.max_buffer_bytes} bytes) "
                                           f"is short: {text}", self.memory.least_gb(fwd_rows, staged)))
        out.__cause__ = exc
        return out

    def _layout(self, x: torch.Tensor, feature: tuple[int, ...]) -> _Layout:
        key = (x.dtype, x.is_cuda, feature)
        lay = self._layouts.get(key)
        if lay is None:
            dtype = self.storage_dtype or x.dtype
            row_elems = int(np.prod(feature, dtype=np.int64))
            fused = self._events is not None and self._backend.fused_eligible(x, dtype, row_elems)
            lay = self._layouts[key] = _Layout(dtype, str(dtype).removeprefix("torch."), feature, row_elems,
                                               dtype.itemsize, fused)
        return lay

    def _groups_of(self, hook: str, writer: Any) -> int | None:
        """Rows per packed group for ``hook``: the store's chunk rows once its schema exists, so
        the writer can compress every whole chunk where it lies; before that, one group."""
        if not self._to_store:
            return None
        r = self._group_rows.get(hook)
        if r is None:
            r = writer.chunk_rows(hook)
            if r is None:
                return None
            self._group_rows[hook] = r
        return r

    def _pack_part(self, hook: str, x: torch.Tensor, tokens: int, index: torch.Tensor | None, lay: _Layout,
                   nbytes: int, group: int | None, grad: bool = False) -> None:
        bufs = self.buffers
        self._counters.slices += 1
        host = bufs.host.alloc(nbytes) if nbytes else None
        if lay.fused and host is not None:
            dev = bufs.device_ring.alloc(nbytes)  # type: ignore[union-attr]
            events = self._events
            packed, copied = events.get(), events.get()
            self._backend.pack_copy(x, tokens, index, lay.dtype, dev.ring.buffer, dev.offset, nbytes, self.shuffle,
                                    group, self._host_base + host.offset, self._side_handle, packed, copied)
            self._commands.put(("add", hook, (packed, copied), dev, host, lay, group, grad))
            return
        flat = x.reshape(tokens, *lay.feature)
        if not bufs.cuda:
            out = host.view() if host is not None else torch.empty(0, dtype=torch.uint8)
            pack_rows(flat, index, lay.dtype, out, self.shuffle, impl="torch")
            self._commands.put(("add", hook, None, None, host, lay, None, grad))
            return
        dev = bufs.device_ring.alloc(nbytes) if nbytes else None  # type: ignore[union-attr]
        out = dev.view() if dev is not None else torch.empty(0, dtype=torch.uint8, device=flat.device)
        pack_rows(flat, index, lay.dtype, out, self.shuffle, impl=self.impl, group_rows=group)
        event = None
        if nbytes:
            packed_ev = torch.cuda.Event()
            packed_ev.record()
            event = torch.cuda.Event()
            with torch.cuda.stream(bufs.side_stream):
                bufs.side_stream.wait_event(packed_ev)
                host.view().copy_(dev.view(), non_blocking=True)  # type: ignore[union-attr]
                event.record(bufs.side_stream)
        self._commands.put(("add", hook, event, dev, host, lay, group, grad))

    def end_forward(self) -> None:
        fwd = self._forward
        self._forward = None
        if fwd is None:
            return
        if fwd.sel is None:
            self._start(fwd)
        if fwd.dropped:
            return
        assert fwd.sel is not None
        missing = [hp.name for hp in self.hook_points if hp.name not in fwd.fired]
        if missing:
            self._commands.put(("abort",))
            raise RuntimeError(f"hook point(s) {missing} did not run during the forward pass; every hook point must "
                               f"run once per forward (check the hook spec against the model)")
        self._commands.put(("end",))
        c = self._counters
        c.forwards += 1
        c.rows += fwd.sel.rows
        if fwd.sel.rows:
            self._row_bytes = c.bytes_packed // max(1, c.rows)
        if self._grads is not None:
            self._grads.check_first(fwd.grad_seen)
        if self._first_forward:  # once: the writer sets the store's layout; its errors are this forward's
            self._sync(flush=False)
            self._raise_if_failed()
            self._first_forward = False

    def abort_forward(self) -> None:
        """Forget the open forward (it raised): none of its rows are stored."""
        fwd = self._forward
        self._forward = None
        if fwd is not None and fwd.begun:
            self._commands.put(("abort",))

    # ------------------------------------------------------------------ drain thread
    def _drain_loop(self) -> None:
        """Replay the model thread's steps on the writer, in order. Copies of different hook
        points into the writer run on ``copy_threads`` threads (parts of one hook point stay
        in order); a batch ends only after all its copies are done. Gradient batches (steps
        ``g*``, adds marked ``grad``) go to the gradient writer; one whose forward's rows were not
        stored is skipped."""
        w = self.writer
        gw = self.gradient_writer
        pending: list[Future] = []
        last: dict[str, Future] = {}
        while True:
            cmd = self._commands.get()
            kind = cmd[0]
            if kind == "stop":
                return
            try:
                if kind == "add":
                    _, hook, event, dev, host, lay, group, grad = cmd
                    if isinstance(event, tuple):  # extension events: (packed, copied)
                        self._events.synchronize(event[1])
                        self._events.put(event[0])
                        self._events.put(event[1])
                    elif event is not None:
                        event.synchronize()
                    if dev is not None:
                        dev.ring.free(dev)
                    if grad and self._grad_skip:
                        if host is not None:
                            host.ring.free(host)
                        continue
                    target = gw if grad else w
                    if self._copies is None or self._error is not None:
                        self._copy(hook, host, lay, group, None, target)
                    else:
                        fut = self._copies.submit(self._copy, hook, host, lay, group, last.get(hook), target)
                        last[hook] = fut
                        pending.append(fut)
                    continue
                for fut in pending:  # any other step waits for the copies before it
                    fut.result()
                pending.clear()
                last.clear()
                if self._error is not None:
                    if kind == "sync":
                        cmd[1].set()
                    continue
                if kind == "begin":
                    taken = w.begin_batch(cmd[1], tokens=cmd[2])
                    self._open_span = cmd[3] if taken is not False else None
                    if self._open_span is not None:
                        self._open_span.start = self._rows_out
                elif kind == "end":
                    w.end_batch()
                    span, self._open_span = self._open_span, None
                    if span is not None:
                        span.stored = True
                        self._rows_out += span.rows
                elif kind == "abort":
                    self._open_span = None
                    w.abort_batch()
                elif kind == "dropped":
                    w.count_dropped(cmd[1])
                elif kind == "gbegin":
                    self._begin_gradients(cmd[1], cmd[2])
                elif kind == "gend":
                    self._end_gradients(abort=False)
                elif kind == "gabort":
                    self._end_gradients(abort=True)
                elif kind == "gdropped":
                    gw.count_dropped(cmd[1])
                elif kind == "sync":
                    if cmd[2]:
                        w.flush()
                        if gw is not None and gw is not w:
                            gw.flush()
                    cmd[1].set()
            except BaseException as exc:
                self._fail(exc)
                if kind == "add":
                    for sl in (cmd[3], cmd[4]):
                        if sl is not None:
                            try:
                                sl.ring.free(sl)
                            except RuntimeError:
                                pass
                for fut in pending:
                    try:
                        fut.result()
                    except BaseException:
                        pass
                pending.clear()
                last.clear()
                if kind == "sync":
                    cmd[1].set()

    def _begin_gradients(self, tokens: dict[str, torch.Tensor], span: RowSpan) -> None:
        """Drain thread: open a gradient batch with the forward's token fields and the rows of
        the store they belong to (``forward_row``); skip it if the forward was not stored."""
        self._grad_rows = span.rows
        if not span.stored or span.start is None:
            self._grad_skip = True
            self._counters.gradient_batches_skipped += 1
            return
        fields = dict(tokens)
        fields["forward_row"] = torch.arange(span.start, span.start + span.rows, dtype=torch.int64)
        self._grad_skip = self.gradient_writer.begin_batch(span.rows, tokens=fields) is False

    def _end_gradients(self, abort: bool) -> None:
        """Drain thread: end (or abort) the open gradient batch."""
        skip, self._grad_skip = self._grad_skip, False
        if skip:
            return
        if abort:
            self.gradient_writer.abort_batch()
            return
        self.gradient_writer.end_batch()
        self._counters.gradient_batches += 1
        self._counters.gradient_rows += self._grad_rows

    def _copy(self, hook: str, host: Slice | None, lay: _Layout, group: int | None, after: Future | None,
              writer: Any) -> None:
        """Hand one host slice to ``writer``, which copies it into chunk buffers or -- whole
        chunks packed as groups -- compresses it where it lies; the slice is freed once the
        writer is done with it."""
        handed = False  # the store writer frees the slice (``release``) once it is done with it

        def release() -> None:
            if host is not None:
                host.ring.free(host)

        try:
            if after is not None:
                after.result()  # the previous part of this hook point first
            if self._error is None:
                data = host.view().numpy() if host is not None else np.empty(0, np.uint8)
                handed = self._to_store
                if self.shuffle and self._to_store:
                    planes = data if group is not None else data.reshape(lay.itemsize, -1)
                    writer.add_packed(hook, planes, lay.dtype_name, lay.feature, group_rows=group, release=release)
                elif self.shuffle:
                    writer.add_packed(hook, data.reshape(lay.itemsize, -1), lay.dtype_name, lay.feature)
                elif self._to_store:
                    writer.add(hook, _rows_view(data, lay.dtype_name, lay.feature), release=release)
                else:
                    writer.add(hook, _rows_view(data, lay.dtype_name, lay.feature))
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            if not handed:
                release()  # a sink is done with the rows when its call returns

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            exc = self._explain(exc)
            self._error = exc
            self.buffers.fail(exc)
            log.error("activation capture failed: %s", exc)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _sync(self, flush: bool) -> None:
        ev = threading.Event()
        self._commands.put(("sync", ev, flush))
        ev.wait()

    def flush(self) -> None:
        """Wait until everything captured so far is committed to the store."""
        self._sync(flush=True)
        self._raise_if_failed()

    def close(self) -> None:
        """Detach, drain, and close the writer(s) (committing every complete forward and
        gradient batch; a gradient batch whose backward pass has not ended is dropped, and
        backward passes after this store nothing).

        A pipeline still open when the interpreter exits is closed then (see ``_track``)."""
        if self._closed:
            return
        self._closed = True
        _LIVE.pop(self._live_key, None)
        self.detach()
        if self._grads is not None:
            self._grads.abandon()
        if self._drain.is_alive():  # not at a late stage of interpreter exit, where threads are frozen
            self._sync(flush=False)
            self._commands.put(("stop",))
            self._drain.join()
        if self._copies is not None:
            self._copies.shutdown(wait=True)
        try:
            self.writer.close()
        finally:
            try:
                if self.gradient_writer is not None and self.gradient_writer is not self.writer:
                    self.gradient_writer.close()
            finally:
                if self._events is not None:
                    self._events.close()
                self.buffers.release()
                if self._error is not None:
                    raise self._error

    def _close_at_exit(self) -> None:
        if self._closed:
            return
        log.warning("activation capture into %s was not closed; closing it at interpreter exit (complete "
                    "forwards are committed)", getattr(self.writer, "directory", type(self.writer).__name__))
        try:
            self.close()
        except BaseException as exc:  # noqa: BLE001 - nothing to raise to at interpreter exit
            log.error("closing the activation capture at interpreter exit failed: %s", exc)

    def stats(self) -> dict[str, Any]:
        """Per-stage counters: forwards, rows, bytes, time in hooks, rings, writer."""
        c = self._counters
        elapsed = time.perf_counter() - c.started
        out: dict[str, Any] = {
            "forwards": c.forwards,
            "forwards_dropped": c.forwards_dropped,
            "rows": c.rows,
            "bytes_captured": c.bytes_packed,
            "hook_calls": c.hook_calls,
            "slices": c.slices,
            "hook_s": c.hook_s,
            "elapsed_s": elapsed,
            "capture_rate_bytes_per_s": c.bytes_packed / elapsed if elapsed > 0 else 0.0,
        }
        if self._grads is not None:
            out.update(gradient_batches=c.gradient_batches, gradient_batches_dropped=c.gradient_batches_dropped,
                       gradient_batches_skipped=c.gradient_batches_skipped, gradient_rows=c.gradient_rows,
                       gradient_bytes_captured=c.gradient_bytes, gradient_zero_filled=c.gradient_zero_filled)
        out.update(self.buffers.stats())
        out.update({f"writer_{k}": v for k, v in self.writer.stats().items()})
        if self.gradient_writer is not None and self.gradient_writer is not self.writer:
            out.update({f"gradient_writer_{k}": v for k, v in self.gradient_writer.stats().items()})
        return out

    # ------------------------------------------------------------------ gradients (GradientTap's side)
    @property
    def closed(self) -> bool:
        return self._closed

    def queue(self, cmd: tuple) -> None:
        """Queue a step for the drain thread."""
        self._commands.put(cmd)

    def gradient_batch_dropped(self, rows: int) -> bool:
        """Whether a gradient batch of ``rows`` rows is skipped (``on_full="drop"`` with the rings
        fuller than it needs), counted in the gradient store's manifest; raises if the capture failed."""
        self._raise_if_failed()
        if self.on_full == "drop" and rows and self._grad_row_bytes is not None and \
                rows * self._grad_row_bytes > self.buffers.free_bytes():
            self._counters.gradient_batches_dropped += 1
            self._commands.put(("gdropped", rows))
            return True
        return False

    def pack_gradient(self, hook: str, grad: torch.Tensor, tokens: int, index: torch.Tensor | None, rows: int,
                      feature: tuple[int, ...], batch: Any) -> None:
        """Pack the rows ``index`` of ``grad`` into the open gradient batch ``batch``, as column ``hook``."""
        t0 = time.perf_counter()
        first = batch if self._first_grad else None
        self._counters.gradient_bytes += self._pack_tensor(hook, grad, tokens, index, rows, feature, first, grad=True)
        self._counters.hook_s += time.perf_counter() - t0

    def count_zero_filled(self) -> None:
        self._counters.gradient_zero_filled += 1

    def end_gradient_batch(self, rows: int) -> None:
        """End the open gradient batch; the first one ends once its writer has taken it, so
        that its errors (the store's layout, the memory cap) are raised by this backward pass."""
        self._commands.put(("gend",))
        self._grad_rows_sent += rows
        if self._grad_rows_sent:
            self._grad_row_bytes = self._counters.gradient_bytes // self._grad_rows_sent
        if self._first_grad:
            self._sync(flush=False)
            self._raise_if_failed()
            # still first if that batch was skipped (its forward's rows were not stored)
            self._first_grad = self.gradient_writer.chunk_rows(self.hook_points[0].name + GRAD_SUFFIX) is None


_LIVE: dict[int, CapturePipeline] = {}
_LIVE_KEYS = itertools.count()
_LIVE_LOCK = threading.Lock()
_exit_hook_registered = False


def _track(pipeline: CapturePipeline) -> int:
    """Keep ``pipeline`` on the list closed at interpreter exit until it is closed.

    The list is closed by a ``threading`` exit callback, which runs before the interpreter
    shuts down ``concurrent.futures`` pools (the store writer's compressors) and before
    ``atexit`` handlers (the writer's own close), while every worker thread still runs: the
    drain thread empties into the writer, the writer commits its complete batches, and the
    process exits with its own status, without a hang."""
    global _exit_hook_registered
    with _LIVE_LOCK:
        key = next(_LIVE_KEYS)
        _LIVE[key] = pipeline
        register = getattr(threading, "_register_atexit", None)
        if not _exit_hook_registered and register is not None:
            try:
                register(_close_live_pipelines)
                _exit_hook_registered = True
            except RuntimeError:  # the interpreter is exiting already
                pass
        if not _exit_hook_registered:  # registered after this pipeline's writer's handler: runs before it
            atexit.register(_close_live_pipelines)
    return key


def _close_live_pipelines() -> None:
    """Close every pipeline left open, newest first."""
    with _LIVE_LOCK:
        live = [_LIVE[k] for k in sorted(_LIVE, reverse=True)]
    for pipeline in live:
        pipeline._close_at_exit()


def _is_decode_step(call: dict[str, Any], seq_len: int, mask: torch.Tensor | None) -> bool:
    """Whether a root call continues the sequences of the previous one from a KV cache.

    Signals, cheapest first, whichever the call carries (their names have changed across
    transformers releases, so none is relied on alone): a mask longer than the tokens fed (the
    cached prefix is masked too, as ``generate`` does), a cache object holding tokens, a
    ``cache_position`` past 0, ``position_ids`` past 0 (the last two on a GPU only for a
    one-token step)."""
    if mask is not None and mask.dim() == 2 and mask.shape[-1] > seq_len:
        return True
    for name in _CACHE_ARGS:
        cached = _cache_length(call.get(name))
        if cached is not None:
            return cached > 0
    # reading a GPU tensor back waits for the GPU: only for one-token steps, which wait anyway
    cache_position = call.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() and \
            (cache_position.device.type == "cpu" or seq_len == 1):
        return bool(cache_position.reshape(-1)[0] > 0)
    position_ids = call.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel() and not position_ids.is_floating_point() \
            and (position_ids.device.type == "cpu" or seq_len == 1):
        return bool(position_ids.min() > 0)
    return False


def _cache_length(cache: Any) -> int | None:
    """Tokens held by a KV cache: a ``Cache`` object, or the legacy tuple of per-layer
    ``(key, value)`` tensors ``[batch, heads, tokens, head_dim]``; None if ``cache`` is neither."""
    if cache is None:
        return None
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())
    if isinstance(cache, (tuple, list)):
        first: Any = cache
        while isinstance(first, (tuple, list)) and first:
            first = first[0]
        if isinstance(first, torch.Tensor):
            return int(first.shape[-2]) if first.dim() >= 2 else 0
        return 0
    return None


def _sequence_ids(seq: Any) -> torch.Tensor:
    """``[batch]`` int64 sequence ids on the host; ids that int64 cannot hold are an error, not
    stored wrapped."""
    if isinstance(seq, torch.Tensor):
        if seq.dtype == torch.bool or seq.is_floating_point() or seq.is_complex():
            raise ValueError(f"sequence_id must hold integers, got dtype {str(seq.dtype).removeprefix('torch.')}")
        if seq.dtype not in (torch.uint64, torch.uint32):
            return seq.detach().to("cpu", torch.int64).reshape(-1)
        seq = seq.detach().cpu().numpy()
    host = np.asarray(seq)
    if host.dtype.kind not in "iu":
        raise ValueError(f"sequence_id must hold integers, got dtype {host.dtype}")
    if host.dtype.kind == "u" and host.size and host.max() > np.iinfo(np.int64).max:
        raise ValueError(f"sequence_id={int(host.max())} is not valid; sequence ids must fit int64 "
                         f"(at most {np.iinfo(np.int64).max})")
    return torch.from_numpy(host.astype(np.int64).reshape(-1))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are views of the same elements (no data is read)."""
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr()
                      and a.stride() == b.stride())


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of ``t``, queued on the current stream (no wait)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


def _rows_view(data: np.ndarray, dtype_name: str, feature: tuple[int, ...]) -> Any:
    """Row-major packed bytes as a tensor of the logical dtype, ``[rows, *feature]``."""
    t = torch.from_numpy(data)
    return t.view(getattr(torch, dtype_name)).reshape(-1, *feature) if t.numel() else \
        torch.empty((0, *feature), dtype=getattr(torch, dtype_name))
