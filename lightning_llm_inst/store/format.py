"""On-disk contract of the activation store: names, dtypes, attributes and the manifest.

Stage: shared by the writer (which produces shards and the manifest) and the reader (which
trusts only the manifest). Everything a reader needs to interpret a store without this
package is written down here and in ``docs/store-format.md``.

Layout of a store directory::

    manifest.json            the only list of committed shards a reader trusts
    shard-000000.h5          committed shards (HDF5, one row per captured token)
    shard-000001.h5.tmp      the open shard of a running (or killed) writer
    rank1/manifest.json      under DDP: one folder per rank >= 1, merged by rank 0
    rank1/shard-000000.h5

Inside a shard: ``/activations/<hook name>`` of shape ``[rows, *feature_shape]`` and
``/tokens/<name>`` of shape ``[rows]``, all with the same row count; per-chunk CRC32 of the
stored chunk bytes under ``/checksums/activations/<hook>`` and ``/checksums/tokens/<name>``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "dataset_path",
    "name_problem",
    "parse_bytes",
    "read_manifest",
    "shard_name",
    "storage_dtype",
    "write_json_atomic",
]

FORMAT_NAME = "lightning-llm-inst/activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".writer.lock"
ACTIVATIONS = "activations"
TOKENS = "tokens"
CHECKSUMS = "checksums"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.h5$")
TMP_SUFFIX = ".tmp"

#: dtypes accepted for activations, by name, with the numpy dtype stored on disk
ACTIVATION_DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",  # no HDF5 type: raw bits as uint16, attribute dtype="bfloat16"
    "float64": "<f8",
    "int8": "|i1",
    "uint8": "|u1",
    "int16": "<i2",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "int32": "<i4",
    "int64": "<i8",
    "bool": "|b1",
}
#: dtypes accepted for token metadata
TOKEN_DTYPES: dict[str, str] = {k: v for k, v in ACTIVATION_DTYPES.items() if k.startswith(("int", "uint"))}


class StoreError(Exception):
    """A store cannot be opened or read: bad path, missing or damaged manifest or shard."""


class StoreWriteError(OSError):
    """Writing a store failed (disk full, permission denied, bad path, a worker error).

    Raised in the caller's thread; ``path`` names the file or directory concerned and the
    original exception is chained as ``__cause__``.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, errno_: int | None = None):
        super().__init__(errno_, message) if errno_ is not None else super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return self.message


class StoreLockedError(StoreWriteError, StoreError):
    """Another writer holds the store, or the part of it a writer needs, open (both a
    :class:`StoreWriteError` and a :class:`StoreError`)."""


NAME_RULE = "a non-empty string without '/' or NUL characters, not '.' or '..', encodable as UTF-8"


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a hook point or token field (an HDF5 dataset), or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "/" in name:
        return "contains '/'"
    if "\x00" in name:
        return "contains a NUL character"
    if name in (".", ".."):
        return "is a path component"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "cannot be encoded as UTF-8"
    return None


def storage_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype a logical dtype name is stored as."""
    return np.dtype(ACTIVATION_DTYPES[dtype_name])


def dataset_path(kind: str, name: str) -> str:
    return f"/{kind}/{name}"


def checksum_path(kind: str, name: str) -> str:
    return f"/{CHECKSUMS}/{kind}/{name}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.h5"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str, name: str) -> int:
    """Parse a byte count given as a number or text such as ``"256MiB"`` or ``"1.5GB"``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a byte count such as 268435456 or '256MiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a byte count; use a number with an optional unit "
                f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '256MiB'"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{name} must be a byte count such as 268435456 or '256MiB', got {type(value).__name__}")
    if n <= 0 or n != n:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(n)


def fsync_path(path: str | os.PathLike) -> None:
    """Make a file's contents, or a rename or create inside a directory, durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON: write a temp file, fsync, rename, fsync the dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_path(path.parent)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``directory/manifest.json``; raise :class:`StoreError` if unusable
    (see :func:`lightning_llm_inst.store.manifest.load_manifest`)."""
    from lightning_llm_inst.store.manifest import load_manifest

    return load_manifest(directory)
