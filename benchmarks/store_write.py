"""Write-throughput benchmark of the activation store, against the machine's ceilings.

What it measures, all in one run, on activation-like bfloat16 data generated once in memory
(heavy-tailed Student-t values, per-dimension scales, a few outlier dimensions 20-100x larger,
per-token and per-layer norm changes; by default 8 hook points of d_model 2048, i.e. 32 KiB per
token row, plus ``input_ids`` / ``sequence_id`` / ``position`` int64 token columns):

(a) disk: one large sequential write (16 MiB ``os.write`` calls) then ``fsync``, in GB/s (after
    an untimed write of the same size, so page-cache memory is warm: the best case);
(b) compression only, no disk: every 1 MiB chunk of the data through ``Codec.encode`` on a
    ``ThreadPoolExecutor`` of ``num_workers`` threads (the writer's default: min(16, CPUs)),
    per codec: GB/s of raw input and the compression ratio;
(c) a naive baseline: h5py's own filter pipeline on one thread (``hdf5plugin.Zstd`` /
    ``hdf5plugin.LZ4`` with ``shuffle=True``, or no filter for "none"), resizable chunked
    datasets appended batch by batch with ``resize`` + slice assignment, then close + fsync;
(d) ours: ``StoreWriter`` with each codec ("none", "lz4", "zstd:1", "zstd:3"), timed from the
    first ``append`` to after ``close()`` returns (every shard and the manifest fsynced).

It also times the writer's stages on one thread (chunk copy, byte shuffle, compressor alone,
crc32, ``write_direct_chunk``) and reports the writer's own counters (time the caller spent in
``append``, time blocked on the buffer bound, worker and writer-thread busy time), so the
report can say where the time goes.

The "ceiling" of a codec is min(disk GB/s x ratio, compression-only GB/s): what the machine
could sustain for that codec; ``ours / ceiling`` is the writer's efficiency against it.

Each timed measurement runs ``--repeats`` times; medians and the min-max spread are reported.
GB is 10^9 bytes; GiB is 2^30. Rates are of raw (uncompressed) bytes unless marked "stored".

Run it (the data it writes goes to a temporary folder under ``--dir``, deleted at the end)::

    python benchmarks/store_write.py --gib 1
    python benchmarks/store_write.py --gib 2 --repeats 3 --dir /mnt/nvme --tag h100

Results go to ``benchmarks/results/store_write-<tag>.json`` and ``.md`` (``<tag>`` defaults
to ``cpu<N>``), and also under ``$OUT`` when that environment variable is set. ``hdf5plugin``
is optional: without it the compressed baselines (c) and the read-back check are skipped.
Lightning is never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from disk import write_file  # noqa: E402  (benchmarks/disk.py: this script's folder is on sys.path)
from lightning_llm_inst.store import ActivationStore, StoreWriter, make_codec  # noqa: E402
from lightning_llm_inst.store.codecs import shuffle_bytes  # noqa: E402
from lightning_llm_inst.store.format import parse_bytes  # noqa: E402

GB = 1e9
GIB = 1 << 30
MIB = 1 << 20
TOKEN_FIELDS = ("input_ids", "sequence_id", "position")
BASELINES = {"none": ("h5py, no filter", None), "lz4": ("hdf5plugin.LZ4()", ("LZ4", {})),
             "zstd:1": ("hdf5plugin.Zstd(clevel=1)", ("Zstd", {"clevel": 1})),
             "zstd:3": ("hdf5plugin.Zstd(clevel=3)", ("Zstd", {"clevel": 3}))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_note(cores: float | None) -> str:
    return f"; other processes used {cores:.2f} cores" if cores is not None and cores >= 0.1 else ""


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def fmt(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# ---------------------------------------------------------------------------- machine
def machine_info(target: Path) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    fs = None
    try:  # the mount holding the target directory
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ, opts = line.split()[:4]
            if str(target.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, {"device": dev, "mount": mnt, "type": typ, "options": opts}
    except OSError:
        pass
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "cpu_model": model,
                            "memory_bytes": mem_total, "python": platform.python_version(),
                            "platform": platform.platform(), "numpy": np.__version__, "target_dir": str(target),
                            "target_fs": fs}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["cuda_device"] = torch.cuda.get_device_name(0) if info["cuda_available"] else None
    except Exception as exc:  # noqa: BLE001 - informational only
        info["torch"] = None
        info["cuda_available"] = False
        info["cuda_device"] = f"torch unavailable: {exc}"
    for mod in ("h5py", "hdf5plugin", "zstandard", "lz4"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or getattr(m, "version", None)
            if mod == "h5py":
                info["hdf5"] = m.version.hdf5_version
        except ImportError:
            info[mod] = None
    return info


# ---------------------------------------------------------------------------- data
def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, as torch does."""
    b = x.view(np.uint32)
    rounded = b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


