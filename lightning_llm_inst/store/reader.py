"""Store reader: a store directory, through its manifest, to torch tensors.

Stage: consumers of captured activations (analysis, SAE training, the CLI). Only shards the
manifest lists are read; anything else in the directory (an open or killed writer's
``*.tmp``) is reported, never trusted. Data is decoded by HDF5's own filter pipeline
(``hdf5plugin``), so what this module reads is what any ``h5py`` user reads.

Nothing read from disk is trusted blindly: the manifest is checked when the store opens
(:mod:`.manifest`, every shard path must resolve inside the store), each shard's datasets
are checked against the manifest (dtype, shape, rows, chunk layout) when the shard is first
opened, and each chunk's CRC-32 is checked the first time a read decodes it. A mismatch is a
:class:`~lightning_llm_inst.store.format.StoreError` naming the shard and what differs;
:meth:`ActivationStore.verify` checks everything and reports every problem.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_llm_inst.store.codecs import Codec
from lightning_llm_inst.store.format import (
    ACTIVATION_DTYPES,
    ACTIVATIONS,
    FORMAT_NAME,
    LOCK_FILE,
    MANIFEST,
    SHARD_RE,
    TMP_SUFFIX,
    TOKENS,
    StoreError,
    checksum_path,
    dataset_path,
    read_manifest,
)
from lightning_llm_inst.store.manifest import shard_path

__all__ = ["ActivationStore", "ChunkShuffleBatchSampler", "ColumnInfo", "ColumnView", "VerifyReport"]

log = logging.getLogger(__name__)


def _torch() -> Any:
    import torch

    return torch


def _to_torch(arr: np.ndarray, dtype_name: str) -> Any:
    torch = _torch()
    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class ColumnInfo:
    """What the manifest says of one hook point or token field."""

    name: str
    kind: str
    dtype: str
    feature_shape: tuple[int, ...]
    chunk_rows: int
    rows: int
    raw_bytes: int
    stored_bytes: int

    @property
    def torch_dtype(self) -> Any:
        return getattr(_torch(), self.dtype)

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass(frozen=True)
class _Shard:
    path: Path
    rows: int
    start: int  # first global row
    entry: dict[str, Any]


@dataclass
class VerifyReport:
    """Result of :meth:`ActivationStore.verify`: ``ok`` only if every listed shard checks out."""

    shards_checked: int = 0
    rows_checked: int = 0
    chunks_checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


class ActivationStore:
    """Read an activation store written by :class:`~lightning_llm_inst.store.StoreWriter`.

    ``store.hooks`` describes the hook points, ``store[hook]`` and ``store.tokens[name]`` give
    :class:`ColumnView` objects that slice and iterate into torch tensors in the stored dtype
    (bfloat16 included). Under DDP, a store whose rank folders have not been merged yet is
    read through the per-rank manifests.

    Opening checks the manifest (a malformed one, or a shard path that leaves the store, is a
    :class:`~lightning_llm_inst.store.format.StoreError`); reading checks each shard against
    the manifest when it is first opened and, with ``check_chunks`` (default), each chunk's
    recorded CRC-32 the first time it is decoded, so damaged data is an error, not garbage.
    """

    def __init__(self, path: str | os.PathLike, *, cache_chunks: int = 64, check_chunks: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no activation store at {os.fspath(self.path)!r}: the path does not exist")
        if not self.path.is_dir():
            raise StoreError(f"{os.fspath(self.path)!r} is not a directory; an activation store is a directory "
                             f"holding {MANIFEST}")
        self.manifest = self._load_manifest()
        self.codec = Codec.from_dict(self.manifest["codec"])
        self._columns: dict[str, ColumnInfo] = {}
        for kind, key in ((ACTIVATIONS, "hooks"), (TOKENS, "tokens")):
            for name, d in (self.manifest.get(key) or {}).items():
                self._columns[f"{kind}/{name}"] = ColumnInfo(
                    name=name, kind=kind, dtype=d["dtype"], feature_shape=tuple(d.get("shape", ())),
                    chunk_rows=int(d["chunk_rows"]), rows=int(d.get("rows", 0)),
                    raw_bytes=int(d.get("raw_bytes", 0)), stored_bytes=int(d.get("stored_bytes", 0)))
        self._shards: list[_Shard] = []
        start = 0
        where = self.path / MANIFEST
        for i, entry in enumerate(self.manifest["shards"]):
            file = shard_path(self.path, entry["file"], f"shards[{i}].file", where)
            self._shards.append(_Shard(file, int(entry["rows"]), start, entry))
            start += int(entry["rows"])
        self._starts = [s.start for s in self._shards]
        self.rows = start
        self._files: dict[Path, Any] = {}
        self._datasets: dict[tuple[Path, str], Any] = {}  # (shard path, column key) -> open dataset
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._cache_chunks = cache_chunks
        if not isinstance(check_chunks, bool):
            raise TypeError(f"check_chunks must be True or False, got {check_chunks!r}")
        self.check_chunks = check_chunks
        # (shard index, column key) -> (recorded CRC-32 per chunk or None, chunks checked so far)
        self._crc_state: dict[tuple[int, str], tuple[np.ndarray | None, np.ndarray]] = {}
        self.leftovers = self._find_leftovers()
        self.tokens = {c.name: ColumnView(self, c) for c in self._columns.values() if c.kind == TOKENS}

    # ------------------------------------------------------------------ manifest
    def _load_manifest(self) -> dict[str, Any]:
        if (self.path / MANIFEST).exists():
            return read_manifest(self.path)
        ranks = sorted((p for p in self.path.glob("rank*") if (p / MANIFEST).exists()),
                       key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30)
        if not ranks:
            raise StoreError(f"no activation store at {os.fspath(self.path)!r}: {MANIFEST} not found")
        from lightning_llm_inst.store.merge import merge_manifest_dicts

        parts = []
        for p in ranks:
            m = read_manifest(p)
            for i, sh in enumerate(m["shards"]):  # each rank's shards lie in its own folder
                shard_path(p, sh["file"], f"shards[{i}].file", p / MANIFEST)
            parts.append((p.name, m))
        return merge_manifest_dicts(parts)

    def _directories(self) -> list[Path]:
        dirs = {self.path}
        for s in self._shards:
            dirs.add(s.path.parent)
        dirs.update(p for p in self.path.glob("rank*") if p.is_dir())
        return sorted(dirs)

    def _find_leftovers(self) -> list[str]:
        listed = {s.path for s in self._shards}
        found: list[str] = []
        for d in self._directories():
            items = [p for p in d.iterdir() if p.is_file() and (
                p.name.endswith(TMP_SUFFIX) or (SHARD_RE.match(p.name) and p not in listed))]
            if not items:
                continue
            names = [os.fspath(p.relative_to(self.path)) for p in sorted(items)]
            found += names
            if not _writer_active(d):
                log.warning("activation store %s: %s not listed in the manifest (left by an interrupted writer; "
                            "removed when the store is next opened for appending)", d, ", ".join(names))
        return found

    # ------------------------------------------------------------------ description
    @property
    def hooks(self) -> dict[str, ColumnInfo]:
        """Hook points: name -> shape, dtype, rows, bytes."""
        return {c.name: c for c in self._columns.values() if c.kind == ACTIVATIONS}

    @property
    def token_fields(self) -> dict[str, ColumnInfo]:
        return {c.name: c for c in self._columns.values() if c.kind == TOKENS}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self.manifest.get("dropped", {"batches": 0, "rows": 0}))

    @property
    def recovered(self) -> list[dict[str, Any]]:
        """What writers found and removed on resume after an interruption."""
        return list(self.manifest.get("recovered", []))

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return self.rows

    def __contains__(self, hook: str) -> bool:
        return f"{ACTIVATIONS}/{hook}" in self._columns

    def __getitem__(self, hook: str) -> ColumnView:
        col = self._columns.get(f"{ACTIVATIONS}/{hook}")
        if col is None:
            raise KeyError(f"hook point {hook!r} is not in the store at {os.fspath(self.path)!r}; "
                           f"it holds: {', '.join(self.hooks) or 'nothing yet'}")
        return ColumnView(self, col)

    def __repr__(self) -> str:
        return (f"ActivationStore({os.fspath(self.path)!r}, rows={self.rows}, shards={len(self._shards)}, "
                f"hooks={list(self.hooks)}, codec={self.codec.spec!r})")

    # ------------------------------------------------------------------ reading
    def _file(self, shard: _Shard) -> Any:
        """The shard's open file, checked against the manifest when first opened."""
        if self._pid != os.getpid():  # after fork: h5py handles are not shareable
            self._files = {}
            self._datasets = {}
            self._cache.clear()
            self._pid = os.getpid()
        f = self._files.get(shard.path)
        if f is None:
            import h5py

            if self.codec.name != "none":
                import hdf5plugin  # noqa: F401 - registers the LZ4 / Zstd filters
            try:
                f = h5py.File(shard.path, "r", rdcc_nbytes=0)
            except OSError as exc:
                raise StoreError(f"cannot open shard {os.fspath(shard.path)!r}: {_one_line(exc)}") from exc
            found: dict[tuple[Path, str], Any] = {}
            try:
                problems = self._shard_problems(f, shard, found)
            except Exception as exc:  # noqa: BLE001 - an unreadable header is a damaged shard
                problems = [f"cannot be read: {_one_line(exc)}"]
            if problems:
                f.close()
                raise StoreError(f"shard {self._name(shard)!r} does not match the manifest: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more problem(s); run verify)" if len(problems) > 1
                                    else ""))
            self._files[shard.path] = f
            self._datasets.update(found)
        return f

    def _name(self, shard: _Shard) -> str:
        return os.fspath(shard.path.relative_to(self.path))

    def _shard_problems(self, f: Any, sh: _Shard, found: dict[tuple[Path, str], Any] | None = None) -> list[str]:
        """What in an open shard file disagrees with the manifest (metadata only: cheap). The
        datasets that agree with it go into ``found``, keyed by (shard path, column key)."""
        import h5py

        out = []
        rows_attr = f.attrs.get("rows")
        if rows_attr is not None and int(rows_attr) != sh.rows:
            out.append(f"rows attribute is {int(rows_attr)}, the manifest says {sh.rows}")
        for col in self._columns.values():
            path = dataset_path(col.kind, col.name)
            ds = f.get(path)
            before = len(out)
            if not isinstance(ds, h5py.Dataset):
                out.append(f"dataset {path} is missing")
                continue
            want_dtype = np.dtype(ACTIVATION_DTYPES[col.dtype])
            if ds.dtype != want_dtype:
                out.append(f"{path} dtype is {ds.dtype}, the manifest says {col.dtype} (stored as {want_dtype})")
            logical = ds.attrs.get("dtype")
            if isinstance(logical, bytes):
                logical = logical.decode("utf-8", "replace")
            if logical is not None and logical != col.dtype:
                out.append(f"{path} dtype attribute is {logical!r}, the manifest says {col.dtype!r}")
            want_shape = (sh.rows, *col.feature_shape)
            if ds.shape != want_shape:
                out.append(f"{path} shape is {ds.shape}, the manifest says {want_shape}")
            want_chunks = (col.chunk_rows, *col.feature_shape)
            if ds.chunks is not None and ds.chunks != want_chunks:
                out.append(f"{path} chunks are {ds.chunks}, the manifest says {want_chunks}")
            if found is not None and len(out) == before:
                found[(sh.path, f"{col.kind}/{col.name}")] = ds
        return out

    def _dataset(self, shard: _Shard, col: ColumnInfo) -> Any:
        key = (shard.path, f"{col.kind}/{col.name}")
        ds = self._datasets.get(key) if self._pid == os.getpid() else None
        if ds is None:
            self._file(shard)  # opens and checks the shard: every column's dataset is known then
            ds = self._datasets[key]
        return ds

    def _check_chunks(self, si: int, col: ColumnInfo, first: int, last: int) -> None:
        """Check the CRC-32 of chunks ``first .. last`` of ``col`` in shard ``si`` (each only
        the first time it is read) before HDF5 decodes them."""
        if not self.check_chunks:
            return
        sh = self._shards[si]
        key = (si, f"{col.kind}/{col.name}")
        state = self._crc_state.get(key)
        if state is None:
            f = self._file(sh)
            n_chunks = -(-sh.rows // col.chunk_rows)
            cp = checksum_path(col.kind, col.name)
            crcs = f.get(cp)
            if crcs is not None:
                crcs = np.asarray(crcs[()]).reshape(-1)
                if crcs.shape != (n_chunks,):
                    raise StoreError(f"shard {self._name(sh)!r}: {cp} holds {crcs.size} checksums for "
                                     f"{n_chunks} chunks")
            state = self._crc_state[key] = (crcs, np.zeros(n_chunks, dtype=bool))
        crcs, done = state
        if crcs is None:  # written by another tool: nothing recorded to check against
            return
        todo = np.flatnonzero(~done[first : last + 1]) + first
        if not todo.size:
            return
        ds = self._dataset(sh, col)
        rest = (0,) * len(col.feature_shape)
        for ci in todo.tolist():
            a = ci * col.chunk_rows
            rows = f"rows {a}..{min(sh.rows, a + col.chunk_rows) - 1}"
            try:
                _, data = ds.id.read_direct_chunk((a, *rest))
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable chunk is damage
                raise StoreError(f"shard {self._name(sh)!r}: {dataset_path(col.kind, col.name)} chunk {ci} ({rows}) "
                                 f"cannot be read: {_one_line(exc)}") from exc
            if zlib.crc32(data) != int(crcs[ci]):
                raise StoreError(f"shard {self._name(sh)!r}: {dataset_path(col.kind, col.name)} chunk {ci} ({rows}) "
                                 f"fails its CRC-32 check: the file is damaged (run verify)")
            done[ci] = True

    def _decode_error(self, sh: _Shard, col: ColumnInfo, a: int, b: int, exc: Exception) -> StoreError:
        return StoreError(f"shard {self._name(sh)!r}: {dataset_path(col.kind, col.name)} rows {a}..{b - 1} cannot "
                          f"be decoded: {_one_line(exc)}")

    def _shard_of(self, row: int) -> int:
        return bisect.bisect_right(self._starts, row) - 1

    def _read_range(self, col: ColumnInfo, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a storage-dtype array."""
        out = np.empty((max(0, stop - start), *col.feature_shape), dtype=ACTIVATION_DTYPES[col.dtype])
        pos = start
        while pos < stop:
            si = self._shard_of(pos)
            sh = self._shards[si]
            end = min(stop, sh.start + sh.rows)
            if end > pos:
                a, b = pos - sh.start, end - sh.start
                self._check_chunks(si, col, a // col.chunk_rows, (b - 1) // col.chunk_rows)
                ds = self._dataset(sh, col)
                try:
                    ds.read_direct(out, np.s_[a:b], np.s_[pos - start : end - start])
                except OSError as exc:  # HDF5's filter failed on damaged bytes
                    raise self._decode_error(sh, col, a, b, exc) from exc
            pos = end
        return out

    def _chunk(self, col: ColumnInfo, si: int, ci: int) -> np.ndarray:
        key = (f"{col.kind}/{col.name}", si, ci)
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
            return arr
        sh = self._shards[si]
        a = ci * col.chunk_rows
        b = min(sh.rows, a + col.chunk_rows)
        self._check_chunks(si, col, ci, ci)
        ds = self._dataset(sh, col)
        try:
            arr = ds[a:b]
        except OSError as exc:  # HDF5's filter failed on damaged bytes
            raise self._decode_error(sh, col, a, b, exc) from exc
        self._cache[key] = arr
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return arr

    def _gather(self, col: ColumnInfo, index: np.ndarray) -> np.ndarray:
        out = np.empty((index.size, *col.feature_shape), dtype=ACTIVATION_DTYPES[col.dtype])
        if index.size == 0:
            return out
        order = np.argsort(index, kind="stable")
        srt = index[order]
        shard_idx = np.searchsorted(self._starts, srt, side="right") - 1
        starts = np.asarray(self._starts)[shard_idx]
        local = srt - starts
        chunk_idx = local // col.chunk_rows
        # one group per (shard, chunk), in sorted order
        bounds = np.flatnonzero(np.diff(shard_idx * (1 << 40) + chunk_idx)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, srt.size]):
            si, ci = int(shard_idx[lo]), int(chunk_idx[lo])
            chunk = self._chunk(col, si, ci)
            out[order[lo:hi]] = chunk[local[lo:hi] - ci * col.chunk_rows]
        return out

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        self._files = {}
        self._datasets = {}
        self._cache.clear()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # for DataLoader workers: reopen files there
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_datasets"] = {}
        state["_cache"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ sampling
    def chunk_blocks(self, hook: str | None = None) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` of whole chunks of ``hook`` (default: the first),
        never crossing a shard: the units a chunk-friendly sampler shuffles."""
        col = self[hook]._col if hook is not None else next(iter(self.hooks.values()), None)
        if col is None:
            return []
        blocks = []
        for sh in self._shards:
            for a in range(0, sh.rows, col.chunk_rows):
                blocks.append((sh.start + a, sh.start + min(sh.rows, a + col.chunk_rows)))
        return blocks

    def batch_sampler(self, batch_size: int, *, hook: str | None = None, shuffle: bool = True, seed: int = 0,
                      buffer_chunks: int = 16, drop_last: bool = False, rank: int = 0,
                      world_size: int = 1) -> ChunkShuffleBatchSampler:
        """A :class:`ChunkShuffleBatchSampler` over this store's rows."""
        return ChunkShuffleBatchSampler(self.chunk_blocks(hook), batch_size, shuffle=shuffle, seed=seed,
                                        buffer_chunks=buffer_chunks, drop_last=drop_last, rank=rank,
                                        world_size=world_size)

    # ------------------------------------------------------------------ checking
    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Read every committed shard and check it against its checksums and the manifest.

        Checks each listed shard exists with the recorded size, holds every column with the
        recorded rows, shape, dtype and chunk layout, that every stored chunk matches its
        CRC32 and that HDF5's filters decode it. Problems are reported, never raised.
        ``progress(done, total)`` is called after each shard.
        """
        import h5py

        if self.codec.name != "none":
            import hdf5plugin  # noqa: F401
        rep = VerifyReport(leftovers=list(self.leftovers))
        self.close()
        for i, sh in enumerate(self._shards):
            name = os.fspath(sh.path.relative_to(self.path))
            rep.shards_checked += 1
            if not sh.path.exists():
                rep.problems.append(f"{name}: listed in the manifest but missing")
            else:
                size = sh.path.stat().st_size
                if "bytes" in sh.entry and size != sh.entry["bytes"]:
                    rep.problems.append(f"{name}: {size} bytes on disk, manifest says {sh.entry['bytes']}")
                else:
                    try:
                        with h5py.File(sh.path, "r") as f:
                            self._verify_shard(f, sh, name, rep)
                    except Exception as exc:  # noqa: BLE001 - any failure to read is a finding
                        rep.problems.append(f"{name}: cannot be read: {exc}")
            if progress is not None:
                progress(i + 1, len(self._shards))
        return rep

    def _verify_shard(self, f: Any, sh: _Shard, name: str, rep: VerifyReport) -> None:
        if f.attrs.get("format") != FORMAT_NAME:
            rep.problems.append(f"{name}: format attribute is {f.attrs.get('format')!r}, not {FORMAT_NAME!r}")
        if f.attrs.get("rows") is None:
            rep.problems.append(f"{name}: rows attribute is missing, manifest says {sh.rows}")
        agree: dict[tuple[Path, str], Any] = {}
        rep.problems += [f"{name}: {p}" for p in self._shard_problems(f, sh, agree)]
        for col in self._columns.values():
            path = dataset_path(col.kind, col.name)
            ds = agree.get((sh.path, f"{col.kind}/{col.name}"))
            if ds is None:
                continue  # reported above; its chunks cannot be checked against the manifest
            crcs = f[checksum_path(col.kind, col.name)][()] if checksum_path(col.kind, col.name) in f else None
            n_chunks = -(-sh.rows // col.chunk_rows)
            if crcs is None or len(crcs) != n_chunks:
                rep.problems.append(f"{name}: {path} has no checksums for its {n_chunks} chunks")
                continue
            zeros = (0,) * len(col.feature_shape)
            for ci in range(n_chunks):
                a = ci * col.chunk_rows
                _, data = ds.id.read_direct_chunk((a, *zeros))
                if zlib.crc32(data) != int(crcs[ci]):
                    rep.problems.append(f"{name}: {path} chunk {ci} (rows {a}..) fails its CRC32 check")
                    continue
                try:
                    ds[a : min(sh.rows, a + col.chunk_rows)]
                except Exception as exc:  # noqa: BLE001
                    rep.problems.append(f"{name}: {path} chunk {ci} does not decode: {exc}")
                    continue
                rep.chunks_checked += 1
        rep.rows_checked += sh.rows


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


def _writer_active(directory: Path) -> bool:
    """True if a writer holds the directory's lock (its ``*.tmp`` files are work in progress)."""
    lock = directory / LOCK_FILE
    if not lock.exists():
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


class ColumnView:
    """Rows of one hook point (or token field) across all shards, as torch tensors.

    ``view[i]``, ``view[a:b]``, ``view[[i, j, k]]`` (any order, repeats allowed) and
    ``view.iter_chunks()`` return tensors in the stored dtype.
    """

    def __init__(self, store: ActivationStore, col: ColumnInfo) -> None:
        self._store = store
        self._col = col

    @property
    def info(self) -> ColumnInfo:
        return self._col

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._store.rows, *self._col.feature_shape)

    @property
    def dtype(self) -> Any:
        return self._col.torch_dtype

    def __len__(self) -> int:
        return self._store.rows

    def numpy(self, key: Any = slice(None)) -> np.ndarray:
        """Like indexing, but the storage-dtype numpy array (bfloat16 as uint16 bits)."""
        n = self._store.rows
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            return self._store._read_range(self._col, i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._store._read_range(self._col, start, max(start, stop))
            return self._store._gather(self._col, np.arange(start, stop, step, dtype=np.int64))
        index = np.asarray(key.cpu().numpy() if hasattr(key, "cpu") else key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"a boolean index must have shape ({n},), got {index.shape}")
            index = np.flatnonzero(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"index must be an int, a slice or a 1-D sequence of ints, got {type(key).__name__}")
        index = np.where(index < 0, index + n, index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return self._store._gather(self._col, index)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):  # rows first, then feature indices: view[a:b, 0]
            if not key:
                return self[:]
            rows = self.numpy(key[0])
            rest = (slice(None),) * (not isinstance(key[0], (int, np.integer))) + key[1:]
            return _to_torch(rows, self._col.dtype)[rest]
        return _to_torch(self.numpy(key), self._col.dtype)

    def iter_chunks(self, rows: int | None = None) -> Iterator[Any]:
        """Yield consecutive blocks of ``rows`` rows (default: the stored chunk size)."""
        step = rows or self._col.chunk_rows
        if step < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        for a in range(0, self._store.rows, step):
            yield self[a : a + step]

    def __iter__(self) -> Iterator[Any]:
        return self.iter_chunks()

    def __repr__(self) -> str:
        return f"ColumnView({self._col.kind}/{self._col.name}, shape={self.shape}, dtype={self._col.dtype})"


class ChunkShuffleBatchSampler:
    """Batches of row indices, shuffled at chunk granularity so each read decodes few chunks.

    Each epoch permutes the chunk blocks, takes ``buffer_chunks`` of them at a time, shuffles
    their rows together and yields batches of ``batch_size`` (a batch may span buffers). Every
    row appears exactly once per epoch. Under DDP, blocks are dealt to ranks round-robin.
    Use it as a ``DataLoader``'s ``batch_sampler`` and call :meth:`set_epoch` each epoch.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 16, drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(buffer_chunks, int) or buffer_chunks < 1:
            raise ValueError(f"buffer_chunks must be a positive integer, got {buffer_chunks!r}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.blocks = list(blocks)[rank::world_size]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_chunks = buffer_chunks
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.blocks)

    def __len__(self) -> int:
        n = self.num_rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        carry = np.empty(0, dtype=np.int64)
        for g in range(0, len(order), self.buffer_chunks):
            rows = np.concatenate([carry] + [np.arange(*self.blocks[i], dtype=np.int64)
                                             for i in order[g : g + self.buffer_chunks]])
            if self.shuffle:
                rows[len(carry):] = rng.permutation(rows[len(carry):])
            full = len(rows) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                yield rows[a : a + self.batch_size].tolist()
            carry = rows[full:]
        if len(carry) and not self.drop_last:
            yield carry.tolist()
