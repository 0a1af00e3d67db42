"""Store writer: rows in, compressed crash-safe HDF5 shards out.

Stage: the end of the capture pipeline. The caller's thread validates each batch and copies
its rows into per-column chunk buffers (:mod:`.chunking`); a full chunk goes to a pool of
compression threads (lz4 / zstd / crc32 release the GIL); one writer thread owns the open
shard (:mod:`.shard`), writes each pre-compressed chunk with ``write_direct_chunk`` in
order, and commits the shard (close, fsync, rename, then the manifest replaced atomically).

Zero-copy path: rows given with a ``release`` callback whose full chunks already lie in the
caller's memory in stored order (byte planes grouped per chunk, :meth:`StoreWriter.add_packed`
with ``group_rows`` equal to the column's chunk rows, or C-contiguous row-major rows for a
column without byte planes) are not copied. The full chunks of one call become one *job*:
compressed in one call (zstd: native threads, the GIL released throughout) or in a few
sub-batches on the worker pool (lz4, none), then written by the writer thread in one go. The
caller's ``release`` runs once the writer no longer reads that memory. Chunk indices, order,
rollback (:meth:`~StoreWriter.abort_batch`) and the bytes on disk are those of the copying path.

A batch is given whole (:meth:`StoreWriter.append`) or hook by hook as a model runs
(:meth:`~StoreWriter.begin_batch`, :meth:`~StoreWriter.add`, :meth:`~StoreWriter.end_batch`,
:meth:`~StoreWriter.abort_batch`), so no batch needs to be staged in full. A shard holds whole
batches and is committed once it reaches ``shard_size``. Errors from the worker or writer
threads are raised in the caller's thread, as :class:`StoreWriteError`.

What a crash can lose is bounded: at most ``max_pending_commits`` closed shards wait for their
commit besides the one being committed, and the batch that would close one more waits (or is
dropped under ``on_full="drop"``). A writer still open at interpreter exit is closed then,
before h5py's own exit handler runs.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_llm_inst._version import __version__
from lightning_llm_inst.store.chunking import BufferPool, ByteBudget, Column, as_numpy, check_name
from lightning_llm_inst.store.codecs import Codec, make_codec
from lightning_llm_inst.store.format import (
    ACTIVATION_DTYPES,
    ACTIVATIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    SHARD_RE,
    TMP_SUFFIX,
    TOKEN_DTYPES,
    TOKENS,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    parse_bytes,
    read_manifest,
    shard_name,
    write_json_atomic,
)
from lightning_llm_inst.store.manifest import shard_path
from lightning_llm_inst.store.shard import OpenShard

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["StoreWriter"]

log = logging.getLogger(__name__)

MODES = ("create", "append", "overwrite")
ON_FULL = ("block", "drop")
_DROP_LOG_INTERVAL_S = 10.0
_INT64_MAX = (1 << 63) - 1
WRITE_BEHIND = 64 * 2**20
"""Stored bytes of a shard after which its dirty pages are sent to the disk (when ``fsync``),
so the disk is busy while the shard fills rather than only at its commit
(``LLM_INST_WRITE_BEHIND_MB`` overrides it; 0 turns it off)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_OPEN_WRITERS: weakref.WeakSet[StoreWriter] = weakref.WeakSet()
_EXIT_HOOK = threading.Lock()
_exit_hook_after_h5py = False


def _close_when_exiting(writer: StoreWriter) -> None:
    """Have ``writer`` closed at interpreter exit if it is still open then: complete batches
    are committed and its threads stopped before h5py's own exit handler runs (closing HDF5
    files after it crashes the interpreter). atexit runs handlers last-registered-first, so
    ours is (re-)registered once h5py is imported, which this imports first."""
    global _exit_hook_after_h5py
    with _EXIT_HOOK:
        import h5py  # noqa: F401 - its exit handler is registered before ours
        if not _exit_hook_after_h5py:
            atexit.unregister(_close_open_writers)
            atexit.register(_close_open_writers)
            _exit_hook_after_h5py = "h5py" in sys.modules
        _OPEN_WRITERS.add(writer)


def _close_open_writers() -> None:
    for w in list(_OPEN_WRITERS):
        w._close_at_exit()


@dataclass
class _Stats:
    batches: int = 0
    rows_appended: int = 0
    rows_committed: int = 0
    shards_committed: int = 0
    dropped_batches: int = 0
    dropped_rows: int = 0
    raw_bytes_committed: int = 0
    stored_bytes_committed: int = 0
    compress_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    zero_copy_chunks: int = 0  # chunks compressed where they lie in the caller's memory
    copied_chunks: int = 0  # chunks assembled in the writer's chunk buffers
    jobs: int = 0  # zero-copy jobs (one per add with at least one full chunk)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Batch:
    rows: int
    dropped: bool = False
    added: dict[str, int] = field(default_factory=dict)  # hook -> rows added so far
    # first batch only: hook -> parts (array, dtype, byte planes?, feature shape)
    staged: dict[str, list[tuple[np.ndarray, str, bool, tuple[int, ...]]]] = field(default_factory=dict)
    tokens: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)