class Data:
    """A pool of pre-generated batches, cycled to reach the requested size."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.hooks = [f"blocks.{i * 2}.hook_resid_post" for i in range(args.hooks)]
        self.d = args.d_model
        self.rows = args.batch_tokens
        self.seq_len = min(args.seq_len, self.rows)
        self.row_bytes = len(self.hooks) * self.d * 2
        self.batch_act_bytes = self.rows * self.row_bytes
        self.n_batches = max(1, round(args.gib * GIB / self.batch_act_bytes))
        self.n_pool = max(1, min(args.pool_batches, self.n_batches))
        self.total_rows = self.n_batches * self.rows
        self.act_bytes = self.total_rows * self.row_bytes
        self.token_bytes = self.total_rows * 8 * len(TOKEN_FIELDS)
        self.raw_bytes = self.act_bytes + self.token_bytes
        self.pool: list[dict[str, np.ndarray]] = []
        self.dof = args.dof
        self.seed = args.seed

    def batch_index(self, i: int) -> int:
        return i % self.n_pool

    def generate(self, threads: int) -> float:
        t0 = time.perf_counter()
        ss = np.random.SeedSequence(self.seed)
        rng = np.random.default_rng(ss.spawn(1)[0])
        L = len(self.hooks)
        # massive-activation dimensions persist across layers; each layer adds a couple
        shared_out = rng.choice(self.d, size=4, replace=False)
        params = []
        for li in range(L):
            scale = rng.lognormal(0.0, 0.5, size=self.d).astype(np.float32)
            extra = rng.choice(self.d, size=2, replace=False)
            out = np.unique(np.concatenate([shared_out, extra]))
            mag = rng.uniform(20.0, 100.0, size=out.size).astype(np.float32)
            scale[out] *= mag
            mean = np.zeros(self.d, np.float32)
            mean[out] = rng.choice([-1.0, 1.0], size=out.size) * scale[out] * 0.5
            growth = 0.2 * (1.0 + 3.0 * li / max(1, L - 1))  # residual norm grows with depth
            params.append((scale * growth, mean * growth))
        self.pool = [{} for _ in range(self.n_pool)]
        seeds = ss.spawn(self.n_pool * (L + 1) + 1)[1:]

        def make(b: int, li: int) -> None:
            r = np.random.default_rng(seeds[b * (L + 1) + li])
            tok_scale = np.random.default_rng(seeds[b * (L + 1) + L]).lognormal(0.0, 0.3, size=(self.rows, 1))
            out = np.empty((self.rows, self.d), np.uint16)
            scale, mean = params[li]
            step = 1024
            for a in range(0, self.rows, step):
                n = min(step, self.rows - a)
                z = r.standard_normal((n, self.d), dtype=np.float32)
                g = r.standard_gamma(self.dof / 2.0, size=(n, self.d), dtype=np.float32)
                z /= np.sqrt(g * np.float32(2.0 / self.dof))  # Student-t, dof degrees of freedom
                z *= scale
                z += mean
                z *= tok_scale[a : a + n].astype(np.float32)
                out[a : a + n] = to_bf16_bits(z)
            self.pool[b][self.hooks[li]] = out

        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(lambda bl: make(*bl), [(b, li) for b in range(self.n_pool) for li in range(L)]))
        for b in range(self.n_pool):
            pos = np.arange(self.rows, dtype=np.int64) % self.seq_len
            self.pool[b]["position"] = pos
            self.pool[b]["sequence_id"] = np.arange(self.rows, dtype=np.int64) // self.seq_len
            self.pool[b]["input_ids"] = rng.integers(0, 128_000, size=self.rows, dtype=np.int64)
        return time.perf_counter() - t0

    def batch(self, i: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Batch ``i`` (numpy): activations as uint16 bf16 bits, tokens with true global ids."""
        p = self.pool[self.batch_index(i)]
        acts = {h: p[h] for h in self.hooks}
        toks = {"input_ids": p["input_ids"], "position": p["position"],
                "sequence_id": p["sequence_id"] + i * (self.rows // self.seq_len)}
        return acts, toks


def torch_batch(acts: dict[str, np.ndarray], toks: dict[str, np.ndarray]) -> tuple[dict, dict]:
    import torch

    ta = {h: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for h, a in acts.items()}
    tt = {k: torch.from_numpy(v) for k, v in toks.items()}
    return ta, tt


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have run (user+nice+system+irq+softirq), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _thread_faults() -> int:
    """Minor page faults of the calling thread so far (fresh memory being touched)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (ImportError, AttributeError, OSError):
        return 0


class OtherLoad:
    """Cores' worth of CPU used by *other* processes while a measurement ran (noise check)."""

    def __enter__(self) -> OtherLoad:
        self.b0, self.c0, self.t0 = _machine_busy_s(), time.process_time(), time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        b1, c1, t1 = _machine_busy_s(), time.process_time(), time.perf_counter()
        if self.b0 is not None and b1 is not None and t1 > self.t0:
            self.cores = max(0.0, ((b1 - self.b0) - (c1 - self.c0)) / (t1 - self.t0))


class ThreadCPU:
    """CPU seconds of the writer's own threads (by name), sampled from /proc on Linux.

    The threads end inside ``close()``, so the last sample may miss up to ``interval`` seconds
    of each one's CPU; empty where /proc is not available.
    """

    def __init__(self, prefix: str = "llm-inst-", interval: float = 0.02) -> None:
        self.prefix = prefix
        self.interval = interval
        self.cpu: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)

    def _sample(self) -> None:
        for t in threading.enumerate():
            if not t.name.startswith(self.prefix) or not t.native_id:
                continue
            try:
                fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            cpu = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
            key = (t.name, t.native_id)
            self.cpu[key] = max(cpu, self.cpu.get(key, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ThreadCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def total(self, name_prefix: str) -> float | None:
        vals = [v for (n, _), v in self.cpu.items() if n.startswith(name_prefix)]
        return sum(vals) if vals else None


# ---------------------------------------------------------------------------- (a) disk
def disk_write(directory: Path, nbytes: int, block: int = 16 * MIB, warmup: bool = True) -> dict[str, float]:
    """Sequential write of ``nbytes`` then fsync: the best case the writer could reach.

    An untimed write of the same size comes first and is deleted just before the timed one,
    so the timed write finds page-cache memory ready: on VMs that hand freed memory back to
    the host (virtio balloon / free page reporting) first-touching cold memory costs ~0.4 s/GiB,
    and the first write after big deletes (``discard`` mounts) is slower than steady state."""
    buf = memoryview(np.random.default_rng(1).integers(0, 256, size=block, dtype=np.uint8).tobytes())
    path = directory / "disk_write.bin"
    if warmup:
        warm = directory / "disk_warmup.bin"
        write_file(warm, nbytes, buf, block)
        warm.unlink()
    write_s, fsync_s = write_file(path, nbytes, buf, block)
    path.unlink()
    return {"gbps": nbytes / (write_s + fsync_s) / GB, "write_s": write_s, "fsync_s": fsync_s, "bytes": nbytes}


# ---------------------------------------------------------------------------- (b) compression only
def chunk_views(data: Data, chunk_rows: int):
    for i in range(data.n_batches):
        acts, _ = data.batch(i)
        for a in acts.values():
            for r in range(0, a.shape[0], chunk_rows):
                yield a[r : r + chunk_rows]


def compress_only(data: Data, spec: str, workers: int, chunk_rows: int) -> dict[str, float]:
    codec = make_codec(spec)

    def enc(a: np.ndarray) -> int:
        return memoryview(codec.encode(a, 2)).nbytes

    with ThreadPoolExecutor(max_workers=workers) as ex:
        ex.submit(enc, data.pool[0][data.hooks[0]][:chunk_rows]).result()  # warm: thread-local compressors
        raw = 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        futs = []
        for v in chunk_views(data, chunk_rows):
            raw += v.nbytes
            futs.append(ex.submit(enc, v))
        stored = sum(f.result() for f in futs)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
    return {"gbps": raw / dt / GB, "ratio": raw / stored, "seconds": dt, "cpu_s": cpu, "raw_bytes": raw,
            "stored_bytes": stored}


# ---------------------------------------------------------------------------- stages, one thread
def fast_shuffle_2(raw: np.ndarray) -> np.ndarray:
    """Shuffle for 2-byte elements by integer ops (reference for the library's transpose)."""
    u = raw.reshape(-1).view(np.uint16)
    out = np.empty(u.size * 2, np.uint8)
    np.bitwise_and(u, 0xFF, out=out[: u.size], casting="unsafe")
    np.right_shift(u, 8, out=out[u.size :], casting="unsafe")
    return out


def stage_rates(data: Data, specs: list[str], chunk_rows: int, directory: Path, n_chunks: int = 64) -> dict[str, Any]:
    src = data.pool[0][data.hooks[-1]]
    chunks = [src[(i * chunk_rows) % (src.shape[0] - chunk_rows + 1):][:chunk_rows] for i in range(n_chunks)]
    nbytes = sum(c.nbytes for c in chunks)

    def rate(fn, items) -> float:
        fn(items[0])
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        return nbytes / (time.perf_counter() - t0) / GB

    def copy(c: np.ndarray) -> None:  # what append does per chunk: allocate, copy rows in
        buf = np.empty_like(c)
        buf[:] = c

    res: dict[str, Any] = {"chunk_bytes": chunks[0].nbytes, "chunks": n_chunks}
    res["copy_into_new_chunk_buffer"] = rate(copy, chunks)
    res["shuffle_bytes (library)"] = rate(lambda c: shuffle_bytes(c, 2), chunks)
    res["shuffle by integer ops (reference)"] = rate(fast_shuffle_2, chunks)
    assert np.array_equal(shuffle_bytes(chunks[0], 2), fast_shuffle_2(chunks[0]))
    shuffled = [shuffle_bytes(c, 2) for c in chunks]
    res["crc32"] = rate(lambda c: zlib.crc32(c), shuffled)
    enc_full, enc_comp = {}, {}
    for spec in specs:
        codec = make_codec(spec)
        enc_full[spec] = rate(lambda c: codec.encode(c, 2), chunks)
        if codec.shuffle:  # the compressor alone, on already-shuffled bytes
            bare = make_codec(spec + "-noshuffle")
            enc_comp[spec] = rate(lambda c: bare.encode(c, 2), shuffled)
    res["encode (shuffle + compress)"] = enc_full
    res["compressor alone, pre-shuffled input"] = enc_comp
    try:  # the writer thread's per-chunk HDF5 call, page cache only (no fsync)
        import h5py

        codec = make_codec("zstd:1")
        blobs = [codec.encode(c, 2) for c in chunks]
        path = directory / "direct_chunk.h5"
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("x", shape=(0, data.d), maxshape=(None, data.d), chunks=(chunk_rows, data.d),
                                  dtype="<u2", **codec.h5py_kwargs())
            t0 = time.perf_counter()
            for i, b in enumerate(blobs):
                ds.resize((i + 1) * chunk_rows, axis=0)
                ds.id.write_direct_chunk((i * chunk_rows, 0), b)
            dt = time.perf_counter() - t0
        path.unlink()
        res["h5py resize + write_direct_chunk, zstd:1 chunks, no fsync (raw GB/s)"] = nbytes / dt / GB
    except ImportError:
        pass
    return res


# ---------------------------------------------------------------------------- (c) baseline
def baseline_h5py(data: Data, spec: str, path: Path, chunk_rows: int, token_chunk_bytes: int,
                  hdf5plugin: Any) -> dict[str, Any]:
    import h5py

    _, plugin = BASELINES[spec]
    kw: dict[str, Any] = {}
    shuffle = False
    if plugin is not None:
        name, opts = plugin
        kw = dict(getattr(hdf5plugin, name)(**opts))
        shuffle = True
    f = h5py.File(path, "w")
    ds = {}
    for h in data.hooks:
        ds[h] = f.create_dataset(f"activations/{h}", shape=(0, data.d), maxshape=(None, data.d),
                                 chunks=(chunk_rows, data.d), dtype="<u2", shuffle=shuffle, **kw)
    for t in TOKEN_FIELDS:
        ds[t] = f.create_dataset(f"tokens/{t}", shape=(0,), maxshape=(None,), chunks=(token_chunk_bytes // 8,),
                                 dtype="<i8", shuffle=shuffle, **kw)
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(data.n_batches):
        acts, toks = data.batch(i)
        for k, arr in (*acts.items(), *toks.items()):
            d = ds[k]
            d.resize(n + arr.shape[0], axis=0)
            d[n : n + arr.shape[0]] = arr
        n += data.rows
    t1 = time.perf_counter()
    f.close()
    t2 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    size = path.stat().st_size
    path.unlink()
    return {"gbps": data.raw_bytes / (t3 - t0) / GB, "seconds": t3 - t0, "append_s": t1 - t0,
            "close_s": t2 - t1, "fsync_s": t3 - t2, "cpu_s": cpu, "file_bytes": size, "ratio": data.raw_bytes / size,
            "shuffle": shuffle, "filter": BASELINES[spec][0]}


# ---------------------------------------------------------------------------- (d) ours
def ours(data: Data, spec: str, path: Path, args: argparse.Namespace, verify: bool) -> dict[str, Any]:
    w = StoreWriter(path, codec=spec, mode="create", shard_size=args.shard_size, chunk_size=args.chunk_size,
                    max_buffer_bytes=args.max_buffer, num_workers=args.workers, on_full="block")
    batches = [torch_batch(*data.batch(i)) for i in range(data.n_batches)]  # zero-copy views
    append_s = 0.0
    error = None
    per_append: list[tuple[float, int]] = []
    with ThreadCPU() as tcpu:
        c0 = time.process_time()
        m0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            for acts, toks in batches:
                ta = time.perf_counter()
                ca, fa = time.thread_time(), _thread_faults()
                w.append(acts, tokens=toks)
                append_s += time.perf_counter() - ta
                per_append.append((time.thread_time() - ca, _thread_faults() - fa))
        except BaseException as exc:  # noqa: BLE001 - reported, the run goes on
            error = f"append raised {type(exc).__name__}: {exc}"
        caller_cpu = time.thread_time() - m0
        t1 = time.perf_counter()
        try:
            w.close()
        except BaseException as exc:  # noqa: BLE001
            error = (error + "; " if error else "") + f"close raised {type(exc).__name__}: {exc}"
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
    st = w.stats()
    elapsed = t2 - t0
    workers = w.num_workers
    res: dict[str, Any] = {
        "gbps": data.raw_bytes / elapsed / GB,
        "stored_gbps": st["stored_bytes"] / elapsed / GB,
        "seconds": elapsed, "appends_s": t1 - t0, "close_s": t2 - t1, "append_call_s": append_s,
        "ratio": st["compression_ratio"], "num_workers": workers, "error": error,
        "caller_busy_s": append_s - st["time_blocked_s"],
        "cpu_s": cpu, "cores_used": cpu / elapsed, "caller_cpu_s": caller_cpu,
        "workers_cpu_s": tcpu.total("llm-inst-compress"), "writer_thread_cpu_s": tcpu.total("llm-inst-writer"),
        "commit_thread_cpu_s": tcpu.total("llm-inst-commit"),
        "first_append_cpu_s": per_append[0][0] if per_append else None,
        "caller_page_faults": sum(f for _, f in per_append), "per_append_cpu_s_faults": per_append,
        "worker_busy_fraction": st["compress_s"] / (elapsed * workers),
        "writer_thread_busy_fraction": (st["write_s"] + st["commit_s"]) / elapsed,
        "stats": st,
    }
    problems = []
    if st["rows_committed"] != data.total_rows:
        problems.append(f"rows_committed {st['rows_committed']} != rows appended {data.total_rows}")
    if st["raw_bytes"] != data.raw_bytes:
        problems.append(f"stats raw_bytes {st['raw_bytes']} != bytes appended {data.raw_bytes}")
    if verify and error is None:
        try:
            import hdf5plugin  # noqa: F401

            with ActivationStore(path) as store:
                if len(store) != data.total_rows:
                    problems.append(f"reader sees {len(store)} rows, expected {data.total_rows}")
                rng = np.random.default_rng(7)
                for h in (data.hooks[0], data.hooks[-1]):
                    idx = np.sort(rng.choice(data.total_rows, size=16, replace=False))
                    idx[0], idx[-1] = 0, data.total_rows - 1
                    got = store[h].numpy(idx)
                    want = np.stack([data.batch(int(i) // data.rows)[0][h][int(i) % data.rows] for i in idx])
                    if not np.array_equal(got, want):
                        problems.append(f"read-back of {h} rows differs from what was appended")
                sid = store.tokens["sequence_id"].numpy(slice(None))
                if not np.array_equal(
                        sid, np.concatenate([data.batch(i)[1]["sequence_id"] for i in range(data.n_batches)])):
                    problems.append("read-back of tokens/sequence_id differs")
            res["verified"] = not problems
        except ImportError:
            res["verified"] = "skipped (no hdf5plugin)"
        except Exception as exc:  # noqa: BLE001
            problems.append(f"read-back raised {type(exc).__name__}: {exc}")
            res["verified"] = False
    res["problems"] = problems
    shutil.rmtree(path, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------- report
def build_markdown(r: dict[str, Any]) -> str:
    m, cfg = r["machine"], r["config"]
    lines = [f"# Store write benchmark: {r['tag']}", "",
             f"{r['timestamp']}; `{r['command']}`", "",
             f"- machine: {m['cpu_count']} cores ({m['cpus_usable']} usable), {m['cpu_model']}, "
             f"{(m['memory_bytes'] or 0) / GIB:.0f} GiB RAM; CUDA device: "
             f"{m['cuda_device'] if m['cuda_available'] else 'none'} (not used here)",
             f"- target: `{m['target_dir']}` on " + (f"{m['target_fs']['device']} ({m['target_fs']['type']}, "
                                                    f"{m['target_fs']['options']})" if m["target_fs"] else "?"),
             f"- versions: python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, h5py {m['h5py']} "
             f"(HDF5 {m.get('hdf5')}), hdf5plugin {m['hdf5plugin']}, zstandard {m['zstandard']}, lz4 {m['lz4']}",
             f"- data: {cfg['hooks']} hook points x d_model {cfg['d_model']} bf16 + 3 int64 token columns = "
             f"{cfg['row_bytes']} B/row; {cfg['batches']} appends of {cfg['batch_tokens']} rows "
             f"({cfg['pool_batches']} distinct batches cycled) = {cfg['raw_bytes'] / GIB:.3f} GiB raw "
             f"({cfg['raw_bytes'] / GB:.3f} GB); Student-t dof {cfg['dof']}, per-dim lognormal scales, "
             f"outlier dims 20-100x; generated in {r['generate_s']:.1f} s (not timed)",
             f"- writer: chunk {cfg['chunk_size']}, shard {cfg['shard_size']}, max_buffer {cfg['max_buffer']}, "
             f"num_workers {r['num_workers']}, on_full=block; {cfg['repeats']} repeats, median (min-max)",
             f"- disk, sequential 16 MiB writes + fsync of {r['disk']['bytes'] / GIB:.2f} GiB (after an untimed "
             f"write of the same size, deleted just before): "
             f"**{fmt(r['disk']['gbps'])} GB/s**", ""]
    if r.get("notes"):
        lines += [f"- note: {n}" for n in r["notes"]] + [""]
    lines += ["## Write throughput per codec (GB/s of raw bytes)", "",
              "| codec | ours raw GB/s | ours stored GB/s | ratio | baseline | baseline raw GB/s | ours / baseline "
              f"| compress only ({r['num_workers']} thr) GB/s | ceiling = min(disk x ratio, compress) | "
              "ours / ceiling | caller blocked s | other processes' load, cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["table"]:
        ob = f"{row['ours_over_baseline']:.2f}x" if row["ours_over_baseline"] is not None else "-"
        comp = "n/a (encode is a no-op)" if row["codec"] == "none" else fmt(row["compress_gbps"])
        lines.append(
            f"| {row['codec']} | {fmt(row['ours_gbps'])} | {fmt(row['ours_stored_gbps'])} | {row['ratio']:.3f} "
            f"| {row['baseline'] or '-'} | {fmt(row['baseline_gbps'])} | {ob} | {comp} "
            f"| {row['ceiling_gbps']:.3f} ({row['ceiling_bound']}) | {row['ours_over_ceiling']:.2f} "
            f"| {fmt(row['blocked_s'], 2)} | {fmt(summary(row['other_load_cores']), 2) if all(x is not None for x in row['other_load_cores']) else '-'} |")
    lines += ["", "Baselines: h5py's own filter pipeline on one thread, resizable chunked datasets (same chunk "
              "shape), each batch appended with resize + slice assignment, then close + fsync; shuffle on for "
              "LZ4/Zstd (as ours), off for none. Ratio is ours (stored bytes of the writer).", "",
              "## Where the writer's time goes (medians)", "",
              "Wall time: `append()` calls in the caller's thread (blocked = waiting for room under "
              "max_buffer_bytes), then `close()`. Writer counters: encode+crc wall time summed over workers, "
              "the writer thread's `write_direct_chunk` time and commit time (shard close on the writer thread, "
              "fsync + rename + manifest where the writer does that). CPU "
              "seconds per thread from /proc (sampled every 20 ms), with the same for compression alone "
              "(no disk, no copy) for comparison.", "",
              "| codec | total s | append() s | blocked s | close() s | workers encode+crc wall s "
              "| writer: write_direct_chunk s | commit s | CPU s (cores used) | caller CPU s (1st append) "
              "| caller page faults, MiB | workers CPU s | writer thread CPU s | commit thread CPU s "
              "| compress-only CPU s | peak buffered MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f2(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for spec, o in r["ours"].items():
        md = o["medians"]
        lines.append(
            f"| {spec} | {md['seconds']:.2f} | {md['append_call_s']:.2f} | {md['time_blocked_s']:.2f} | "
            f"{md['close_s']:.2f} | {md['compress_s']:.2f} ({md['worker_busy_fraction']:.0%} of "
            f"{r['num_workers']} x wall) | {md['write_s']:.2f} | {md['commit_s']:.2f} | {md['cpu_s']:.2f} "
            f"({md['cores_used']:.2f}) | {f2(md['caller_cpu_s'])} ({f2(md['first_append_cpu_s'])}) | "
            f"{md['caller_page_faults'] * 4096 / MIB:.0f} | {f2(md['workers_cpu_s'])} | "
            f"{f2(md['writer_thread_cpu_s'])} | {f2(md['commit_thread_cpu_s'])} | "
            f"{r['compress_only'][spec]['cpu_s']:.2f} | {md['peak_buffered_bytes'] / MIB:.0f} |")
    if r.get("baseline"):
        lines += ["", "Baselines in detail (medians): append (resize + assign, filters run here) / close / fsync s", "",
                  "| codec | filter | shuffle | raw GB/s | append s | close s | fsync s | CPU s | file ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for spec, b in r["baseline"].items():
            md = b["medians"]
            lines.append(f"| {spec} | {b['filter']} | {b['shuffle']} | {fmt(b['gbps'])} | {md['append_s']:.2f} | "
                         f"{md['close_s']:.2f} | {md['fsync_s']:.2f} | {md['cpu_s']:.2f} | {md['ratio']:.3f} |")
    st = r["stages"]
    lines += ["", f"## Single-thread stage rates, {st['chunks']} chunks of {st['chunk_bytes'] / MIB:.0f} MiB "
              "(GB/s of raw bytes, medians)", ""]
    for k, v in st.items():
        if k in ("chunks", "chunk_bytes"):
            continue
        if isinstance(v, dict):
            lines.append(f"- {k}: " + ", ".join(f"{s} {x:.3f}" for s, x in v.items()))
        else:
            lines.append(f"- {k}: {v:.3f}")
    problems = [p for o in r["ours"].values() for p in o["problems"]]
    lines += ["", "## Checks", ""]
    if problems:
        lines += [f"- PROBLEM: {p}" for p in problems]
    else:
        lines.append("- every writer run committed exactly the rows and raw bytes appended; read-back of sampled "
                     f"rows: " + ", ".join(f"{s}: {o['verified']}" for s, o in r["ours"].items()))
    return "\n".join(lines) + "\n"


def median_of(runs: list[dict[str, Any]], keys: list[str], nested: str | None = None) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [(x[nested][k] if nested and k in x[nested] else x[k]) for x in runs]
        vals = [v for v in vals if v is not None]
        out[k] = statistics.median(vals) if vals else None
    return out


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="raw activation data per run, GiB")
    p.add_argument("--dir", default=None, help="where to write (a temp dir is made inside; default: the current "
                   "directory)")
    p.add_argument("--tag", default=None, help="result file tag (default: cpu<N>)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codecs", default="none,lz4,zstd:1,zstd:3")
    p.add_argument("--hooks", type=int, default=8, help="hook points per row")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--batch-tokens", type=int, default=8192, help="rows per append (e.g. 8 x 1024 tokens)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--pool-batches", type=int, default=4, help="distinct pre-generated batches, cycled")
    p.add_argument("--dof", type=float, default=4.0, help="Student-t degrees of freedom")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", default="1MiB")
    p.add_argument("--shard-size", default="256MiB")
    p.add_argument("--max-buffer", default="512MiB")
    p.add_argument("--workers", type=int, default=None, help="compression threads (default: the writer's, "
                   "min(16, CPUs))")
    p.add_argument("--disk-gib", type=float, default=None, help="size of the raw disk write test (default: the "
                   "data size, at least 1 GiB)")
    p.add_argument("--no-baseline", action="store_true", help="skip the h5py baselines")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = [s.strip() for s in args.codecs.split(",") if s.strip()]
    for s in specs:
        make_codec(s)
    ncpu = os.cpu_count() or 1
    tag = args.tag or f"cpu{ncpu}"
    workers = args.workers or max(1, min(16, ncpu))
    chunk_size = parse_bytes(args.chunk_size, "chunk_size")
    chunk_rows = max(1, chunk_size // (args.d_model * 2))
    notes: list[str] = []

    base = Path(args.dir) if args.dir else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".store_write_bench_", dir=base))
    try:
        hdf5plugin = None
        try:
            import hdf5plugin  # noqa: F811
        except ImportError:
            notes.append("hdf5plugin is not installed: the LZ4/Zstd h5py baselines (c) and the read-back check "
                         "are skipped")
        m = machine_info(work)
        if m["target_fs"] and m["target_fs"]["type"] in ("tmpfs", "ramfs", "overlay"):
            notes.append(f"target filesystem is {m['target_fs']['type']}: disk figures may be memory speed")
        log(f"machine: {m['cpu_count']} cores, {m['cpu_model']}, CUDA: {m['cuda_device'] or 'none'}")
        data = Data(args)
        log(f"generating {data.n_pool} batches x {data.rows} rows x {len(data.hooks)} hooks x {data.d} bf16 "
            f"({data.n_pool * data.batch_act_bytes / GIB:.2f} GiB pool) for {data.n_batches} appends, "
            f"{data.raw_bytes / GIB:.3f} GiB raw ...")
        gen_s = data.generate(ncpu)
        log(f"generated in {gen_s:.1f} s")
        disk_bytes = int((args.disk_gib * GIB) if args.disk_gib else max(GIB, data.raw_bytes))
        disk_runs: list[dict] = []
        comp: dict[str, list[dict]] = {s: [] for s in specs}
        stages: list[dict] = []
        base_runs: dict[str, list[dict]] = {}
        our_runs: dict[str, list[dict]] = {s: [] for s in specs}
        do_base = not args.no_baseline
        if do_base:
            try:
                import h5py  # noqa: F401
            except ImportError:
                do_base = False
                notes.append("h5py is missing: no baselines")
        for rep in range(args.repeats):
            log(f"--- repeat {rep + 1}/{args.repeats}")
            with OtherLoad() as ld:
                d = disk_write(work, disk_bytes)
            d["other_cores"] = ld.cores
            disk_runs.append(d)
            log(f"disk: {d['gbps']:.3f} GB/s (write {d['write_s']:.2f} s + fsync {d['fsync_s']:.2f} s)"
                f"{load_note(ld.cores)}")
            stages.append(stage_rates(data, specs, chunk_rows, work))
            for s in specs:
                with OtherLoad() as ld:
                    c = compress_only(data, s, workers, chunk_rows)
                c["other_cores"] = ld.cores
                comp[s].append(c)
                log(f"compress only {s}: {c['gbps']:.3f} GB/s on {workers} threads, ratio {c['ratio']:.3f}, "
                    f"{c['cpu_s'] / c['seconds']:.2f} cores used{load_note(ld.cores)}")
            if do_base:
                for s in specs:
                    if s not in BASELINES or (BASELINES[s][1] is not None and hdf5plugin is None):
                        continue
                    with OtherLoad() as ld:
                        b = baseline_h5py(data, s, work / f"baseline-{s.replace(':', '')}.h5", chunk_rows,
                                          chunk_size, hdf5plugin)
                    b["other_cores"] = ld.cores
                    base_runs.setdefault(s, []).append(b)
                    log(f"baseline {s} ({b['filter']}, shuffle={b['shuffle']}): {b['gbps']:.3f} GB/s "
                        f"(append {b['append_s']:.2f} s, close {b['close_s']:.2f} s, fsync {b['fsync_s']:.2f} s)"
                        f"{load_note(ld.cores)}")
            for s in specs:
                with OtherLoad() as ld:
                    o = ours(data, s, work / f"store-{s.replace(':', '')}-{rep}", args, verify=(rep == 0))
                o["other_cores"] = ld.cores
                our_runs[s].append(o)
                st = o["stats"]
                log(f"ours {s}: {o['gbps']:.3f} GB/s raw, {o['stored_gbps']:.3f} stored, ratio "
                    f"{(st['compression_ratio'] or 0):.3f}, {o['seconds']:.2f} s (append calls {o['append_call_s']:.2f}"
                    f" s, blocked {st['time_blocked_s']:.2f} s, close {o['close_s']:.2f} s; compress_s "
                    f"{st['compress_s']:.2f}, write_s {st['write_s']:.2f}, commit_s {st['commit_s']:.2f})"
                    + load_note(ld.cores) + (f" ERROR: {o['error']}" if o["error"] else "") + (f" PROBLEMS: {o['problems']}"
                                                                         if o["problems"] else ""))

        # ------------------------------------------------------------ aggregate
        disk_gbps = summary([d["gbps"] for d in disk_runs])
        all_loads = [x.get("other_cores") for x in [*disk_runs, *(c for v in comp.values() for c in v),
                                                     *(b for v in base_runs.values() for b in v),
                                                     *(o for v in our_runs.values() for o in v)]]
        all_loads = [x for x in all_loads if x is not None]
        if all_loads and max(all_loads) >= 0.1:
            notes.append(f"other processes were using CPU during the measurements: median "
                         f"{statistics.median(all_loads):.2f}, max {max(all_loads):.2f} cores' worth (of {ncpu}); "
                         f"figures on this machine are noisy")
        stage_keys = [k for k in stages[0] if k not in ("chunks", "chunk_bytes")]
        stage_med: dict[str, Any] = {"chunks": stages[0]["chunks"], "chunk_bytes": stages[0]["chunk_bytes"]}
        for k in stage_keys:
            if isinstance(stages[0][k], dict):
                stage_med[k] = {s: statistics.median(x[k][s] for x in stages) for s in stages[0][k]}
            else:
                stage_med[k] = statistics.median(x[k] for x in stages)
        result: dict[str, Any] = {
            "tag": tag, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": m, "notes": notes, "num_workers": workers, "generate_s": gen_s,
            "config": {"gib": args.gib, "hooks": len(data.hooks), "d_model": data.d, "batch_tokens": data.rows,
                       "batches": data.n_batches, "pool_batches": data.n_pool, "rows": data.total_rows,
                       "row_bytes": data.row_bytes + 8 * len(TOKEN_FIELDS), "raw_bytes": data.raw_bytes,
                       "activation_bytes": data.act_bytes, "dof": args.dof, "chunk_size": args.chunk_size,
                       "chunk_rows": chunk_rows, "shard_size": args.shard_size, "max_buffer": args.max_buffer,
                       "repeats": args.repeats, "codecs": specs},
            "disk": {"gbps": disk_gbps, "bytes": disk_bytes, "runs": disk_runs},
            "compress_only": {s: {"gbps": summary([c["gbps"] for c in comp[s]]), "ratio": comp[s][0]["ratio"],
                                  "cpu_s": statistics.median(c["cpu_s"] for c in comp[s]),
                                  "runs": comp[s]} for s in specs},
            "stages": stage_med, "stages_runs": stages,
            "baseline": {s: {"gbps": summary([b["gbps"] for b in runs]), "filter": runs[0]["filter"],
                             "shuffle": runs[0]["shuffle"],
                             "medians": median_of(runs, ["seconds", "append_s", "close_s", "fsync_s", "ratio", "cpu_s"]),
                             "runs": runs} for s, runs in base_runs.items()},
            "ours": {},
            "table": [],
        }
        stat_keys = ["time_blocked_s", "compress_s", "write_s", "commit_s", "peak_buffered_bytes"]
        for s in specs:
            runs = our_runs[s]
            md = median_of(runs, ["seconds", "append_call_s", "close_s", "caller_busy_s", "worker_busy_fraction",
                                  "writer_thread_busy_fraction", "cpu_s", "cores_used", "caller_cpu_s",
                                  "workers_cpu_s", "writer_thread_cpu_s", "commit_thread_cpu_s",
                                  "first_append_cpu_s", "caller_page_faults"])
            md.update(median_of(runs, stat_keys, nested="stats"))
            result["ours"][s] = {
                "gbps": summary([o["gbps"] for o in runs]), "stored_gbps": summary([o["stored_gbps"] for o in runs]),
                "ratio": runs[0]["ratio"], "medians": md, "errors": [o["error"] for o in runs if o["error"]],
                "problems": sorted({p for o in runs for p in o["problems"]}),
                "verified": runs[0].get("verified"), "runs": runs}
            ratio = runs[0]["ratio"] or comp[s][0]["ratio"]
            comp_med = result["compress_only"][s]["gbps"]["median"]
            disk_ceiling = disk_gbps["median"] * ratio
            ceiling = disk_ceiling if make_codec(s).name == "none" else min(disk_ceiling, comp_med)
            b = result["baseline"].get(s)
            ours_med = result["ours"][s]["gbps"]["median"]
            result["table"].append({
                "codec": s, "ours_gbps": result["ours"][s]["gbps"], "ours_stored_gbps": result["ours"][s]["stored_gbps"],
                "ratio": ratio, "baseline": b["filter"] if b else None, "baseline_gbps": b["gbps"] if b else None,
                "ours_over_baseline": ours_med / b["gbps"]["median"] if b else None,
                "compress_gbps": result["compress_only"][s]["gbps"], "disk_x_ratio_gbps": disk_ceiling,
                "ceiling_gbps": ceiling, "ceiling_bound": "disk" if disk_ceiling <= comp_med else "compression",
                "ours_over_ceiling": ours_med / ceiling,
                "blocked_s": summary([o["stats"]["time_blocked_s"] for o in runs]),
                "other_load_cores": [o.get("other_cores") for o in runs]})
        md_text = build_markdown(result)
        print()
        print(md_text)
        outs = [Path(args.results_dir)]
        if os.environ.get("OUT"):
            outs.append(Path(os.environ["OUT"]))
        for o in outs:
            o.mkdir(parents=True, exist_ok=True)
            (o / f"store_write-{tag}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
            (o / f"store_write-{tag}.md").write_text(md_text)
            log(f"wrote {o / f'store_write-{tag}.json'} and .md")
        bad = any(o["errors"] or o["problems"] for o in result["ours"].values())
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
