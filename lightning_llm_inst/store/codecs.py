"""Chunk codecs of the store: byte shuffle, then LZ4 / Zstd / nothing.

Stage: compression workers. A codec turns the raw bytes of one HDF5 chunk into the exact
bytes that HDF5's own filter pipeline would have stored for it, so the writer can hand them
to ``write_direct_chunk`` and any ``h5py`` + ``import hdf5plugin`` reads the file back:

* shuffle, HDF5 filter id 2: byte ``b`` of every element, for ``b`` in ``0..itemsize-1``;
  nothing is done for 1-byte elements or a chunk of one element (as HDF5 does);
* LZ4, filter id 32004: 8-byte big-endian original size, 4-byte big-endian block size, then
  per block a 4-byte big-endian compressed size and the LZ4 *block* payload; a block that
  does not shrink is stored raw, its recorded size equal to its raw size;
* Zstd, filter id 32015: one zstd frame whose header carries the content size.

Codecs are immutable value objects, validated at construction, that also give the keyword
arguments declaring the same filter pipeline on an ``h5py`` dataset. :meth:`Codec.encode_many`
encodes a run of chunks in one call (native threads for zstd), with the same bytes.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CODEC_NAMES",
    "FILTER_LZ4",
    "FILTER_SHUFFLE",
    "FILTER_ZSTD",
    "Codec",
    "make_codec",
    "shuffle_bytes",
    "unshuffle_bytes",
]

FILTER_SHUFFLE = 2
FILTER_LZ4 = 32004
FILTER_ZSTD = 32015

CODEC_NAMES = ("none", "lz4", "zstd")
ZSTD_LEVELS = range(1, 23)  # the HDF5 zstd filter clamps to 1..22
DEFAULT_ZSTD_LEVEL = 1  # fast; the ratio of level 3 is no better on activations
LZ4_MAX_BLOCK = (1 << 31) - 1  # LZ4 blocks must stay below 2 GiB

_THREAD = threading.local()
_LZ4_HEADER = struct.Struct(">QI")
_LZ4_BLOCK_SIZE = struct.Struct(">I")


def shuffle_bytes(raw: np.ndarray | bytes | memoryview, itemsize: int) -> np.ndarray:
    """Return the chunk's bytes regrouped as HDF5's shuffle filter stores them.

    ``raw`` holds ``n`` elements of ``itemsize`` bytes; the result holds byte 0 of every
    element, then byte 1 of every element, and so on. Returned as a new ``uint8`` array.
    """
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else \
        np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = buf.size // itemsize if itemsize else 0
    if itemsize <= 1 or n <= 1:
        return buf.copy()
    out = np.empty(buf.size, dtype=np.uint8)
    body = n * itemsize
    if itemsize in (2, 4, 8):  # shifts and masks on whole words beat a byte transpose
        words = buf[:body].view(f"<u{itemsize}")
        for b in range(itemsize):
            plane = out[b * n : (b + 1) * n]
            if b == 0:
                np.bitwise_and(words, 0xFF, out=plane, casting="unsafe")
            elif b == itemsize - 1:
                np.right_shift(words, 8 * b, out=plane, casting="unsafe")
            else:
                np.bitwise_and(np.right_shift(words, 8 * b), 0xFF, out=plane, casting="unsafe")
    else:  # [n, itemsize] -> [itemsize, n]
        out[:body].reshape(itemsize, n)[...] = buf[:body].reshape(n, itemsize).T
    out[body:] = buf[body:]
    return out


def unshuffle_bytes(data: np.ndarray | bytes | memoryview, itemsize: int) -> np.ndarray:
    """Invert :func:`shuffle_bytes`."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
    n = buf.size // itemsize if itemsize else 0
    if itemsize <= 1 or n <= 1:
        return buf.copy()
    out = np.empty(buf.size, dtype=np.uint8)
    body = n * itemsize
    out[:body].reshape(n, itemsize)[...] = buf[:body].reshape(itemsize, n).T
    out[body:] = buf[body:]
    return out