class _Release:
    """The caller's ``release`` callback for the memory of one add, called exactly once: when
    the last holder lets go. The caller's thread holds it for the length of the add; a
    zero-copy job holds it until its chunks are written or discarded. An exception from the
    callback is logged and becomes the writer's error."""

    __slots__ = ("_fn", "_holders", "_hook", "_lock", "_writer")

    def __init__(self, fn: Callable[[], Any], writer: StoreWriter, hook: str) -> None:
        self._fn, self._writer, self._hook = fn, writer, hook
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def __call__(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders != 0:
                return
        try:
            self._fn()
        except Exception as exc:  # noqa: BLE001 - becomes the writer's error
            self._writer._release_failed(exc, self._hook)


def _row_bytes(dtype: str, feature_shape: tuple[int, ...]) -> int:
    return int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(ACTIVATION_DTYPES[dtype]).itemsize


def _ranks_writing(root: Path) -> list[str]:
    """The ``rank<N>`` folders of ``root`` whose writer holds their lock now."""
    found = []
    for p in sorted(root.glob(f"rank*/{LOCK_FILE}")):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            found.append(p.parent.name)
        finally:
            os.close(fd)
    return found


def _staged_bytes(b: _Batch) -> int:
    return sum(int(arr.nbytes) for parts in b.staged.values() for arr, *_ in parts)


def _too_small(limit: int, rows: int, held: int, need: int | None) -> ValueError:
    """The first batch is held whole until it ends (it sets the store's layout), and that
    copy counts against ``max_buffer_bytes``; later batches stream through in chunks."""
    exc = ValueError(
        f"max_buffer_bytes={limit} cannot hold the first batch ({rows} rows, "
        f"{'at least ' if need is None else ''}{held} bytes of activations), which is held whole until it ends "
        f"since it sets the store's layout (later batches stream in chunks); "
        + ("use a smaller first batch" if need is None else f"it needs at least {need} bytes"))
    exc.needed_bytes = need  # type: ignore[attr-defined]
    exc.first_batch_bytes = held  # type: ignore[attr-defined]
    return exc


def _groups(flat: np.ndarray, n: int, group_rows: int, itemsize: int, elems: int) -> list[np.ndarray]:
    """Views of the groups of a grouped byte-plane buffer, each ``[itemsize, rows_g * F]``."""
    if n == 0:
        return [flat[:0].reshape(itemsize, 0)]
    out = []
    for start in range(0, n, group_rows):
        rows = min(group_rows, n - start)
        a = start * elems * itemsize
        out.append(flat[a : a + rows * elems * itemsize].reshape(itemsize, rows * elems))
    return out


class StoreWriter:
    """Append rows of activations and token metadata to an activation store.

    Example::

        with StoreWriter("run/acts", codec="zstd") as w:
            w.append({"blocks.3.hook_resid_post": x},
                     tokens={"input_ids": ids, "sequence_id": seq, "position": pos})

    Args:
        path: store directory; created if missing.
        codec: ``"zstd"`` (default, level 1), ``"zstd:N"``, ``"lz4"``, ``"none"``/``None``, or a
            :class:`~lightning_llm_inst.store.codecs.Codec`.
        mode: ``"create"`` (fail if a store is there), ``"append"`` (resume an existing store,
            cleaning up what a killed writer left; create one if missing) or ``"overwrite"``.
        shard_size: raw (uncompressed) bytes after which a shard is committed and the next one
            opened (a shard holds whole batches); bounds what a crash can lose. A number or text
            such as ``"256MiB"``.
        chunk_size: target raw bytes of one HDF5 chunk (the unit of compression).
        max_buffer_bytes: bound on all bytes the writer holds (pending, queued, compressed).
        num_workers: compression threads; default: the number of CPUs, at most 16.
        on_full: ``"block"`` (wait for room, nothing lost) or ``"drop"`` (skip the whole batch,
            counted, logged and recorded in the manifest).
        rank: under DDP, the rank: shards go to ``path/rank<N>/``; ``None`` writes in ``path``.
        metadata: JSON-serialisable provenance (model, hook spec, capture config) stored in
            the manifest and in every shard.
        fsync: make each shard and manifest durable before it is listed (default True).
        max_pending_commits: closed shards that may wait for their commit besides the one
            being committed (default 2, 0 or more). When that many wait, the batch that ends
            the next shard waits too (``on_full="block"``) or is dropped (``"drop"``). So a
            crash (``kill -9``) loses at most ``max_pending_commits + 2`` shards: the open
            shard, the shards waiting and the shard being committed.

    Subclasses may override :meth:`publish_shard` to wrap each shard's commit.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        codec: str | Codec | None = "zstd",
        mode: str = "create",
        shard_size: int | str = "256MiB",
        chunk_size: int | str = "1MiB",
        max_buffer_bytes: int | str = "512MiB",
        num_workers: int | None = None,
        on_full: str = "block",
        rank: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        fsync: bool = True,
        max_pending_commits: int = 2,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of: {', '.join(MODES)}")
        if on_full not in ON_FULL:
            raise ValueError(f"on_full={on_full!r} is not valid; choose one of: {', '.join(ON_FULL)}")
        if num_workers is None:
            num_workers = max(1, min(16, os.cpu_count() or 1))
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be None or a non-negative integer, got {rank!r}")
        if isinstance(max_pending_commits, bool) or not isinstance(max_pending_commits, int) or max_pending_commits < 0:
            raise ValueError(f"max_pending_commits={max_pending_commits!r} is not valid; use an integer >= 0 (closed "
                             f"shards that may wait for their commit)")
        self.max_pending_commits = max_pending_commits
        self.codec = make_codec(codec)
        self.shard_size = parse_bytes(shard_size, "shard_size")
        self.chunk_size = parse_bytes(chunk_size, "chunk_size")
        self.max_buffer_bytes = parse_bytes(max_buffer_bytes, "max_buffer_bytes")
        self.num_workers = num_workers
        self.on_full = on_full
        self.fsync = bool(fsync)
        self.write_behind = int(float(os.environ.get("LLM_INST_WRITE_BEHIND_MB", WRITE_BEHIND / 2**20)) * 2**20)
        try:
            self.metadata = json.loads(json.dumps(dict(metadata or {})))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None

        self.root = Path(path)
        self.directory = self.root if rank is None else self.root / f"rank{rank}"
        self.rank = rank
        self.recovered: list[dict[str, Any]] = []
        self._lock_fd: int | None = None
        self._root_lock_fd: int | None = None  # a rank writer's shared lock on the store root
        self._columns: list[Column] | None = None
        self._hooks: dict[str, Column] = {}
        self._tokens: dict[str, Column] = {}
        self._rows_per_shard = 0
        self._shard_rows = 0
        self._ceiling = 0
        self._batch: _Batch | None = None
        self._budget = ByteBudget(self.max_buffer_bytes)
        self._pool = BufferPool(min(64 * 2**20, self.max_buffer_bytes // 8))
        self._stats = _Stats()
        self._error: BaseException | None = None
        self._closed = False
        self._last_drop_log = 0.0
        self._manifest_lock = threading.Lock()
        # shards ended by the caller and not yet committed (or discarded): at most max_pending_commits + 1
        self._uncommitted = 0
        self._commit_cond = threading.Condition()
        self._commit_wait_s = 0.0
        self._open_directory(mode)
        if self._manifest.get("hooks") is not None:
            try:
                self._restore_schema()
            except BaseException:
                self._release_lock()
                raise

        self._workers = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="llm-inst-compress")
        # zstd jobs: each runs num_workers native threads, so only a few at a time
        self._jobs = ThreadPoolExecutor(max_workers=min(4, num_workers), thread_name_prefix="llm-inst-job")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._commits: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer_loop, name="llm-inst-writer", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="llm-inst-commit", daemon=True)
        self._thread.start()
        self._committer.start()
        _close_when_exiting(self)

    # ------------------------------------------------------------------ opening
    def _open_directory(self, mode: str) -> None:
        d = self.directory
        try:
            if d.exists() and not d.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory")
            d.mkdir(parents=True, exist_ok=True)
            if self.rank is not None:
                self._root_lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            self._lock_fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._release_lock()
            raise StoreWriteError(
                f"cannot create activation store at {os.fspath(d)!r}: {exc.strerror or exc}", d, exc.errno
            ) from exc
        self._take_locks()
        try:
            exists = (d / MANIFEST).exists()
            if exists and mode == "create":
                raise StoreWriteError(
                    f"an activation store already exists at {os.fspath(d)!r}; pass mode='append' to add to it "
                    f"or mode='overwrite' to replace it", d, errno.EEXIST)
            if exists and mode == "append":
                try:
                    self._manifest = read_manifest(d)
                    for i, sh in enumerate(self._manifest["shards"]):  # listed paths stay inside the store
                        shard_path(d, sh["file"], f"shards[{i}].file", d / MANIFEST)
                except StoreError as exc:
                    raise StoreWriteError(str(exc), d / MANIFEST) from exc
                self._clean_leftovers()
                return
            if mode == "overwrite":
                self._remove_store_files()
            self._manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "library_version": __version__,
                "created": _now(),
                "updated": _now(),
                "codec": self.codec.to_dict(),
                "hooks": None,
                "tokens": None,
                "rows": 0,
                "shards": [],
                "dropped": {"batches": 0, "rows": 0},
                "recovered": [],
                "metadata": self.metadata,
            }
            self._clean_leftovers(record=False)
            write_json_atomic(d / MANIFEST, self._manifest)
        except StoreWriteError:
            self._release_lock()
            raise
        except OSError as exc:
            self._release_lock()
            raise StoreWriteError(
                f"cannot write activation store at {os.fspath(d)!r}: {exc.strerror or exc}", exc.filename or d,
                exc.errno) from exc

    def _take_locks(self) -> None:
        """A writer without a rank locks the store root exclusively; a rank writer shares the
        root's lock with the other ranks and locks its own folder exclusively. So rank writers
        work side by side, and a writer without a rank excludes them all (in either order)."""
        root, d = self.root, self.directory
        if self._root_lock_fd is not None:
            try:
                fcntl.flock(self._root_lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                self._release_lock()
                raise StoreLockedError(
                    f"a writer without a rank has the activation store at {os.fspath(root)!r} open (it holds "
                    f"{os.fspath(root / LOCK_FILE)!r}); StoreWriter(rank={self.rank}) cannot open beside it",
                    root / LOCK_FILE, exc.errno) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
        except OSError as exc:
            self._release_lock()
            ranks = [] if self.rank is not None else _ranks_writing(root)
            if ranks:
                raise StoreLockedError(
                    f"rank writer(s) {', '.join(ranks)} have the activation store at {os.fspath(root)!r} open; a "
                    f"writer without a rank cannot open beside them", d / LOCK_FILE, exc.errno) from exc
            raise StoreLockedError(f"another writer has the activation store at {os.fspath(d)!r} open (it holds "
                                   f"{os.fspath(d / LOCK_FILE)!r})", d / LOCK_FILE, exc.errno) from exc

    def _clean_leftovers(self, record: bool = True) -> None:
        """Remove what a killed writer left: open shards, temp manifests, unlisted shards."""
        listed = {s["file"] for s in self._manifest.get("shards", [])}
        for p in sorted(self.directory.iterdir()):
            name = p.name
            stray = name.endswith(TMP_SUFFIX) or (SHARD_RE.match(name) is not None and name not in listed)
            if not stray or not p.is_file():
                continue
            size = p.stat().st_size
            p.unlink()
            self.recovered.append({"file": name, "bytes": size, "removed": _now()})
            log.warning("activation store %s: removed %s (%d bytes) left by an interrupted writer; its rows "
                        "were never committed", self.directory, name, size)
        if self.recovered and record:
            self._manifest.setdefault("recovered", []).extend(self.recovered)
            write_json_atomic(self.directory / MANIFEST, self._manifest)

    def _remove_store_files(self) -> None:
        for p in self.directory.iterdir():
            if p.name == MANIFEST or p.name.endswith(TMP_SUFFIX) or SHARD_RE.match(p.name):
                p.unlink()
            elif p.is_dir() and p.name.startswith("rank") and (p / MANIFEST).exists():
                shutil.rmtree(p)

    def _restore_schema(self) -> None:
        m = self._manifest
        stored = Codec.from_dict(m["codec"])
        if stored != self.codec:
            raise StoreWriteError(
                f"the activation store at {os.fspath(self.directory)!r} uses codec {stored.spec!r}; "
                f"resume it with codec={stored.spec!r} (got {self.codec.spec!r})", self.directory)
        cols = []
        for kind, key in ((ACTIVATIONS, "hooks"), (TOKENS, "tokens")):
            for name, d in (m.get(key) or {}).items():
                cols.append(Column(kind, name, d["dtype"], tuple(d.get("shape", ())), d["chunk_rows"],
                                   raw_bytes=d.get("raw_bytes", 0), stored_bytes=d.get("stored_bytes", 0),
                                   rows=d.get("rows", 0)))
        self._set_columns(cols, m.get("rows_per_shard"))

    # ------------------------------------------------------------------ schema
    def _set_columns(self, cols: list[Column], rows_per_shard: int | None = None) -> None:
        for c in cols:
            if not c.chunk_rows:
                c.chunk_rows = max(1, self.chunk_size // max(1, c.row_bytes))
        total_row = sum(c.row_bytes for c in cols) or 1
        self._rows_per_shard = rows_per_shard or max(1, self.shard_size // total_row)
        if rows_per_shard is None:  # new columns: no chunk longer than a shard
            for c in cols:
                c.chunk_rows = min(c.chunk_rows, self._rows_per_shard)
        biggest = max(c.chunk_bytes for c in cols)
        reserve = self.num_workers * (biggest + biggest // 128 + 1024)  # raw + compressed while encoding
        # a pending and a kept (batch-start) chunk per column, one more to make progress, the workers
        need = (2 * len(cols) + 1) * biggest + reserve + self._pool.max_bytes
        if need > self.max_buffer_bytes:
            raise ValueError(
                f"max_buffer_bytes={self.max_buffer_bytes} is too small for {len(cols)} columns with chunks of up to "
                f"{biggest} bytes and {self.num_workers} workers; it needs at least {need} bytes "
                f"(or lower chunk_size / num_workers)")
        self._ceiling = self.max_buffer_bytes - reserve - self._pool.max_bytes
        self._columns = cols
        self._hooks = {c.name: c for c in cols if c.kind == ACTIVATIONS}
        self._tokens = {c.name: c for c in cols if c.kind == TOKENS}

    def _describe_schema(self) -> None:
        self._manifest["hooks"] = {c.name: c.describe() for c in self._hooks.values()}
        self._manifest["tokens"] = {c.name: c.describe() for c in self._tokens.values()}

    def _check_known(self, kind: str, given: set[str], known: Mapping[str, Column]) -> None:
        if given != set(known):
            missing = sorted(set(known) - given)
            extra = sorted(given - set(known))
            raise ValueError(f"every batch must give the same {kind}s as the first; missing: {missing or 'none'}, "
                             f"unexpected: {extra or 'none'} (expected: {sorted(known)})")

    def _check_column(self, c: Column, arr: np.ndarray, dt: str, what: str) -> None:
        if tuple(arr.shape[1:]) != c.feature_shape:
            raise ValueError(f"{what} {c.name!r}: feature shape {tuple(arr.shape[1:])} differs from earlier "
                             f"batches' {c.feature_shape} (batch shape {tuple(arr.shape)})")
        if dt != c.dtype:
            raise TypeError(f"{what} {c.name!r}: dtype {dt} differs from earlier batches' {c.dtype}")

    def _convert_tokens(self, tokens: Mapping[str, Any] | None, rows: int | None) -> dict[str, tuple[np.ndarray, str]]:
        if tokens is not None and not isinstance(tokens, Mapping):
            raise TypeError(f"tokens must be a mapping of field name to tensor, got {type(tokens).__name__}")
        out = {}
        for name, value in (tokens or {}).items():
            check_name(name, "token field")
            arr, dt = as_numpy(value, f"tokens[{name!r}]", TOKEN_DTYPES)
            if arr.ndim != 1:
                raise ValueError(f"token field {name!r}: expected shape [rows], got {tuple(arr.shape)}")
            if rows is not None and arr.shape[0] != rows:
                raise ValueError(f"token field {name!r} has {arr.shape[0]} rows; the batch has {rows}")
            if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _INT64_MAX:
                raise ValueError(f"token field {name!r} holds {int(arr.max())}, which does not fit int64; token values "
                                 f"must lie in -2**63 .. 2**63-1")
            out[name] = (arr, dt)
        if self._columns is not None:
            self._check_known("token field", set(out), self._tokens)
            for name, (arr, dt) in out.items():
                self._check_column(self._tokens[name], arr, dt, "token field")
        return out

    def _convert_activation(self, name: str, value: Any) -> tuple[np.ndarray, str]:
        if name not in self._hooks:  # a column of the schema was checked when it was made
            check_name(name, "hook point")
        arr, dt = as_numpy(value, f"activations[{name!r}]", ACTIVATION_DTYPES)
        if arr.ndim < 1:
            raise ValueError(f"hook point {name!r}: expected shape [rows, ...], got a 0-d tensor")
        if self._columns is not None:
            c = self._hooks.get(name)
            if c is None:
                raise ValueError(f"hook point {name!r} is not one of this store's hook points: {sorted(self._hooks)}")
            self._check_column(c, arr, dt, "hook point")
        return arr, dt

    # ------------------------------------------------------------------ appending
    def append(self, activations: Mapping[str, Any], tokens: Mapping[str, Any] | None = None) -> bool:
        """Add one batch: ``activations[hook]`` of shape ``[rows, *feature_shape]`` and
        ``tokens[name]`` of shape ``[rows]``, the same ``rows`` everywhere.

        Everything is checked before anything is written; the rows are copied before this
        returns, so the caller may reuse its tensors. Returns True if the batch was taken,
        False if it was dropped (``on_full="drop"``).
        """
        self._raise_if_unusable()
        if self._batch is not None:
            raise RuntimeError("append() inside begin_batch()/end_batch(); finish the open batch first")
        if not isinstance(activations, Mapping) or not activations:
            raise TypeError(f"activations must be a non-empty mapping of hook name to tensor, "
                            f"got {type(activations).__name__}")
        acts = {name: self._convert_activation(name, v) for name, v in activations.items()}
        toks = self._convert_tokens(tokens, None)
        counts = {f"activations[{n!r}]": a.shape[0] for n, (a, _) in acts.items()}
        counts.update({f"tokens[{n!r}]": a.shape[0] for n, (a, _) in toks.items()})
        if len(set(counts.values())) > 1:
            raise ValueError("all hook points and token fields of one append must have the same number of rows; got "
                             + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        if self._columns is not None:
            self._check_known("hook point", set(acts), self._hooks)
        else:  # everything is at hand: define the schema now, no staging copy
            self._create_schema({n: (dt, tuple(int(x) for x in a.shape[1:]), False) for n, (a, dt) in acts.items()},
                                toks)
        rows = next(iter(counts.values()))
        if not self._begin(rows, toks):
            self.end_batch()  # counts the drop
            return False
        try:
            for name, (arr, dt) in acts.items():
                self._add(name, dt, arr.shape[0], tuple(int(x) for x in arr.shape[1:]), False, [arr])
            self.end_batch()
        except BaseException:
            if self._batch is not None:
                self.abort_batch()
            raise
        return True

    def begin_batch(self, rows: int, tokens: Mapping[str, Any] | None = None) -> bool:
        """Open a batch of ``rows`` rows with its token fields; then :meth:`add` each hook
        point and call :meth:`end_batch` (or :meth:`abort_batch`). Returns False if the batch
        is dropped (``on_full="drop"``): its :meth:`add` calls are then accepted and ignored."""
        self._raise_if_unusable()
        if self._batch is not None:
            raise RuntimeError("begin_batch() called while a batch is open; call end_batch() or abort_batch() first")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
        return self._begin(rows, self._convert_tokens(tokens, rows))

    def _begin(self, rows: int, toks: dict[str, tuple[np.ndarray, str]]) -> bool:
        if self._columns is not None and self.on_full == "drop" and rows and (
                not self._budget.fits(self._bytes_needed(rows), self._ceiling)
                or (self._shard_rows + rows >= self._rows_per_shard and not self._commit_slot_free())):
            self._batch = _Batch(rows, dropped=True)
            return False
        self._batch = _Batch(rows, tokens=toks)
        if self._columns is not None:
            for c in self._columns:
                c.mark_batch_start()
            for name, (arr, _) in toks.items():
                self._feed(self._tokens[name], arr)
        return True

    def add(self, hook: str, value: Any, *, release: Callable[[], Any] | None = None) -> None:
        """Add rows ``[n, *feature_shape]`` of one hook point to the open batch. A hook point
        may come in several consecutive parts; by :meth:`end_batch` each must have all rows.

        Without ``release`` the rows are copied before this returns. With ``release`` (a cheap
        zero-argument callable that does not raise), full chunks of C-contiguous rows may be
        compressed and written straight from ``value``'s memory, which must then stay
        unchanged until ``release`` is called; see :meth:`add_packed` for when it is called.
        """
        done = self._release_handle(release, hook)
        try:
            if hook not in self._hooks:  # a column of the schema was checked when it was made
                check_name(hook, "hook point")
            if self._open_for(hook):
                arr, dt = self._convert_activation(hook, value)
                flat = arr.reshape(-1).view(np.uint8) if arr.flags.c_contiguous else None
                self._add(hook, dt, arr.shape[0], tuple(int(x) for x in arr.shape[1:]), False, [arr], flat, None,
                          done)
        finally:
            if done is not None:
                done()  # the caller's share; a job still writing from this memory holds its own

    def add_packed(self, hook: str, planes: Any, dtype: str, feature_shape: tuple[int, ...], *,
                   group_rows: int | None = None, release: Callable[[], Any] | None = None) -> None:
        """Like :meth:`add`, for rows already in byte-plane order (the HDF5 shuffle order).

        With ``group_rows=None``, ``planes`` is uint8 ``[itemsize, n * prod(feature_shape)]``
        (or the same bytes, flat) holding byte ``b`` of every element in row ``b``: one group.
        With ``group_rows=R``, ``planes`` is one C-contiguous uint8 buffer (any shape) of
        ``n * prod(feature_shape) * itemsize`` bytes holding consecutive groups: group ``g``
        covers rows ``g * R .. min((g + 1) * R, n)`` and is laid out as planes
        ``[itemsize, rows_g * F]``; ``n`` follows from the byte count. With a shuffling codec
        the CPU never shuffles; the writer copies byte runs, or nothing.

        Release contract: ``release`` (optional, a cheap zero-argument callable that does not
        raise) is called exactly once, when the writer will no longer read ``planes``:

        * on the caller's thread before this returns, when the rows were copied (the copying
          path), the batch is dropped (``on_full="drop"``), or the call is rejected -- if this
          raises before any chunk was handed to the writer, ``release`` has been called;
        * otherwise on a writer thread, once every zero-copy chunk of the call is written or
          discarded (writer failure, aborted batch, close) -- also when this call raises after
          handing chunks over; it is never called while a worker may still read the memory.

        Zero-copy applies when the hook point's schema is known, its chunks hold byte planes,
        ``group_rows`` (or ``n`` for one group) equals :meth:`chunk_rows` and the hook point's
        open chunk is empty; the full groups are then compressed where they lie and rows after
        the last full group are copied. An exception from ``release`` is logged and becomes
        the writer's error.
        """
        done = self._release_handle(release, hook)
        try:
            if hook not in self._hooks:  # a column of the schema was checked when it was made
                check_name(hook, "hook point")
            if group_rows is not None and (isinstance(group_rows, bool) or not isinstance(group_rows, int)
                                           or group_rows < 1):
                raise ValueError(f"group_rows must be None or a positive integer, got {group_rows!r}")
            if not self._open_for(hook):
                return
            if dtype not in ACTIVATION_DTYPES:
                raise TypeError(f"hook point {hook!r}: dtype {dtype!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
            arr, _ = as_numpy(planes, f"packed rows of {hook!r}", {"uint8": "|u1"})
            feature_shape = tuple(int(x) for x in feature_shape)
            itemsize = np.dtype(ACTIVATION_DTYPES[dtype]).itemsize
            elems = int(np.prod(feature_shape, dtype=np.int64))
            if group_rows is None and arr.ndim != 1:
                if arr.ndim != 2 or arr.shape[0] != itemsize or (elems and arr.shape[1] % elems):
                    raise ValueError(f"packed rows of {hook!r} must be uint8 [{itemsize}, rows * {elems}] for "
                                     f"{dtype} {feature_shape}, got {tuple(arr.shape)}")
                n = arr.shape[1] // elems if elems else 0
                groups, flat, group_rows = [arr], (arr.reshape(-1) if arr.flags.c_contiguous else None), n
            else:  # groups, or one group given flat
                if not arr.flags.c_contiguous:
                    raise ValueError(f"packed rows of {hook!r} with group_rows={group_rows} must be one C-contiguous "
                                     f"buffer, got shape {tuple(arr.shape)} with strides {arr.strides}")
                flat = arr.reshape(-1)
                row_bytes = elems * itemsize
                if flat.size % max(1, row_bytes) or (not row_bytes and flat.size):
                    raise ValueError(f"packed rows of {hook!r} hold {flat.size} bytes, not a whole number of "
                                     f"{dtype} {feature_shape} rows of {row_bytes} bytes")
                n = flat.size // row_bytes if row_bytes else 0
                group_rows = group_rows or max(1, n)
                groups = _groups(flat, n, group_rows, itemsize, elems)
            if self._columns is not None:
                self._check_column(self._hooks[hook], np.empty((0, *feature_shape)), dtype, "hook point") \
                    if hook in self._hooks else self._convert_activation(hook, np.empty((0, *feature_shape)))
            self._add(hook, dtype, n, feature_shape, True, groups, flat, group_rows, done)
        finally:
            if done is not None:
                done()  # the caller's share; a job still writing from this memory holds its own

    def chunk_rows(self, hook: str) -> int | None:
        """Rows per HDF5 chunk of ``hook`` (the ``group_rows`` that makes :meth:`add_packed`
        zero-copy), or None while the schema is not known (before the first batch ends)."""
        c = self._hooks.get(hook)
        return c.chunk_rows if c is not None else None

    def _release_handle(self, release: Callable[[], Any] | None, hook: str) -> _Release | None:
        if release is None:
            return None
        if not callable(release):
            raise TypeError(f"release must be None or a zero-argument callable, got {type(release).__name__}")
        return _Release(release, self, hook)

    def _open_for(self, hook: str) -> bool:
        self._raise_if_unusable()
        b = self._batch
        if b is None:
            raise RuntimeError(f"add({hook!r}) outside a batch; call begin_batch(rows) first")
        return not b.dropped

    def _add(self, hook: str, dt: str, n: int, shape: tuple[int, ...], planes: bool, parts: list[np.ndarray],
             flat: np.ndarray | None = None, group_rows: int | None = None, done: _Release | None = None) -> None:
        """Add ``n`` rows of ``hook`` given as ``parts`` (rows, or byte planes), in order.

        ``flat`` is the same rows as one contiguous uint8 buffer in chunk order (row-major, or
        byte planes grouped per ``group_rows`` rows) when they are laid out so; with ``done``
        (the caller's release), its full chunks may then go to a zero-copy job.
        """
        b = self._batch
        assert b is not None
        have = b.added.get(hook, 0)
        if have + n > b.rows:
            if have == b.rows:
                raise ValueError(f"hook point {hook!r} was already added to this batch")
            raise ValueError(f"hook point {hook!r} has {have + n} rows; the batch has {b.rows}")
        if self._columns is None and not b.staged.get(hook):  # a new column of the first batch
            known = {h: (p[0][1], p[0][3]) for h, p in b.staged.items() if p}
            known[hook] = (dt, shape)
            self._check_buffer_holds_rows([_row_bytes(d, s) for d, s in known.values()]
                                          + [_row_bytes(d, ()) for _, d in b.tokens.values()])
        b.added[hook] = have + n
        if self._columns is None:  # the first batch defines the schema: keep a copy until it ends
            staged = b.staged.setdefault(hook, [])
            if staged and (staged[0][1], staged[0][3]) != (dt, shape):
                raise ValueError(f"hook point {hook!r}: part with dtype {dt} {shape} differs from the first part's "
                                 f"{staged[0][1]} {staged[0][3]}")
            nbytes = sum(int(p.nbytes) for p in parts)
            if self._budget.held + nbytes > self.max_buffer_bytes:  # its copies count: refuse what cannot fit
                raise _too_small(self.max_buffer_bytes, b.rows, self._budget.held + nbytes, None)
            self._budget.force(nbytes)
            staged.extend((np.array(p, copy=True), dt, planes, shape) for p in parts)
            return
        c = self._hooks[hook]
        if done is not None and flat is not None and c.planes == planes and c.filled == 0 and c.buf is None \
                and n >= c.chunk_rows and (not planes or group_rows == c.chunk_rows):
            k = n // c.chunk_rows
            self._start_job(c, flat, k, done)
            # what is left is under one chunk of rows: it opens a chunk buffer and queues nothing
            parts = parts[k:] if planes else [parts[0][k * c.chunk_rows :]]
        for p in parts:
            self._feed(c, p, planes)

    def end_batch(self) -> None:
        """Close the open batch; every hook point must have been added."""
        b = self._batch
        if b is None:
            raise RuntimeError("end_batch() without begin_batch()")
        if b.dropped:
            self._batch = None
            self._drop(b.rows)
            return
        short = {h: n for h, n in b.added.items() if n != b.rows}
        if short:
            self.abort_batch()
            raise ValueError("every hook point needs all rows of the batch; "
                             + ", ".join(f"{h!r} got {n} of {b.rows}" for h, n in short.items()))
        if self._columns is None:
            self._first_batch_schema(b)
        else:
            try:
                self._check_known("hook point", set(b.added), self._hooks)
            except ValueError:
                self.abort_batch()
                raise
        for c in self._columns:  # type: ignore[union-attr]
            if c.keep is not None:
                self._budget.release(c.keep.nbytes)
                c.keep = None
        self._batch = None
        self._stats.batches += 1
        self._stats.rows_appended += b.rows
        self._shard_rows += b.rows
        if self._shard_rows >= self._rows_per_shard:
            self._end_shard()

    def _check_buffer_holds_rows(self, row_bytes: list[int]) -> None:
        """Fail early, before a first batch is staged, if ``max_buffer_bytes`` cannot hold even
        one-row chunks of these columns (the schema's own check, with chunks of one row: a
        lower bound of what it needs, so nothing that would fit is refused)."""
        biggest = max(row_bytes, default=0)
        need = (2 * len(row_bytes) + 1) * biggest + self.num_workers * (biggest + biggest // 128 + 1024) \
            + self._pool.max_bytes
        if need > self.max_buffer_bytes:
            raise ValueError(
                f"max_buffer_bytes={self.max_buffer_bytes} is too small to hold one row of each of {len(row_bytes)} "
                f"columns (rows of up to {biggest} bytes) with {self.num_workers} workers; it needs at least {need} "
                f"bytes")

    def _create_schema(self, hooks: dict[str, tuple[str, tuple[int, ...], bool]],
                       toks: dict[str, tuple[np.ndarray, str]]) -> None:
        cols = [Column(ACTIVATIONS, n, dt, shape, planes=self.codec.shuffle and planes)
                for n, (dt, shape, planes) in hooks.items()]
        cols += [Column(TOKENS, n, dt, ()) for n, (a, dt) in toks.items()]
        self._set_columns(cols)
        with self._manifest_lock:
            self._manifest["rows_per_shard"] = self._rows_per_shard
            self._describe_schema()

    def _first_batch_schema(self, b: _Batch) -> None:
        if not b.staged:
            self._batch = None
            raise ValueError("a batch needs at least one hook point; none was added")
        staged = _staged_bytes(b)
        try:
            self._create_schema({n: (parts[0][1], parts[0][3], parts[0][2]) for n, parts in b.staged.items()},
                                b.tokens)
            # the staged copies are fed into chunk buffers, each freed once fed: that needs room for
            # all of them, an open chunk per column and one more besides the workers' share
            cols = self._columns or []
            need = staged + (len(cols) + 1) * max(c.chunk_bytes for c in cols) + self.max_buffer_bytes - self._ceiling
            if need > self.max_buffer_bytes:
                raise _too_small(self.max_buffer_bytes, b.rows, staged, need)
        except ValueError:
            self._batch = None
            self._budget.release(staged)
            b.staged.clear()
            raise
        for c in self._columns:  # type: ignore[union-attr]
            c.mark_batch_start()
        for name, (arr, _) in b.tokens.items():
            self._feed(self._tokens[name], arr)
        for name, parts in b.staged.items():
            while parts:
                arr, _, planes, _ = parts.pop(0)
                self._feed(self._hooks[name], arr, planes)
                self._budget.release(arr.nbytes)
        b.staged.clear()

    def abort_batch(self) -> None:
        """Forget the open batch: every column goes back to where the batch began."""
        b = self._batch
        if b is None:
            return
        self._batch = None
        if b.staged:  # a first batch's copies: freed
            self._budget.release(_staged_bytes(b))
            b.staged.clear()
        if b.dropped or self._columns is None:
            return
        for c in self._columns:
            submitted = c.chunk_index > c.start_chunk
            if c.buf is not None and submitted:  # a later chunk of the batch: discard it
                self._budget.release(c.buf.nbytes)
                c.buf = None
            if c.keep is not None:  # the batch's first chunk went to the workers: rebuild it
                buf = c.new_buffer()
                c.copy_prefix(buf, c.keep, c.start_filled)
                c.buf = buf  # its bytes stay counted: ``keep``'s count moves to the new buffer
                c.keep = None
            elif c.start_filled == 0 and c.buf is not None:
                self._budget.release(c.buf.nbytes)
                c.buf = None
            c.filled = c.start_filled
            c.chunk_index = c.start_chunk
            if submitted:
                self._queue.put(("truncate", c, c.start_chunk))

    def _bytes_needed(self, rows: int) -> int:
        """Upper bound on the chunk buffers a batch of ``rows`` rows may allocate."""
        return sum((-(-rows // c.chunk_rows) + 2) * c.chunk_bytes for c in self._columns)  # type: ignore[union-attr]

    def count_dropped(self, rows: int) -> None:
        """Record a batch of ``rows`` rows that an upstream stage skipped (its own ``drop``
        policy), so the manifest counts every dropped batch."""
        self._drop(rows)

    def _drop(self, rows: int) -> None:
        self._stats.dropped_batches += 1
        self._stats.dropped_rows += rows
        with self._manifest_lock:
            self._manifest["dropped"]["batches"] += 1
            self._manifest["dropped"]["rows"] += rows
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("activation store %s: writer is full (%d bytes buffered), dropped a batch of %d rows; "
                        "%d batches / %d rows dropped so far (on_full='drop')", self.directory, self._budget.held,
                        rows, self._stats.dropped_batches, self._stats.dropped_rows)

    def _feed(self, c: Column, arr: np.ndarray, planes: bool = False) -> None:
        pos = 0
        n_rows = (arr.shape[1] // c.row_elems if c.row_elems else 0) if planes else arr.shape[0]
        while pos < n_rows:
            if c.buf is None:
                if self.on_full == "block":
                    self._budget.acquire(c.chunk_bytes, self._ceiling)
                    self._raise_if_unusable()
                else:
                    self._budget.force(c.chunk_bytes)
                c.buf = c.new_buffer(self._pool)
                c.filled = 0
            n = min(c.chunk_rows - c.filled, n_rows - pos)
            c.put(arr, planes, pos, n)
            c.filled += n
            pos += n
            if c.filled == c.chunk_rows:
                self._submit(c)

    def _submit(self, c: Column) -> None:
        buf, valid = c.buf, c.filled
        assert buf is not None
        if valid < c.chunk_rows:
            c.zero_tail(buf, valid)
        if self._batch is not None and c.chunk_index == c.start_chunk and c.start_filled:
            c.keep = buf  # rows from before the batch: needed again if the batch is aborted
            self._budget.force(buf.nbytes)
        try:
            fut = self._workers.submit(self._compress, buf, c.storage.itemsize, c.planes, c.keep is not buf)
        except RuntimeError:  # the pool is shut at interpreter exit: compress here
            fut = Future()
            fut.set_result(self._compress(buf, c.storage.itemsize, c.planes, c.keep is not buf))
        self._queue.put(("chunk", c, c.chunk_index, valid, fut))
        c.buf, c.filled = None, 0
        c.chunk_index += 1
        self._stats.copied_chunks += 1

    def _start_job(self, c: Column, flat: np.ndarray, k: int, done: _Release) -> None:
        """Hand the first ``k`` full chunks of ``flat`` (the caller's memory, in stored order)
        to the compressors as one job and queue it for the writer thread; nothing is copied.
        zstd compresses them in one call on up to ``num_workers`` native threads (on the job
        pool); other codecs split them into up to ``num_workers`` sub-batches on the workers."""
        size = c.chunk_bytes
        views = [flat[i * size : (i + 1) * size] for i in range(k)]  # [chunk_bytes] each
        itemsize, shuffled = c.storage.itemsize, c.planes
        # stored bytes made by the codec are counted; "none" stores the caller's memory itself
        owned = self.codec.name != "none" or (self.codec.shuffle and not shuffled)
        if self.codec.name == "zstd":
            futs = [self._run(self._jobs, views, itemsize, shuffled, min(k, self.num_workers), owned)]
        else:
            step = -(-k // min(k, self.num_workers))
            futs = [self._run(self._workers, views[i : i + step], itemsize, shuffled, 1, owned)
                    for i in range(0, k, step)]
        done.hold()
        self._queue.put(("job", c, c.chunk_index, [c.chunk_rows] * k, futs, done))
        c.chunk_index += k
        self._stats.jobs += 1
        self._stats.zero_copy_chunks += k

    def _run(self, pool: ThreadPoolExecutor, views: list[np.ndarray], itemsize: int, shuffled: bool, threads: int,
             owned: bool) -> Future:
        try:
            return pool.submit(self._compress_many, views, itemsize, shuffled, threads, owned)
        except RuntimeError:  # the pool is shut at interpreter exit: compress here
            fut: Future = Future()
            fut.set_result(self._compress_many(views, itemsize, shuffled, threads, owned))
            return fut

    def _commit_slot_free(self) -> bool:
        with self._commit_cond:
            return self._uncommitted <= self.max_pending_commits

    def _take_commit_slot(self) -> None:
        """Count one more ended shard, first waiting while ``max_pending_commits + 1`` shards
        (those waiting and the one being committed) are not committed yet: the backpressure
        that bounds what a crash can lose."""
        with self._commit_cond:
            if self._uncommitted > self.max_pending_commits and self._error is None:
                t0 = time.perf_counter()
                while self._uncommitted > self.max_pending_commits and self._error is None:
                    self._commit_cond.wait()
                self._commit_wait_s += time.perf_counter() - t0
            self._uncommitted += 1

    def _commit_done(self) -> None:
        """An ended shard is committed, or discarded after an error: its slot is free."""
        with self._commit_cond:
            self._uncommitted -= 1
            self._commit_cond.notify_all()

    def _end_shard(self) -> None:
        self._take_commit_slot()
        for c in self._columns:  # type: ignore[union-attr]
            if c.buf is not None and c.filled:
                self._submit(c)
            c.chunk_index = 0
        self._queue.put(("end", self._shard_rows))
        self._shard_rows = 0

    def _compress(self, buf: np.ndarray, itemsize: int, shuffled: bool, recycle: bool) -> tuple[Any, int, float, Any]:
        """Encode one chunk (worker thread). Returns the stored bytes, their CRC32, the time
        taken and the buffer to recycle once the bytes are written (if they are the buffer)."""
        t0 = time.perf_counter()
        data = self.codec.encode(buf, itemsize, shuffled=shuffled)
        crc = zlib.crc32(data)
        self._budget.force(memoryview(data).nbytes)
        self._budget.release(buf.nbytes)
        after_write = None
        if isinstance(data, np.ndarray):  # uncompressed: the buffer itself is written
            after_write = buf if recycle else None
        elif recycle:
            self._pool.put(buf)
        return data, crc, time.perf_counter() - t0, after_write

    def _compress_many(self, views: list[np.ndarray], itemsize: int, shuffled: bool, threads: int,
                       owned: bool) -> tuple[list[Any], list[int], float, int]:
        """Encode chunks that lie in the caller's memory (job or worker thread). Returns the
        stored bytes, their CRC32s, the time taken and the bytes counted in the budget until
        they are written (``owned``: the codec made them)."""
        t0 = time.perf_counter()
        datas = self.codec.encode_many(views, itemsize, shuffled=shuffled, threads=threads)
        crcs = [zlib.crc32(d) for d in datas]
        held = sum(memoryview(d).nbytes for d in datas) if owned else 0
        if held:
            self._budget.force(held)
        return datas, crcs, time.perf_counter() - t0, held

    # ------------------------------------------------------------------ writer thread
    def _writer_loop(self) -> None:
        shard: OpenShard | None = None
        index = 1 + max((s["index"] for s in self._manifest.get("shards", [])), default=-1)
        while True:
            item = self._queue.get()
            kind = item[0]
            if kind in ("stop", "sync"):  # through the committer, so it has finished too
                if kind == "stop" and shard is not None:
                    shard.abort()
                self._commits.put(item)
                if kind == "stop":
                    return
                continue
            try:
                if self._error is not None:  # failed: drain, freeing what was held
                    if kind == "chunk":
                        self._discard(item[4])
                    elif kind == "job":
                        self._discard_job(item[4], item[5])
                    elif kind == "end":
                        self._commit_done()
                    continue
                if kind == "chunk":
                    _, col, chunk_index, valid, fut = item
                    data, crc, dt, after_write = fut.result()
                    self._stats.compress_s += dt
                    if shard is None:
                        shard = self._open_shard(index)
                    t0 = time.perf_counter()
                    shard.write_chunk(col, chunk_index, valid, data, crc)
                    self._stats.write_s += time.perf_counter() - t0
                    self._budget.release(memoryview(data).nbytes)
                    if after_write is not None:
                        self._pool.put(after_write)
                elif kind == "job":  # the caller's memory is released once written (or on failure)
                    _, col, first, valid, futs, done = item
                    try:
                        results = self._gather(futs)
                        held = sum(r[3] for r in results)
                        try:
                            self._stats.compress_s += sum(r[2] for r in results)
                            if shard is None:
                                shard = self._open_shard(index)
                            t0 = time.perf_counter()
                            shard.write_chunks(col, first, valid, [d for r in results for d in r[0]],
                                               [x for r in results for x in r[1]])
                            self._stats.write_s += time.perf_counter() - t0
                        finally:
                            self._budget.release(held)
                    finally:
                        done()
                elif kind == "truncate":
                    if shard is not None:
                        shard.truncate(item[1], item[2])
                else:  # "end": close here, make durable and list on the committer thread
                    assert shard is not None
                    totals = {c.key: shard.totals(c) for c in self._columns}  # type: ignore[union-attr]
                    t0 = time.perf_counter()
                    shard.close_file(item[1])
                    self._stats.commit_s += time.perf_counter() - t0
                    self._commits.put(("commit", shard, item[1], totals))
                    shard = None
                    index += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                where = shard.tmp if shard is not None else self.directory / (shard_name(index) + TMP_SUFFIX)
                if shard is not None:
                    shard.abort()
                    shard = None
                if kind == "chunk":
                    self._discard(item[4])
                elif kind == "end":  # never reached the committer
                    self._commit_done()
                self._set_error(exc, where)

    def _open_shard(self, index: int) -> OpenShard:
        return OpenShard(self.directory, index, self._columns, self.codec,  # type: ignore[arg-type]
                         self._shard_attrs(index), write_behind=self.write_behind if self.fsync else 0)

    def _gather(self, futs: list[Future]) -> list[tuple[list[Any], list[int], float, int]]:
        """Results of a job's sub-batches, once every one has finished (so none still reads
        the caller's memory); on an error the budget they hold is released and it is raised."""
        results, error = [], None
        for fut in futs:
            try:
                results.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - raised below, after the others finished
                error = error or exc
        if error is not None:
            self._budget.release(sum(r[3] for r in results))
            raise error
        return results

    def _discard_job(self, futs: list[Future], done: _Release) -> None:
        try:
            results = self._gather(futs)  # on an error it has released what the others held
        except BaseException:  # noqa: BLE001 - the first error is the one reported
            results = []
        self._budget.release(sum(r[3] for r in results))
        done()

    def _release_failed(self, exc: Exception, hook: str) -> None:
        """An exception from a caller's ``release`` callback: logged, and the writer's error."""
        if self._error is None:
            err = StoreWriteError(f"the release callback given with hook point {hook!r} raised "
                                  f"{type(exc).__name__}: {exc}", self.directory)
            err.__cause__ = exc
            self._error = err
            log.error("%s", err)
        self._budget.fail()
        with self._commit_cond:
            self._commit_cond.notify_all()

    def _discard(self, fut: Future) -> None:
        try:
            data, _, _, _ = fut.result()
        except BaseException:  # noqa: BLE001 - the first error is the one reported
            return
        self._budget.release(memoryview(data).nbytes)

    def _set_error(self, exc: BaseException, where: Path) -> None:
        if self._error is None:
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            err = StoreWriteError(f"writing activation shard {os.fspath(where)!r} failed: {cause}", where,
                                  getattr(exc, "errno", None))
            err.__cause__ = exc
            self._error = err
            log.error("%s", err)
        self._budget.fail()
        with self._commit_cond:
            self._commit_cond.notify_all()

    def _shard_attrs(self, index: int) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "created": _now(),
            "shard_index": index,
            "codec": json.dumps(self.codec.to_dict()),
            "metadata": json.dumps(self.metadata),
        }

    def _commit_loop(self) -> None:
        while True:
            item = self._commits.get()
            if item[0] == "stop":
                return
            if item[0] == "sync":
                item[1].set()
                continue
            _, shard, rows, totals = item
            try:
                if self._error is not None:
                    shard.abort()
                    continue
                try:
                    self._commit(shard, rows, totals)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    shard.abort()
                    self._set_error(exc, shard.tmp)
            finally:
                self._commit_done()

    def publish_shard(self, shard: OpenShard) -> None:
        """Make a closed shard durable under its final name: fsync it, rename it, fsync the
        directory (committer thread; the manifest lists it after this returns). A subclass may
        override this to wrap each commit (the tests slow commits down this way); it must
        call ``super().publish_shard(shard)``."""
        shard.publish(self.fsync)

    def _commit(self, shard: OpenShard, rows: int, totals: dict[str, tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        self.publish_shard(shard)
        raw = sum(r for r, _ in totals.values())
        stored = sum(s for _, s in totals.values())
        with self._manifest_lock:
            for c in self._columns:  # type: ignore[union-attr]
                c.rows += rows
                c.raw_bytes += totals[c.key][0]
                c.stored_bytes += totals[c.key][1]
            self._manifest["shards"].append({
                "file": shard.final.name,
                "index": shard.index,
                "rows": rows,
                "bytes": shard.final.stat().st_size,
                "raw_bytes": raw,
                "stored_bytes": stored,
                "created": _now(),
            })
            self._manifest["rows"] += rows
            self._manifest["updated"] = _now()
            self._describe_schema()
            write_json_atomic(self.directory / MANIFEST, self._manifest)
        s = self._stats
        s.rows_committed += rows
        s.shards_committed += 1
        s.raw_bytes_committed += raw
        s.stored_bytes_committed += stored
        s.commit_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ control
    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StoreWriteError(f"the writer of {os.fspath(self.directory)!r} is closed", self.directory)

    def _sync(self) -> None:
        ev = threading.Event()
        self._queue.put(("sync", ev))
        ev.wait()

    def flush(self) -> None:
        """Commit every batch appended so far (the open shard ends early) and wait for it."""
        self._raise_if_unusable()
        if self._batch is not None:
            raise RuntimeError("flush() while a batch is open; call end_batch() or abort_batch() first")
        if self._shard_rows:
            self._end_shard()
        self._sync()
        self._raise_if_unusable()

    def close(self) -> None:
        """Commit every complete batch, stop the threads and release the store. A batch still
        open is aborted. Raises the first error of the worker or writer threads, if any."""
        if self._closed:
            return
        try:
            if self._batch is not None:
                log.warning("activation store %s: closing with a batch open; its rows are discarded", self.directory)
                self.abort_batch()
            if self._error is None and self._shard_rows:
                self._end_shard()
            self._sync()
            if self._error is None:
                with self._manifest_lock:
                    self._manifest["updated"] = _now()
                    write_json_atomic(self.directory / MANIFEST, self._manifest)
        except OSError as exc:
            if self._error is None:
                self._set_error(exc, self.directory / MANIFEST)
        finally:
            self._closed = True
            self._queue.put(("stop",))
            self._thread.join()
            self._committer.join()
            self._workers.shutdown(wait=True)
            self._jobs.shutdown(wait=True)
            self._release_lock()
            _OPEN_WRITERS.discard(self)
        if self._error is not None:
            raise self._error

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - nothing to raise to at interpreter exit
            log.error("closing activation store %s at exit failed: %s", self.directory, exc)

    def _release_lock(self) -> None:
        for attr in ("_lock_fd", "_root_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()  # commit the complete batches given before the error
            except Exception as close_exc:  # noqa: BLE001 - the body's exception wins
                log.error("closing activation store %s after an error failed: %s", self.directory, close_exc)

    # ------------------------------------------------------------------ introspection
    @property
    def rows_committed(self) -> int:
        """Rows in committed shards (what a reader sees), including earlier sessions."""
        return int(self._manifest["rows"])

    @property
    def failed(self) -> bool:
        return self._error is not None

    def stats(self) -> dict[str, Any]:
        """Counters of this writer session: rows, bytes, ratio, time blocked, dropped, rates,
        and chunks by path (``zero_copy_chunks`` in ``jobs``, ``copied_chunks``)."""
        s = self._stats
        elapsed = time.perf_counter() - s.started
        return {
            "batches": s.batches,
            "rows_appended": s.rows_appended,
            "rows_committed": s.rows_committed,
            "shards_committed": s.shards_committed,
            "dropped_batches": s.dropped_batches,
            "dropped_rows": s.dropped_rows,
            "raw_bytes": s.raw_bytes_committed,
            "stored_bytes": s.stored_bytes_committed,
            "compression_ratio": (s.raw_bytes_committed / s.stored_bytes_committed) if s.stored_bytes_committed else None,
            "buffered_bytes": self._budget.held,
            "peak_buffered_bytes": self._budget.peak,
            "max_buffer_bytes": self.max_buffer_bytes,
            "time_blocked_s": self._budget.blocked_s + self._commit_wait_s,
            "compress_s": s.compress_s,
            "write_s": s.write_s,
            "commit_s": s.commit_s,
            "zero_copy_chunks": s.zero_copy_chunks,
            "copied_chunks": s.copied_chunks,
            "jobs": s.jobs,
            "elapsed_s": elapsed,
            "write_rate_bytes_per_s": s.raw_bytes_committed / elapsed if elapsed > 0 else 0.0,
        }
