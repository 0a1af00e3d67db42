"""The shard-writing process: HDF5 calls of the writer thread, moved out of the caller's process.

Stage: behind :class:`~lightning_llm_inst.store.shard_process.ProcessShard`. h5py holds the
GIL inside every HDF5 call, including the ``write()`` under ``write_direct_chunk`` that the
kernel may stall for disk writeback; in a process of its own that stall cannot stop the
threads launching a model's kernels. This script reads framed commands on stdin (``open``,
``chunk``, ``truncate``, ``close``, ``abort``), answers ``close`` / ``abort`` on stdout, and
imports only the standard library, numpy and h5py. Chunk bytes are read from the shared-memory
ring named on the command line (``shm_offset`` / ``shm_size``; each is acknowledged once
written) or, for chunks too large for it, follow their header on stdin.

Frame: 4-byte little-endian header length, the JSON header, then ``header["size"]`` payload bytes.
"""

import contextlib
import json
import os
import struct
import sys

from typing import Any

import numpy as np


def read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, min(n, 1 << 24))
        if not b:
            raise EOFError
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def reply(fd: int, msg: dict) -> None:
    data = json.dumps(msg).encode()
    os.write(fd, struct.pack("<I", len(data)) + data)


def main() -> None:
    from multiprocessing import shared_memory

    import h5py

    shm = shared_memory.SharedMemory(name=sys.argv[1])
    shm.unlink()  # mapped by both processes now: drop the name, so a killed writer leaves nothing behind
    try:
        serve(h5py, np.frombuffer(shm.buf, dtype=np.uint8))
    finally:  # the ring's views are gone (unless an error's traceback holds one): unmap before exit
        with contextlib.suppress(BufferError):
            shm.close()


def serve(h5py: Any, ring: np.ndarray) -> None:
    """Answer the writer's commands until it says ``exit`` or goes away."""
    fin, fout = sys.stdin.fileno(), sys.stdout.fileno()
    f = None
    datasets: dict = {}
    tmp = None
    error: BaseException | None = None
    while True:
        try:
            (n,) = struct.unpack("<I", read_exact(fin, 4))
            head = json.loads(read_exact(fin, n))
            payload = read_exact(fin, head["size"]) if head.get("size") else b""
        except EOFError:  # the writer's process is gone: leave the temporary file for recovery
            if f is not None:
                f.close()
            return
        op = head["op"]
        try:
            if op == "exit":
                return
            if op == "open":
                error, tmp, datasets = None, head["tmp"], {}
                f = h5py.File(tmp, "w")
                for k, v in head["attrs"].items():
                    f.attrs[k] = v
                kw = head["codec"]
                if "compression_opts" in kw:
                    kw["compression_opts"] = tuple(kw["compression_opts"])
                for d in head["datasets"]:
                    ds = f.create_dataset(d["path"], shape=(0, *d["shape"]), maxshape=(None, *d["shape"]),
                                          chunks=(d["chunk_rows"], *d["shape"]), dtype=np.dtype(d["storage"]), **kw)
                    ds.attrs["dtype"] = d["dtype"]
                    datasets[d["key"]] = ds
            elif op == "chunk":
                try:
                    if error is None:
                        if "shm_offset" in head:
                            payload = ring[head["shm_offset"] : head["shm_offset"] + head["shm_size"]]
                        ds = datasets[head["key"]]
                        if ds.shape[0] < head["rows"]:
                            ds.resize(head["rows"], axis=0)
                        ds.id.write_direct_chunk(tuple(head["offset"]), payload)
                finally:
                    if "shm_offset" in head:
                        reply(fout, {"ack": 1})  # its ring slice may be reused
            elif op == "truncate":
                if error is None:
                    ds = datasets[head["key"]]
                    if ds.shape[0] > head["rows"]:
                        ds.resize(head["rows"], axis=0)
            elif op == "close":
                if error is None:
                    for path, crcs in head["checksums"]:
                        f.create_dataset(path, data=np.asarray(crcs, dtype="<u4"))
                    f.attrs["rows"] = head["rows"]
                    f.close()
                    f = None
                reply(fout, {"ok": error is None, **_describe(error)})
            elif op == "abort":
                if f is not None:
                    with contextlib.suppress(Exception):  # a broken file is deleted anyway
                        f.close()
                    f = None
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                reply(fout, {"ok": True})
        except BaseException as exc:  # noqa: BLE001 - reported now, and again at close
            first = error is None
            error = error or exc
            if op == "close":
                reply(fout, {"ok": False, **_describe(error)})
            elif first:
                reply(fout, {"ok": False, "early": True, **_describe(error)})


def _describe(exc: BaseException | None) -> dict:
    if exc is None:
        return {}
    return {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None),
            "strerror": getattr(exc, "strerror", None)}


if __name__ == "__main__":
    main()
