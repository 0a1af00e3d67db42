"""The open shard: where the writer thread puts compressed chunks, and how a shard is committed.

Stage: the writer thread of :class:`~lightning_llm_inst.store.writer.StoreWriter`. An
:class:`OpenShard` is ``shard-NNNNNN.h5.tmp`` while it is filled (one chunk at a time, or a
writer job's run of chunks with one resize); :meth:`OpenShard.close_file`
writes its checksums and row count and closes it; :meth:`OpenShard.publish` (on the
committer thread, while the writer fills the next shard) fsyncs and renames it to
``shard-NNNNNN.h5``.
The manifest is updated by the writer after that, so a reader never sees a partial shard.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_llm_inst.store.chunking import Column
from lightning_llm_inst.store.codecs import Codec
from lightning_llm_inst.store.format import TMP_SUFFIX, checksum_path, dataset_path, fsync_path, shard_name

__all__ = ["OpenShard"]


class OpenShard:
    """One shard being written: datasets created up front, chunks written directly.

    ``write_behind`` (bytes, 0 = off): after that many stored bytes, ask the kernel to start
    writing the file's dirty pages out now (``posix_fadvise(DONTNEED)``: asynchronous
    writeback, clean pages dropped) instead of leaving them all to the commit's fsync -- so
    the disk works while the shard fills, and the page cache stays small.
    """

    def __init__(self, directory: Path, index: int, columns: list[Column], codec: Codec, attrs: dict[str, Any],
                 write_behind: int = 0) -> None:
        import h5py

        self.index = index
        self.directory = directory
        self.final = directory / shard_name(index)
        self.tmp = directory / (shard_name(index) + TMP_SUFFIX)
        self.columns = columns
        # per column: chunk index -> (crc32, stored bytes, raw bytes); a chunk may be rewritten
        self.chunks: dict[str, dict[int, tuple[int, int, int]]] = {c.key: {} for c in columns}
        self.file = h5py.File(self.tmp, "w")
        self._write_behind = write_behind if hasattr(os, "posix_fadvise") else 0
        self._unflushed = 0
        self._fd: int | None = None
        if self._write_behind:
            try:
                self._fd = int(self.file.id.get_vfd_handle())
            except Exception:  # noqa: BLE001 - a driver without a file descriptor: no write-behind
                self._write_behind = 0
        try:
            for k, v in attrs.items():
                self.file.attrs[k] = v
            self.datasets = {}
            for c in columns:
                ds = self.file.create_dataset(
                    dataset_path(c.kind, c.name), shape=(0, *c.feature_shape), maxshape=(None, *c.feature_shape),
                    chunks=(c.chunk_rows, *c.feature_shape), dtype=c.storage, **codec.h5py_kwargs(),
                )
                ds.attrs["dtype"] = c.dtype
                self.datasets[c.key] = ds
        except BaseException:
            self.abort()
            raise

    def write_chunk(self, col: Column, chunk_index: int, valid_rows: int, data: bytes | np.ndarray, crc: int) -> None:
        ds = self.datasets[col.key]
        start = chunk_index * col.chunk_rows
        if ds.shape[0] < start + valid_rows:
            ds.resize(start + valid_rows, axis=0)
        ds.id.write_direct_chunk((start,) + (0,) * len(col.feature_shape), data)
        nbytes = memoryview(data).nbytes
        self.chunks[col.key][chunk_index] = (crc, nbytes, valid_rows * col.row_bytes)
        self._wrote(nbytes)

    def _wrote(self, nbytes: int) -> None:
        if not self._write_behind:
            return
        self._unflushed += nbytes
        if self._unflushed >= self._write_behind:
            self._unflushed = 0
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)  # type: ignore[arg-type]
            except OSError:
                self._write_behind = 0  # advisory only: the commit's fsync still makes it durable

    def write_chunks(self, col: Column, first_index: int, valid_rows: list[int], datas: list[Any],
                     crcs: list[int]) -> None:
        """Write consecutive chunks ``first_index, first_index + 1, ...`` of ``col`` (a job of
        the writer): the dataset is resized once, then each chunk is written as it is."""
        ds = self.datasets[col.key]
        step = col.chunk_rows
        end = max((first_index + i) * step + v for i, v in enumerate(valid_rows)) if valid_rows else 0
        if ds.shape[0] < end:
            ds.resize(end, axis=0)
        rest = (0,) * len(col.feature_shape)
        table = self.chunks[col.key]
        total = 0
        for i, (valid, data, crc) in enumerate(zip(valid_rows, datas, crcs, strict=True)):
            ds.id.write_direct_chunk(((first_index + i) * step, *rest), data)
            nbytes = memoryview(data).nbytes
            table[first_index + i] = (crc, nbytes, valid * col.row_bytes)
            total += nbytes
        self._wrote(total)

    def truncate(self, col: Column, chunk_index: int) -> None:
        """Forget chunks ``chunk_index`` and after (an aborted batch). The cut is on a chunk
        boundary, so HDF5 drops whole chunks and never has to re-filter one."""
        ds = self.datasets[col.key]
        rows = chunk_index * col.chunk_rows
        if ds.shape[0] > rows:
            ds.resize(rows, axis=0)
        table = self.chunks[col.key]
        for ci in [ci for ci in table if ci >= chunk_index]:
            del table[ci]

    def totals(self, col: Column) -> tuple[int, int]:
        """(raw bytes, stored bytes) written for ``col``."""
        table = self.chunks[col.key].values()
        return sum(r for _, _, r in table), sum(s for _, s, _ in table)

    def close_file(self, rows: int) -> None:
        """Write checksums and the row count and close the file (writer thread)."""
        for c in self.columns:
            got = self.datasets[c.key].shape[0]
            table = self.chunks[c.key]
            if got != rows or sorted(table) != list(range(len(table))):
                raise RuntimeError(f"shard {self.tmp} dataset {c.key} holds {got} rows in chunks {sorted(table)}, "
                                   f"expected {rows} rows")
            crcs = np.asarray([table[i][0] for i in range(len(table))], dtype="<u4")
            self.file.create_dataset(checksum_path(c.kind, c.name), data=crcs)
        self.file.attrs["rows"] = rows
        self.file.close()

    def publish(self, fsync: bool) -> None:
        """Make the closed file durable and give it its final name (committer thread)."""
        if fsync:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.final)
        if fsync:
            fsync_path(self.directory)

    def abort(self) -> None:
        """Close and delete the temporary file (after an error)."""
        with contextlib.suppress(Exception):  # closing a broken file must not hide the first error
            self.file.close()
        try:
            self.tmp.unlink()
        except OSError:
            pass
