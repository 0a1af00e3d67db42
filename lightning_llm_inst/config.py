"""Configuration of a capture: which hook points, which tokens, how they are stored.

Stage: the user's entry point. :class:`InstrumentationConfig` is validated here once, with
messages that name the field, the value and what is allowed; it derives the writer's worker
count and the memory split from ``target_throughput_gbps`` and ``max_memory_gb``.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["HookGranularity", "InstrumentationConfig"]

GB = 10**9
#: per-worker encode rates inside a running capture (GB/s of raw bf16 activations), used to
#: size the worker pool; measured on the H100 host by benchmarks/capture.py
CORE_RATES_GBPS = {None: 1.6, "none": 1.6, "lz4": 0.25, "zstd": 0.18}
#: share of max_memory_gb given to the host pool (pinned on a GPU); the writer's buffers get the rest
HOST_POOL_SECONDS = 0.25
HOST_POOL_SHARE = 0.25


class HookGranularity(str, enum.Enum):
    """Which hook points of each transformer block a capture takes."""

    ALL = "all"
    """Residual stream (block outputs), attention outputs and MLP outputs."""
    ATTENTION_ONLY = "attention_only"
    """Attention sub-layer outputs only."""
    FFN_ONLY = "ffn_only"
    """MLP / feed-forward sub-layer outputs only."""
    RESIDUAL = "residual"
    """Block outputs (the residual stream after each block) only."""


_COMPRESSION = ("lz4", "zstd", None)
_ON_FULL = ("block", "drop")
_IMPLS = ("auto", "cuda", "torch")
_STORAGE_DTYPES = (None, "float32", "float16", "bfloat16")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"InstrumentationConfig.{name}={value!r} is not valid; {allowed}")


@dataclass
class InstrumentationConfig:
    """What to capture and how to store it.

    The first four fields are the seed API; the rest have defaults that suit most runs.
    """

    granularity: HookGranularity = HookGranularity.ALL
    """Which hook points of every layer: ALL, ATTENTION_ONLY, FFN_ONLY or RESIDUAL."""
    compression_algorithm: Literal["lz4", "zstd"] | None = "zstd"
    """``"lz4"``, ``"zstd"`` or ``None`` (no compression)."""
    target_throughput_gbps: float = 2.0
    """Raw GB/s of activations the capture should sustain; sizes the compression pool."""
    max_memory_gb: float = 4.0
    """Host memory the capture may hold (host pool + writer buffers), in GB."""
    hooks: str | list[str] | None = None
    """Explicit hook spec instead of ``granularity``: TransformerLens names
    (``blocks.*.hook_resid_post``), globs over module names, or granularity names."""
    layers: int | list[int] | str | None = None
    """Layer selection: an int, a list, or text such as ``"0-5,10"``; ``None`` for all."""
    compression_level: int | None = None
    """Zstd level (1-22); ``None`` means 1 (fast) for captures."""
    shuffle: bool = True
    """Byte-shuffle chunks before compressing (HDF5 filter 2)."""
    storage_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Store rows as ``"float32"``, ``"float16"`` or ``"bfloat16"``; ``None`` keeps the model's dtype."""
    on_full: Literal["block", "drop"] = "block"
    """When buffers are full: ``"block"`` (wait; nothing lost) or ``"drop"`` (skip the batch, counted)."""
    drop_bos: bool = False
    """Do not store position 0 of each sequence."""
    drop_token_ids: list[int] = field(default_factory=list)
    """Token ids never stored (e.g. pad or special tokens)."""
    position_window: tuple[int, int | None] | None = None
    """Keep only positions ``start <= p < stop``."""
    shard_size: int | str = "256MiB"
    """Raw bytes per shard (what a crash can lose at most)."""
    chunk_size: int | str | None = None
    """Raw bytes per HDF5 chunk (the unit of compression). ``None``: 4 MiB when the model is
    on a GPU (captures of GB/s: fewer, larger chunks cost less per byte to compress, check and
    write), 1 MiB on a CPU."""
    num_workers: int | None = None
    """Compression threads; ``None`` derives them from ``target_throughput_gbps``."""
    buffer_impl: Literal["auto", "cuda", "torch"] = "auto"
    """Pack step: ``"auto"`` (CUDA kernel when it builds, else torch), ``"cuda"`` or ``"torch"``."""
    gpu_buffer_mb: int = 512
    """Size of the GPU ring (CUDA only), in MiB."""
    copy_threads: int | None = None
    """Threads copying captured rows into the writer; ``None``: several on a GPU, one on a CPU."""
    fsync: bool = True
    """Make every shard durable before it is listed."""
    include_padding: bool = False
    """Store every position of a forward that reaches the model with no attention mask. By
    default such a forward is refused when its rows begin or end with the pad token (padding
    cannot be told from text); with a mask, masked positions are never stored."""
    pad_token_id: int | None = None
    """Id the inputs are padded with; ``None`` takes the model config's (and generation
    config's) ``pad_token_id``."""
    capture_gradients: bool = False
    """Also store the gradient of every captured activation that requires grad, as column
    ``<hook>.grad`` of a second store (``<output_path>/gradients``), written when a backward
    pass reaches it: the same rows as the forward, plus a ``forward_row`` token field. A batch
    that no backward reaches stores no gradient rows; under ``torch.no_grad()`` or inference
    mode nothing is hooked. The writer's share of ``max_memory_gb`` is split between the two
    stores."""

    def __post_init__(self) -> None:
        g = self.granularity
        if isinstance(g, str) and not isinstance(g, HookGranularity):
            try:
                self.granularity = HookGranularity(g.lower()) if g.lower() in {x.value for x in HookGranularity} \
                    else HookGranularity[g.upper()]
            except KeyError:
                _fail("granularity", g, f"choose one of: {', '.join(x.name for x in HookGranularity)}")
        elif not isinstance(g, HookGranularity):
            _fail("granularity", g, f"choose one of: {', '.join(x.name for x in HookGranularity)}")
        if self.compression_algorithm not in _COMPRESSION:
            _fail("compression_algorithm", self.compression_algorithm, "choose one of: 'lz4', 'zstd', None")
        for name in ("target_throughput_gbps", "max_memory_gb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, v, "use a positive number")
        if self.compression_level is not None:
            if self.compression_algorithm != "zstd":
                _fail("compression_level", self.compression_level, "only zstd has levels; leave it None")
            if isinstance(self.compression_level, bool) or not isinstance(self.compression_level, int) \
                    or not 1 <= self.compression_level <= 22:
                _fail("compression_level", self.compression_level, "use an integer from 1 to 22")
        if self.storage_dtype not in _STORAGE_DTYPES:
            _fail("storage_dtype", self.storage_dtype, "choose one of: None, 'float32', 'float16', 'bfloat16'")
        if self.on_full not in _ON_FULL:
            _fail("on_full", self.on_full, "choose one of: 'block', 'drop'")
        if self.buffer_impl not in _IMPLS:
            _fail("buffer_impl", self.buffer_impl, "choose one of: 'auto', 'cuda', 'torch'")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 1):
            _fail("num_workers", self.num_workers, "use a positive integer or None")
        if self.copy_threads is not None and (isinstance(self.copy_threads, bool) or
                                              not isinstance(self.copy_threads, int) or self.copy_threads < 1):
            _fail("copy_threads", self.copy_threads, "use a positive integer or None")
        if isinstance(self.gpu_buffer_mb, bool) or not isinstance(self.gpu_buffer_mb, int) or self.gpu_buffer_mb < 1:
            _fail("gpu_buffer_mb", self.gpu_buffer_mb, "use a positive integer")
        if self.position_window is not None:
            self.position_window = tuple(self.position_window)  # type: ignore[assignment]
        if not isinstance(self.include_padding, bool):
            _fail("include_padding", self.include_padding, "use True or False")
        if not isinstance(self.capture_gradients, bool):
            _fail("capture_gradients", self.capture_gradients, "use True or False")
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or
                                              not isinstance(self.pad_token_id, int) or self.pad_token_id < 0):
            _fail("pad_token_id", self.pad_token_id, "use a non-negative token id or None")
        if self.max_memory_gb * GB < 16 * 2**20:
            _fail("max_memory_gb", self.max_memory_gb, "use at least 0.017 (16 MiB)")

    # ------------------------------------------------------------------ derived
    @property
    def codec_spec(self) -> str:
        """The store codec, e.g. ``"zstd:1"`` (shuffle on) or ``"lz4-noshuffle"``."""
        name = self.compression_algorithm
        if name is None:
            return "none"
        level = f":{self.compression_level or 1}" if name == "zstd" else ""
        return f"{name}{level}" + ("" if self.shuffle else "-noshuffle")

    @property
    def hook_spec(self) -> Any:
        return self.hooks if self.hooks is not None else self.granularity

    def workers(self) -> int:
        """Compression threads for ``target_throughput_gbps`` (at least 1, at most CPUs - 1)."""
        if self.num_workers is not None:
            return self.num_workers
        rate = CORE_RATES_GBPS[self.compression_algorithm]
        cpus = os.cpu_count() or 1
        return max(1, min(max(1, cpus - 1), 32, math.ceil(self.target_throughput_gbps / rate)))

    def memory_split(self) -> tuple[int, int]:
        """``(host pool bytes, writer buffer bytes)`` within ``max_memory_gb``.

        The host pool (pinned on a GPU, where pinning costs about 0.5 s per GB at open) holds
        what arrives in a quarter second at ``target_throughput_gbps``, at least 256 MiB and at
        most a quarter of the budget; the writer's buffers get the rest."""
        total = int(self.max_memory_gb * GB)
        want = max(256 * 2**20, int(HOST_POOL_SECONDS * self.target_throughput_gbps * GB))
        host = min(int(total * HOST_POOL_SHARE), want)
        return host, total - host

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["granularity"] = self.granularity.name
        return d