@dataclass(frozen=True)
class Codec:
    """How each chunk is encoded: an optional byte shuffle, then a compressor.

    Build one with :func:`make_codec` (or ``Codec("zstd", level=3)``); fields are checked
    at construction.
    """

    name: str = "zstd"
    """``"none"``, ``"lz4"`` or ``"zstd"``."""
    level: int | None = None
    """Zstd level, 1 (fastest) to 22; ``None`` means 1. LZ4 and none take no level."""
    shuffle: bool = True
    """Byte-shuffle each chunk first (HDF5 filter 2); helps floats compress."""
    block_size: int = 0
    """LZ4 only: bytes per LZ4 block, 0 for one block per chunk (the HDF5 filter's default)."""

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise ValueError(
                f"codec name {self.name!r} is not supported; choose one of: {', '.join(CODEC_NAMES)}"
            )
        if self.name == "zstd":
            level = DEFAULT_ZSTD_LEVEL if self.level is None else self.level
            if isinstance(level, bool) or not isinstance(level, int) or level not in ZSTD_LEVELS:
                raise ValueError(
                    f"codec level {self.level!r} is not valid for zstd; use an integer from "
                    f"{ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1} (default {DEFAULT_ZSTD_LEVEL})"
                )
            object.__setattr__(self, "level", level)
        elif self.level is not None:
            raise ValueError(f"codec {self.name!r} takes no level, got level={self.level!r}; only zstd has levels")
        if not isinstance(self.shuffle, bool):
            # ValueError, as for every other bad codec field: callers catch one configuration error
            raise ValueError(f"codec shuffle must be True or False, got {self.shuffle!r}")  # noqa: TRY004
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not (
            0 <= self.block_size <= LZ4_MAX_BLOCK
        ):
            raise ValueError(f"codec block_size must be an integer from 0 to {LZ4_MAX_BLOCK}, got {self.block_size!r}")
        if self.block_size and self.name != "lz4":
            raise ValueError(f"codec block_size applies to lz4 only, got block_size={self.block_size} for {self.name!r}")

    # ------------------------------------------------------------------ description
    @property
    def spec(self) -> str:
        """Short text form, e.g. ``"zstd:3+shuffle"``; :func:`make_codec` parses it back."""
        text = self.name if self.level is None else f"{self.name}:{self.level}"
        return text + ("+shuffle" if self.shuffle else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "shuffle": self.shuffle, "block_size": self.block_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Codec:
        return cls(name=d["name"], level=d.get("level"), shuffle=bool(d.get("shuffle", False)),
                   block_size=int(d.get("block_size", 0)))

    def filters(self) -> list[tuple[int, tuple[int, ...]]]:
        """The HDF5 filter pipeline (id, client values) this codec's chunks are stored under."""
        out: list[tuple[int, tuple[int, ...]]] = []
        if self.shuffle:
            out.append((FILTER_SHUFFLE, ()))
        if self.name == "lz4":
            out.append((FILTER_LZ4, (self.block_size,)))
        elif self.name == "zstd":
            out.append((FILTER_ZSTD, (int(self.level),)))
        return out

    def h5py_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``h5py.Group.create_dataset`` declaring this pipeline.

        Works without ``hdf5plugin`` loaded (``allow_unknown_filter``): chunks are written
        pre-compressed, HDF5 never runs the filter itself when writing.
        """
        kw: dict[str, Any] = {"shuffle": self.shuffle}
        if self.name == "lz4":
            kw.update(compression=FILTER_LZ4, compression_opts=(self.block_size,), allow_unknown_filter=True)
        elif self.name == "zstd":
            kw.update(compression=FILTER_ZSTD, compression_opts=(int(self.level),), allow_unknown_filter=True)
        return kw

    # ------------------------------------------------------------------ encoding
    def encode(self, raw: np.ndarray | bytes | memoryview, itemsize: int, *, shuffled: bool = False) -> bytes | np.ndarray:
        """Encode one chunk's raw bytes (``itemsize``-byte elements) into stored bytes.

        ``shuffled=True`` says the bytes are already in shuffle order (packed that way on the
        GPU), so only the compressor runs. Returns ``bytes``, or for ``none`` the (contiguous,
        uint8) chunk itself.
        """
        data: Any = shuffle_bytes(raw, itemsize) if self.shuffle and not shuffled else raw
        if self.name == "none":  # no copy: the chunk buffer itself is written
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else bytes(data)
        mv = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) if isinstance(data, np.ndarray) \
            else memoryview(data).cast("B")
        if self.name == "zstd":
            return self._zstd_compressor().compress(mv)
        return self._lz4_encode(mv)

    def encode_many(self, raws: list[Any], itemsize: int, *, shuffled: bool = False, threads: int = 1) -> list[Any]:
        """Encode several chunks at once; item ``i`` holds the same bytes as ``encode(raws[i])``.

        Zstd compresses them all in one call on up to ``threads`` native threads, the GIL
        released throughout (``multi_compress_to_buffer``); the results are read-only
        buffers. LZ4 encodes them one by one. For ``none`` each result is the input's own
        memory (no copy) unless the codec shuffles bytes not yet shuffled.
        """
        if not raws:
            return []
        if self.shuffle and not shuffled:
            raws = [shuffle_bytes(r, itemsize) for r in raws]
        if self.name == "none":
            return [np.ascontiguousarray(r).reshape(-1).view(np.uint8) if isinstance(r, np.ndarray)
                    else memoryview(r).cast("B") for r in raws]
        views = [memoryview(np.ascontiguousarray(r).view(np.uint8).reshape(-1)) if isinstance(r, np.ndarray)
                 else memoryview(r).cast("B") for r in raws]
        if self.name == "zstd" and any(v.nbytes for v in views):
            found = self._zstd_compressor().multi_compress_to_buffer(views, threads=max(1, int(threads)))
            return [found[i] for i in range(len(found))]
        return [self.encode(v, itemsize, shuffled=True) for v in views]

    def decode(self, stored: bytes | memoryview, raw_size: int, itemsize: int) -> bytes:
        """Invert :meth:`encode`; ``raw_size`` is the chunk's uncompressed size in bytes."""
        if self.name == "none":
            data: Any = bytes(stored)
        elif self.name == "zstd":
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(bytes(stored), max_output_size=raw_size)
        else:
            data = _lz4_decode(bytes(stored))
        if len(data) != raw_size:
            raise ValueError(f"chunk decoded to {len(data)} bytes, expected {raw_size}")
        if self.shuffle:
            return unshuffle_bytes(data, itemsize).tobytes()
        return bytes(data)

    def _zstd_compressor(self) -> Any:
        cache = getattr(_THREAD, "zstd", None)
        if cache is None:  # one compressor per thread and level: they are not thread-safe
            cache = _THREAD.zstd = {}
        comp = cache.get(self.level)
        if comp is None:
            import zstandard

            comp = cache[self.level] = zstandard.ZstdCompressor(
                level=int(self.level), write_content_size=True, write_checksum=False
            )
        return comp

    def _lz4_encode(self, mv: memoryview) -> bytes:
        import lz4.block

        nbytes = mv.nbytes
        block = self.block_size or (1 << 30)  # the filter's default: 1 GiB
        block = min(block, nbytes) if nbytes else block
        parts = [_LZ4_HEADER.pack(nbytes, block)]
        for start in range(0, nbytes, block):
            piece = mv[start : start + block]
            comp = lz4.block.compress(piece, mode="default", store_size=False)
            if len(comp) >= len(piece):  # did not shrink: stored raw, size == raw size
                comp = piece
            parts.append(_LZ4_BLOCK_SIZE.pack(len(comp)))
            parts.append(comp)
        return b"".join(parts)


def _lz4_decode(stored: bytes) -> bytes:
    import lz4.block

    if len(stored) < _LZ4_HEADER.size:
        raise ValueError(f"lz4 chunk of {len(stored)} bytes is shorter than its 12-byte header")
    orig, block = _LZ4_HEADER.unpack_from(stored, 0)
    block = min(block, orig) if orig else block
    pos = _LZ4_HEADER.size
    out = bytearray()
    while len(out) < orig:
        this = min(block, orig - len(out))
        (csize,) = _LZ4_BLOCK_SIZE.unpack_from(stored, pos)
        pos += 4
        payload = stored[pos : pos + csize]
        if len(payload) != csize:
            raise ValueError("lz4 chunk is truncated")
        if csize == this:
            out += payload
        else:
            out += lz4.block.decompress(payload, uncompressed_size=this)
        pos += csize
    return bytes(out)


def make_codec(spec: str | Codec | dict[str, Any] | None = "zstd", *, level: int | None = None,
               shuffle: bool | None = None) -> Codec:
    """Build a :class:`Codec` from a name or spec string.

    Accepts ``None`` (no compression), ``"none"``, ``"lz4"``, ``"zstd"``, ``"zstd:5"``,
    ``"zstd:1+shuffle"``, ``"lz4-noshuffle"`` style text, a dict from
    :meth:`Codec.to_dict`, or a codec (returned as is). Shuffle defaults to on for lz4 and
    zstd and off for none.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, dict):
        return Codec.from_dict(spec)
    if spec is None:
        spec = "none"
    if not isinstance(spec, str):
        # ValueError, as for an unknown name: callers catch one configuration error
        raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)} (or None), got {spec!r}")  # noqa: TRY004
    text = spec.strip().lower()
    text_shuffle: bool | None = None
    if text.endswith("+shuffle"):
        text, text_shuffle = text[: -len("+shuffle")], True
    elif text.endswith("-noshuffle"):
        text, text_shuffle = text[: -len("-noshuffle")], False
    name, _, lvl = text.partition(":")
    if lvl:
        try:
            parsed = int(lvl)
        except ValueError:
            raise ValueError(f"codec level in {spec!r} must be an integer, got {lvl!r}") from None
        if level is not None and level != parsed:
            raise ValueError(f"codec {spec!r} names level {parsed} but level={level} was also given")
        level = parsed
    if name not in CODEC_NAMES:
        raise ValueError(f"codec {spec!r} is not supported; choose one of: {', '.join(CODEC_NAMES)} (or None)")
    if shuffle is None:
        shuffle = text_shuffle if text_shuffle is not None else name != "none"
    return Codec(name=name, level=level, shuffle=shuffle)
