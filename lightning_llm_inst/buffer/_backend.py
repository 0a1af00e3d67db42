"""Loads the CUDA pack extension once, or says why the torch path is used instead.

Stage: the pack step's fast path. ``extensions/csrc/pack.cu`` is compiled on first use with
``torch.utils.cpp_extension.load`` into a cache directory tagged by the torch, CUDA and GPU
architecture versions (``LLM_INST_EXT_DIR`` overrides the root), under a lock that gives up
after ``LLM_INST_EXT_LOCK_TIMEOUT`` seconds (default 600). A build that fails or times out
logs a warning and leaves the torch path in place; nothing fails at import.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["EventPool", "cuda_available", "extension_dir", "fused_eligible", "load_extension", "pack_copy",
           "pack_rows_cuda"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parents[2] / "extensions" / "csrc" / "pack.cu"
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lock = threading.Lock()
_module: Any = None
_failure: str | None = None


def extension_dir() -> Path:
    """Where the compiled extension lives: one folder per torch / CUDA / GPU architecture."""
    root = Path(os.environ.get("LLM_INST_EXT_DIR", Path.home() / ".cache" / "lightning_llm_inst" / "ext"))
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{major}{minor}"
    return root / tag


def _build() -> Any:
    from torch.utils.cpp_extension import load

    if not _SOURCE.exists():
        raise FileNotFoundError(f"the CUDA source {_SOURCE} is missing (installed without extensions/?)")
    build_dir = extension_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("LLM_INST_EXT_LOCK_TIMEOUT", "600"))
    with open(build_dir / ".build.lock", "w") as lock:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"waited {timeout:.0f} s for the build lock in {build_dir}") from None
                time.sleep(0.5)
        major, minor = torch.cuda.get_device_capability()
        t1 = time.perf_counter()
        mod = load(name="llm_inst_pack", sources=[str(_SOURCE)], build_directory=str(build_dir),
                   extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
                   extra_cflags=["-O3"], verbose=False)
        log.info("CUDA pack extension ready in %.1f s (%s)", time.perf_counter() - t1, build_dir)
        return mod


def load_extension() -> Any:
    """The compiled module, building it on first call; raises if it cannot be had."""
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise RuntimeError(_failure)
        if not torch.cuda.is_available():
            _failure = "no CUDA device"
            raise RuntimeError(_failure)
        try:
            _module = _build()
        except Exception as exc:
            _failure = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(_failure) from exc
        return _module


def cuda_available(warn: bool = True) -> bool:
    """True if the extension is (or can be) loaded; otherwise warn once and return False."""
    try:
        load_extension()
        return True
    except RuntimeError as exc:
        if warn:
            warnings.warn(f"CUDA pack extension unavailable ({exc}); using the torch pack path", stacklevel=2)
        return False


def pack_rows_cuda(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor,
                   shuffle: bool, group_rows: int | None = None) -> torch.Tensor:
    """Same contract and bytes as :func:`~lightning_llm_inst.buffer.pack.pack_rows_torch`."""
    if dtype not in _OUT_CODES:
        raise ValueError(f"storage dtype must be float32, float16 or bfloat16, got {dtype}")
    if group_rows is not None and (isinstance(group_rows, bool) or not isinstance(group_rows, int) or group_rows < 1):
        raise ValueError(f"group_rows must be None or a positive integer, got {group_rows!r}")
    rows2d = x.reshape(x.shape[0], -1) if x.dim() != 2 else x  # [tokens, F]
    if rows2d.dtype not in _OUT_CODES or out.data_ptr() % 16 or rows2d.shape[1] % 4:
        # the kernel takes 4 elements a thread into aligned output; anything else: torch path
        from lightning_llm_inst.buffer.pack import pack_rows_torch

        return pack_rows_torch(x, index, dtype, out, shuffle, group_rows)
    has_index = index is not None
    idx = index.contiguous() if has_index else out.new_empty(0, dtype=torch.long)
    rows = idx.numel() if has_index else rows2d.shape[0]
    groups = group_rows if shuffle and group_rows is not None and group_rows < rows else 0
    load_extension().pack_rows(rows2d, idx, has_index, _OUT_CODES[dtype], out, shuffle, groups)
    n = rows * rows2d.shape[1]
    return out.view(dtype.itemsize, n) if shuffle and not groups else out


def fused_eligible(x: torch.Tensor, dtype: torch.dtype, row_elems: int) -> bool:
    """True if :func:`pack_copy` takes this tensor (else: the torch pack and a torch copy)."""
    return x.is_cuda and x.dtype in _OUT_CODES and dtype in _OUT_CODES and row_elems % 4 == 0


def pack_copy(x: torch.Tensor, tokens: int, index: torch.Tensor | None, dtype: torch.dtype, ring: torch.Tensor,
              offset: int, nbytes: int, shuffle: bool, group_rows: int | None, host_ptr: int, side_stream: int,
              packed_event: int, copied_event: int) -> None:
    """One hook's GPU step in one extension call: pack ``x`` (``[tokens, F]`` once reshaped)
    into ``ring[offset : offset + nbytes]`` on the current stream, then copy that slice to the
    pinned address ``host_ptr`` on ``side_stream`` after ``packed_event``, recording
    ``copied_event`` behind the copy. Bytes as :func:`pack_rows_cuda`; the caller checked
    :func:`fused_eligible` and that ``offset`` is 16-byte aligned."""
    rows = index.numel() if index is not None else tokens
    groups = group_rows if shuffle and group_rows is not None and group_rows < rows else 0
    _module.pack_copy(x, tokens, index, _OUT_CODES[dtype], ring, offset, nbytes, shuffle, groups, host_ptr,
                      side_stream, packed_event, copied_event)


class EventPool:
    """Reusable CUDA events (raw handles from the extension) for :func:`pack_copy`: making
    and destroying an event per slice would cost a driver call each."""

    def __init__(self) -> None:
        self._mod = load_extension()
        self._free: list[int] = []
        self._all: list[int] = []
        self._lock = threading.Lock()

    def get(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
        e = self._mod.event_create()
        with self._lock:
            self._all.append(e)
        return e

    def put(self, e: int) -> None:
        with self._lock:
            self._free.append(e)

    def synchronize(self, e: int) -> None:
        """Wait for ``e`` (the GIL is released meanwhile)."""
        self._mod.event_synchronize(e)

    def close(self) -> None:
        """Destroy every event (call once nothing waits on them)."""
        with self._lock:
            events, self._all, self._free = self._all, [], []
        for e in events:
            self._mod.event_destroy(e)
