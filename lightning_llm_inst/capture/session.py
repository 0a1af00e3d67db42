"""A capture session: one model, one store, one pipeline, built from a configuration.

Stage: glue between the user-facing entry points (the seed's ``InstrumentationFramework``
and the Lightning ``ActivationCapture`` callback) and the engine: it resolves hook points,
opens the store writer, sizes the rings from ``max_memory_gb`` and picks the pack
implementation, then hands back a :class:`CapturePipeline` attached to the model. With
``capture_gradients`` it also opens the gradient store, ``<output_path>/gradients`` (a sink
takes the gradient batches itself).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_llm_inst._version import __version__
from lightning_llm_inst.buffer.ring_buffer import CaptureBuffers
from lightning_llm_inst.capture.gradients import GRADIENTS_DIR, gradient_metadata
from lightning_llm_inst.capture.hooks import HookPoint, resolve_hook_points
from lightning_llm_inst.capture.memory import MemoryPlan
from lightning_llm_inst.capture.pipeline import CapturePipeline
from lightning_llm_inst.capture.sink import ActivationSink
from lightning_llm_inst.capture.tokens import TokenSelector
from lightning_llm_inst.config import InstrumentationConfig
from lightning_llm_inst.store.writer import StoreWriter

__all__ = ["gradient_store_path", "model_device", "model_metadata", "open_pipeline", "pick_impl",
           "special_token_ids"]

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """Provenance of the model: class, name and config (when it is a transformers model)."""
    meta: dict[str, Any] = {"class": type(model).__name__}
    cfg = getattr(model, "config", None)
    if cfg is not None:
        meta["name"] = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
        try:
            d = cfg.to_dict()
            meta["config"] = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}
        except Exception:  # noqa: BLE001 - provenance is best effort
            pass
    return meta


def special_token_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """``(pad ids, bos ids)`` from the first config found on ``model`` or a submodule (a
    transformers model's ``config`` and ``generation_config``)."""
    for m in model.modules():
        cfgs = [c for c in (getattr(m, "config", None), getattr(m, "generation_config", None)) if c is not None]
        if not any(hasattr(c, "pad_token_id") or hasattr(c, "bos_token_id") for c in cfgs):
            continue
        pads: set[int] = set()
        bos: set[int] = set()
        for c in cfgs:
            for ids, name in ((pads, "pad_token_id"), (bos, "bos_token_id")):
                v = getattr(c, name, None)
                for i in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                        ids.add(i)
        return pads, bos
    return set(), set()


def pick_impl(config: InstrumentationConfig, device: torch.device) -> str:
    """The pack implementation: ``"cuda"`` on a GPU when the extension builds (``buffer_impl``
    ``"auto"`` or ``"cuda"``; ``LLM_INST_PACK_IMPL`` overrides), else ``"torch"`` -- with a
    warning when ``"cuda"`` was asked for and cannot be had."""
    impl = os.environ.get("LLM_INST_PACK_IMPL", config.buffer_impl)
    if impl not in ("auto", "cuda", "torch"):
        raise ValueError(f"LLM_INST_PACK_IMPL={impl!r} is not valid; choose one of: auto, cuda, torch")
    if device.type != "cuda" or impl == "torch":
        return "torch"
    from lightning_llm_inst.buffer import _backend

    return "cuda" if _backend.cuda_available(warn=impl == "cuda") else "torch"


def _next_sequence_id(path: str | os.PathLike) -> int:
    """One past the largest ``sequence_id`` already in the store (0 if none): an appended
    capture continues the numbering so every id still names one text."""
    from lightning_llm_inst.store.format import StoreError
    from lightning_llm_inst.store.reader import ActivationStore

    try:
        store = ActivationStore(path)
    except StoreError:
        return 0
    with store:
        if not store.rows or "sequence_id" not in store.token_fields:
            return 0
        top = max(int(block.max()) for block in store.tokens["sequence_id"].iter_chunks(1 << 20))
    return top + 1


def gradient_store_path(output_path: str | os.PathLike) -> Path:
    """Where a capture into ``output_path`` with ``capture_gradients`` stores the gradients."""
    return Path(output_path) / GRADIENTS_DIR


def _remove_stale_gradients(output_path: str | os.PathLike, rank: int | None) -> None:
    """An overwritten capture without gradients removes the gradient store an earlier capture
    left there (this rank's part of it under DDP), so that no gradients of other rows remain."""
    from lightning_llm_inst.store.format import MANIFEST

    grads = gradient_store_path(output_path)
    if rank is None:
        if (grads / MANIFEST).exists() or any(grads.glob(f"rank*/{MANIFEST}")):
            shutil.rmtree(grads)
        return
    if (grads / f"rank{rank}" / MANIFEST).exists():
        shutil.rmtree(grads / f"rank{rank}")
    if rank == 0 and (grads / MANIFEST).exists():
        (grads / MANIFEST).unlink()


def open_pipeline(model: nn.Module, config: InstrumentationConfig, output_path: str | os.PathLike | None, *,
                  hook_points: list[HookPoint] | None = None, mode: str = "create", rank: int | None = None,
                  world_size: int = 1, metadata: dict[str, Any] | None = None,
                  sink: ActivationSink | None = None) -> CapturePipeline:
    """Build the pipeline for ``model`` writing to ``output_path`` (or handing rows to ``sink``)
    and attach it. With ``config.capture_gradients`` the gradients go to the store at
    :func:`gradient_store_path` (opened with the same ``mode``), or to ``sink`` too."""
    if (output_path is None) == (sink is None):
        raise ValueError(f"give exactly one of output_path (a store directory) and sink (an ActivationSink); "
                         f"got output_path={output_path!r}, sink={sink!r}")
    if sink is not None and not isinstance(sink, ActivationSink):
        raise TypeError(f"sink must be an ActivationSink, got {type(sink).__name__}")
    if hook_points is None:
        hook_points = resolve_hook_points(model, config.hook_spec, config.layers)
    device = model_device(model)
    meta = {
        "library": "lightning-llm-inst",
        "library_version": __version__,
        "model": model_metadata(model),
        "hook_spec": [hp.name for hp in hook_points],
        "hook_modules": {hp.name: hp.module_name for hp in hook_points},
        "capture_config": config.to_dict(),
        **(metadata or {}),
    }
    first_sequence = _next_sequence_id(output_path) if mode == "append" and output_path is not None else 0
    workers = config.workers()
    memory = MemoryPlan(config, len(hook_points), cuda=device.type == "cuda")
    host_bytes, writer_bytes, chunk_size = memory.sizes()  # writer_bytes: each writer's

    def store_writer(path: str | os.PathLike, metadata: dict[str, Any]) -> StoreWriter:
        return StoreWriter(path, codec=config.codec_spec, mode=mode, shard_size=config.shard_size,
                           chunk_size=chunk_size, max_buffer_bytes=writer_bytes, num_workers=workers,
                           on_full="block", rank=rank, metadata=metadata, fsync=config.fsync)

    writer: Any = sink
    gradient_writer: Any = sink if config.capture_gradients else None
    if output_path is not None:
        writer = store_writer(output_path, meta)
    try:
        if output_path is not None and config.capture_gradients:
            gradient_writer = store_writer(gradient_store_path(output_path),
                                           gradient_metadata(meta, os.fspath(output_path)))
        elif output_path is not None and mode == "overwrite":
            _remove_stale_gradients(output_path, rank)
    except BaseException:
        writer.close()
        raise
    try:
        buffers = CaptureBuffers(device, host_bytes, config.gpu_buffer_mb * 2**20 if device.type == "cuda" else 0)
        pads, bos = special_token_ids(model)
        selector = TokenSelector(config.drop_bos, config.drop_token_ids, config.position_window,
                                 pad_token_ids=pads if config.pad_token_id is None else {config.pad_token_id},
                                 bos_token_ids=bos, include_padding=config.include_padding)
        dtype = getattr(torch, config.storage_dtype) if config.storage_dtype else None
        pipeline = CapturePipeline(writer, hook_points, selector, buffers, storage_dtype=dtype,
                                   on_full=config.on_full, impl=pick_impl(config, device),
                                   sequence_offset=first_sequence + (rank or 0), sequence_stride=max(1, world_size),
                                   copy_threads=config.copy_threads, memory=memory,
                                   gradient_writer=gradient_writer)
    except BaseException:
        writer.close()
        if gradient_writer is not None and gradient_writer is not writer:
            gradient_writer.close()
        raise
    try:
        pipeline.attach(model)
    except BaseException:
        pipeline.close()  # stops its threads and closes the writer
        raise
    return pipeline
