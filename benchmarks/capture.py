"""End-to-end capture benchmark: a real model's forward passes, captured into the activation
store, against no capture, naive baselines and the machine's own ceilings -- all in one run.

What it measures (one process, one table per model; GB is 10^9 bytes, GiB 2^30):

Models: random-init bf16 models of real architectures, ``attn_implementation="sdpa"``,
``eval()``, ``torch.no_grad()``: ``llama-1b`` (LlamaConfig: hidden 2048, 16 layers, 32 heads,
8 KV heads, MLP 8192, vocab 32000) and ``gpt2-small`` (GPT2Config defaults). Input: ``--batch``
x ``--seq`` random token ids with a full attention mask, passed explicitly (``input_ids=``,
``attention_mask=``, ``use_cache=False``) so the capture's token selection runs as in real use.

Rows of the table:

1. no capture: the plain forward loop (``--warmup`` untimed, then ``--iters`` timed between
   ``torch.cuda.synchronize()`` calls); 1b (diagnostic): the same plus ``input_ids`` / mask
   ``.to("cpu")`` before each forward, the host sync the capture's token selection does; 1c
   (diagnostic): the same loop while the capture's number of compression threads encode real
   activation chunks non-stop (CPU / GIL contention alone, no capture);
2. ours, one residual layer (``hooks=["blocks.<L/2>.hook_resid_post"]``) to disk, zstd level 1;
3. ours, all residual layers (``HookGranularity.RESIDUAL``) to a **RAM sink**: the rows are
   packed, copied into the pinned host pool and handed to a ``CountingSink`` (no compression, no
   disk: ``capture_activations(sink=...)``), which counts and releases them. Two diagnostic
   variants that keep the store writer (not run by default; ``--rows 3a,3b``):
   3a. "tmpfs": the ordinary store written into a tmpfs directory (``--shm-dir``, default
       ``/dev/shm``) with ``fsync=False``: everything runs (pack, device-to-host copy,
       compression, HDF5 writes) but the "disk" is memory;
   3b. "no-op writer": ``lightning_llm_inst.store.shard.OpenShard.write_chunk`` is monkeypatched
       (for that row only) to drop the compressed bytes, counting them and keeping the shard's
       bookkeeping so commits still succeed: only pack + device-to-host + compression (+ the
       drain thread's chunking) run; the shard files hold metadata only;
4. ours, all residual layers to disk (fsync on), once per codec in ``--codecs`` (none, lz4, zstd:1);
5. baselines on the same model and inputs, all uncompressed h5py with an fsync at the end of the
   timed region: (i) forward hooks on every decoder layer doing ``.detach().cpu()``, written after
   each forward to one resizable dataset per layer; (ii) ``output_hidden_states=True``, ``.cpu()``
   of each layer's hidden state (``hidden_states[1:]``; HF applies the final norm to the last
   one), same writes; (iii) TransformerLens ``run_with_cache`` (``names_filter`` on
   ``hook_resid_post``) -> cpu -> h5py, only if ``import transformer_lens`` works, with TL's own
   forward timed too;
6. the machine's ceilings: device-to-device copy (1 GiB, read + write counted: 2x bytes),
   device-to-host into pinned memory (1 GiB; pageable for reference), disk write with fsync
   (2 GiB in 16 MiB writes in the stores' directory, after an untimed warm-up write of the same
   size), tmpfs write, the compression rate of the worker pool (``Codec.encode`` + crc32 on a
   ``ThreadPoolExecutor`` with the worker count the capture uses, on this model's real captured
   bf16 activations in 1 MiB chunks: byte planes pre-shuffled as the GPU pack leaves them, and
   with the CPU shuffle), and the pack kernel (``pack_rows`` ``impl="cuda"`` and ``"torch"`` on
   a [8192, 2048] bf16 tensor, index of 90% of the rows and no index, into a preallocated uint8
   buffer, shuffle on; bytes read + written).

Timing of "ours": the timed region runs from the first forward to after ``capture_activations``
exits, i.e. the pipeline drained, every shard committed and (for disk rows) fsynced
("end-to-end"). The model-side rate of the forward loop alone (synchronised at its end) and
over its last half ("steady") are reported too. Opening the capture (pinning the host pool) is
outside the timed region and reported as ``open_s``. Disk rows and the no-op row run at least
``--disk-target-gb`` of raw activations (default: max(8, 2 x ``--max-memory-gb``) GB, so the
data exceeds the writer's buffers) unless ``--max-seconds`` of forward loop is reached first.

For every capture row: tokens/s, speed vs no capture, raw and stored GB/s, compression ratio,
pinned host pool (size, peak used), peak RSS (VmHWM reset per row via /proc/self/clear_refs,
plus a 20 ms sampler), peak GPU memory (``max_memory_allocated``, reset per row; ring size
separately), time blocked (host pool, GPU ring, writer budget) and the limiting stage: each
stage's achieved rate over its ceiling (pack: bytes read + written / pack rate; D2H; compression
pool; disk), the closest to 1 named.

Run it (results go to ``benchmarks/results/capture-<tag>.json`` / ``.md`` and under ``$OUT``
when set; every store is deleted right after its row)::

    python benchmarks/capture.py --model both
    python benchmarks/capture.py --model llama-1b --tag h100-llama-1b
    python benchmarks/capture.py --quick            # CPU smoke test, tiny sizes

``--quick``: gpt2-small's architecture shrunk to 2 layers of width 128 and a vocabulary of 8192
(bf16 matmuls on a CPU without bf16 units are very slow), batch 2 x 64, 3 iterations, small
ceilings; the GPU-only rows (D2D, D2H, CUDA pack kernel) are skipped with a note.

Lightning is never imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from disk import write_file  # noqa: E402  (benchmarks/disk.py: this script's folder is on sys.path)
from lightning_llm_inst.buffer.pack import pack_rows  # noqa: E402
from lightning_llm_inst.capture.hooks import resolve_layout  # noqa: E402
from lightning_llm_inst.config import HookGranularity, InstrumentationConfig  # noqa: E402
from lightning_llm_inst.framework import InstrumentationFramework  # noqa: E402
from lightning_llm_inst.capture.sink import CountingSink  # noqa: E402
from lightning_llm_inst.store import shard as shard_module  # noqa: E402
from lightning_llm_inst.store.codecs import make_codec, shuffle_bytes  # noqa: E402
from lightning_llm_inst.store.format import parse_bytes  # noqa: E402

GB = 1e9
GIB = 1 << 30
MIB = 1 << 20
T_START = time.perf_counter()
DESIGN_TL = ("0.55 GB/s, 11 k tokens/s, 0.16x its own forward on this H100 (measured earlier) -- from DESIGN.md, "
             "NOT measured in this run")
CREATED: list[Path] = []  # every row directory this run made
ROW_KEYS = ["1", "1b", "1c", "2", "3", "3a", "3b", "4", "5i", "5ii", "5iii", "6"]
DEFAULT_ROWS = ["1", "2", "3", "4", "5i", "5ii", "5iii", "6"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------- small helpers
def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def host_empty_cache() -> None:
    """Return cached pinned blocks (a closed capture's host pool) so RSS figures stay per row."""
    gc.collect()
    malloc_trim()
    if cuda():
        torch.cuda.empty_cache()
        fn = getattr(torch._C, "_host_emptyCache", None)
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort
                pass


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def malloc_trim() -> bool:
    """Hand freed heap memory back to the OS (glibc), so a row's RSS does not start from what
    the previous row's freed buffers left resident."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def gpu_reset() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if cuda() else None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fs_of(path: Path) -> dict[str, str] | None:
    try:
        best, fs = "", None
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs = mnt, {"device": dev, "mount": mnt, "type": typ}
        return fs
    except OSError:
        return None


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident set size of this process during a block: VmHWM after resetting it
    (``echo 5 > /proc/self/clear_refs``), and a 20 ms sampler of VmRSS as a fallback."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._peak = 0
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self.reset_ok = False
        self.start_bytes = 0
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return 0

    @staticmethod
    def _hwm() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.start_bytes = self._rss()
        self._peak = self.start_bytes
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())

    @property
    def peak(self) -> int:
        hwm = self._hwm() if self.reset_ok else None
        return max(self._peak, hwm or 0)


# ---------------------------------------------------------------------------- models
def build_model(name: str, quick: bool, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The random-init bf16 model. ``quick`` keeps the architecture but shrinks it to 2 layers of
    width 128 and a vocabulary of 8192 (bf16 matmuls on a CPU without bf16 units are very slow)."""
    import transformers

    tiny = dict(vocab_size=8192, bos_token_id=0, eos_token_id=0) if quick else {}
    if name == "llama-1b":
        dims = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512) if quick else \
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192)
        cfg = transformers.LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 2048, **dims, **tiny})
        cls = transformers.LlamaForCausalLM
    elif name == "gpt2-small":
        cfg = transformers.GPT2Config(**(dict(n_layer=2, n_embd=128, n_head=4, **tiny) if quick else {}))
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown model {name!r}")
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
        except TypeError:  # older transformers: torch_dtype
            model = cls._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    model = model.to(device).eval()
    c = model.config
    info = {"name": name, "class": type(model).__name__, "layers": c.num_hidden_layers, "d_model": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
            "d_mlp": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
            "n_ctx": getattr(c, "max_position_embeddings", None) or c.n_positions,
            "vocab": c.vocab_size, "attn_implementation": getattr(c, "_attn_implementation", None),
            "params": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype),
            "quick_shrunk": quick}
    return model, info


def tl_model(info: dict[str, Any], device: torch.device) -> Any:
    """A HookedTransformer of the same shape as the HF model (random init, bf16)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(n_layers=info["layers"], d_model=info["d_model"], n_ctx=info["n_ctx"], n_heads=info["heads"],
                  d_head=info["d_model"] // info["heads"], d_mlp=info["d_mlp"], d_vocab=info["vocab"],
                  dtype=torch.bfloat16, device=str(device))
    if info["name"] == "llama-1b":
        cfg = HookedTransformerConfig(**common, act_fn="silu", normalization_type="RMS",
                                      positional_embedding_type="rotary", n_key_value_heads=info["kv_heads"],
                                      gated_mlp=True)
    else:
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard")
    with torch.device(device):
        model = HookedTransformer(cfg)
    return model.to(device).eval()


# ---------------------------------------------------------------------------- ceilings
def ceil_d2d(nbytes: int = GIB, reps: int = 10) -> dict[str, Any]:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync()
    dt = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return {"gbps": 2 * nbytes * reps / dt / GB, "bytes": nbytes, "reps": reps, "counted": "read + write (2x bytes)"}


def ceil_d2h(nbytes: int = GIB, reps: int = 3) -> dict[str, Any]:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - t0
    pinned.copy_(a, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        pinned.copy_(a, non_blocking=True)
    sync()
    dt = time.perf_counter() - t0
    del pinned
    pageable = torch.from_numpy(np.empty(nbytes, np.uint8))
    pageable.copy_(a)  # first touch of the pages
    t0 = time.perf_counter()
    pageable.copy_(a)
    sync()
    dt_page = time.perf_counter() - t0
    del a, pageable
    host_empty_cache()
    return {"gbps": nbytes * reps / dt / GB, "pageable_gbps": nbytes / dt_page / GB, "pin_new_gbps": nbytes / pin_s / GB,
            "bytes": nbytes}


def ceil_write_shards(directory: Path, nbytes: int, shard: int = 256 * MIB, block: int = 16 * MIB) -> dict[str, Any]:
    """The store's own pattern at the disk's sustained rate: ``nbytes`` in ``shard``-byte files,
    each fsynced on a second thread while the next one is written."""
    import queue as queue_mod

    buf = memoryview(np.random.default_rng(2).integers(0, 256, size=block, dtype=np.uint8).tobytes())
    todo: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
    paths = []

    def committer() -> None:
        while (fd := todo.get()) is not None:
            os.fsync(fd)
            os.close(fd)

    th = threading.Thread(target=committer, daemon=True)
    t0 = time.perf_counter()
    th.start()
    left = nbytes
    i = 0
    while left > 0:
        path = directory / f"bench_shard_{i}.bin"
        paths.append(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        this = min(shard, left)
        done = 0
        while done < this:
            done += os.write(fd, buf[: min(block, this - done)])
        todo.put(fd)
        left -= this
        i += 1
    todo.put(None)
    th.join()
    dt = time.perf_counter() - t0
    for p in paths:
        p.unlink()
    return {"gbps": nbytes / dt / GB, "bytes": nbytes, "shard_bytes": shard, "files": len(paths)}


def ceil_write(directory: Path, nbytes: int, fsync: bool, block: int = 16 * MIB) -> dict[str, Any]:
    """Sequential write of ``nbytes`` (16 MiB ``os.write`` calls) then fsync, after an untimed
    warm-up write of the same size (so page-cache memory is ready: the best case)."""
    buf = memoryview(np.random.default_rng(1).integers(0, 256, size=block, dtype=np.uint8).tobytes())
    warm = directory / "bench_warmup.bin"
    write_file(warm, nbytes, buf, block, fsync)
    warm.unlink()
    path = directory / "bench_write.bin"
    w, f = write_file(path, nbytes, buf, block, fsync)
    path.unlink()
    return {"gbps": nbytes / (w + f) / GB, "write_s": w, "fsync_s": f, "bytes": nbytes, "fsync": fsync,
            "dir": str(directory), "fs": fs_of(directory)}


def activation_chunks(acts: np.ndarray, d: int, chunk_size: int = MIB) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Rows [N, d] (uint16 bf16 bits) cut into the writer's chunks: row-major and byte planes."""
    chunk_rows = max(1, chunk_size // (d * 2))
    rows = [acts[a : a + chunk_rows] for a in range(0, acts.shape[0], chunk_rows)]
    planes = [shuffle_bytes(r, 2).reshape(2, -1) for r in rows]
    return rows, planes, chunk_rows


def ceil_compress(rows: list[np.ndarray], planes: list[np.ndarray], spec: str, workers: int, pre_shuffled: bool,
                  min_bytes: float, min_s: float, job_chunks: int) -> dict[str, Any]:
    """What the writer's compression stage does with whole chunks of a capture
    (``StoreWriter._start_job``): the chunks of one hook point's slice (``job_chunks``) are one
    job -- zstd: one ``encode_many`` on up to ``workers`` native threads, on a pool of
    min(4, workers) job threads; other codecs: up to ``workers`` sub-batches on a pool of
    ``workers`` threads -- plus a crc32 per chunk."""
    codec = make_codec(spec)
    shuffled = pre_shuffled and codec.shuffle
    src = [np.ascontiguousarray(c).reshape(-1) for c in (planes if shuffled else rows)]
    jobs = [src[i : i + job_chunks] for i in range(0, len(src), job_chunks)]

    def enc(views: list[np.ndarray], threads: int) -> int:
        datas = codec.encode_many(views, 2, shuffled=shuffled, threads=threads)
        for dd in datas:
            zlib.crc32(dd)
        return sum(memoryview(dd).nbytes for dd in datas)

    def submit(job_pool: ThreadPoolExecutor, pool: ThreadPoolExecutor, job: list[np.ndarray]) -> list[Any]:
        k = len(job)
        if codec.name == "zstd":
            return [job_pool.submit(enc, job, min(k, workers))]
        step = -(-k // min(k, workers))
        return [pool.submit(enc, job[i : i + step], 1) for i in range(0, k, step)]

    with ThreadPoolExecutor(max_workers=min(4, workers)) as job_pool, ThreadPoolExecutor(max_workers=workers) as pool:
        for f in submit(job_pool, pool, jobs[0]):
            f.result()  # warm-up: thread-local compressors
        raw = stored = 0
        t0 = time.perf_counter()
        c0 = time.process_time()
        while True:
            futs = [f for job in jobs for f in submit(job_pool, pool, job)]
            stored += sum(f.result() for f in futs)
            raw += sum(c.nbytes for c in src)
            dt = time.perf_counter() - t0
            if raw >= min_bytes and dt >= min_s:
                break
        cpu = time.process_time() - c0
    return {"gbps": raw / dt / GB, "per_worker_gbps": raw / dt / GB / workers, "ratio": raw / stored,
            "workers": workers, "job_chunks": job_chunks,
            "input": "byte planes (pre-shuffled, as packed on the GPU)" if shuffled else
            ("rows, CPU shuffle in encode" if codec.shuffle else "rows (no shuffle)"),
            "raw_bytes": raw, "seconds": dt, "cores_used": cpu / dt}


def ceil_pack(device: torch.device, impl: str, rows: int, d: int, frac: float | None, reps: int) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, d, device=device, dtype=torch.bfloat16, generator=g)
    if frac is None:
        idx, n = None, rows
    else:
        n = int(rows * frac)
        idx = torch.randperm(rows, device=device, generator=g)[:n].sort().values
    out = torch.empty(n * d * 2, dtype=torch.uint8, device=device)

    def f() -> None:
        pack_rows(x, idx, torch.bfloat16, out, True, impl=impl)

    for _ in range(3):
        f()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    sync()
    dt = time.perf_counter() - t0
    moved = 2 * n * d * 2  # rows read + bytes written
    res = {"gbps": moved * reps / dt / GB, "us_per_call": dt / reps * 1e6, "shape": [rows, d], "rows_kept": n,
           "index": f"{frac:.0%} of rows" if frac is not None else "None (all rows)", "impl": impl}
    if impl == "cuda":  # same bytes as the reference?
        ref = torch.empty_like(out)
        pack_rows(x, idx, torch.bfloat16, ref, True, impl="torch")
        res["bytes_equal_torch"] = bool(torch.equal(ref, out))
    return res


# ---------------------------------------------------------------------------- the benchmark of one model
class Bench:
    def __init__(self, args: argparse.Namespace, model_name: str, work: Path, device: torch.device) -> None:
        self.args = args
        self.name = model_name
        self.work = work
        self.device = device
        self.notes: list[str] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self.ceilings: dict[str, Any] = {}
        self.model, self.info = build_model(model_name, args.quick, device)
        self.layout = resolve_layout(self.model)
        self.L = self.info["layers"]
        self.d = self.info["d_model"]
        self.B, self.T = args.batch, args.seq
        self.tokens_per_fwd = self.B * self.T
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.info["vocab"], (self.B, self.T), generator=g).to(device)
        self.mask = torch.ones(self.B, self.T, dtype=torch.int64, device=device)
        self.base_tps: float | None = None
        self.base_fwd_s: float | None = None

    # -------------------------------------------------------------- forwards
    def fwd(self, **kw: Any) -> Any:
        return self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False, **kw)

    def budget_left(self) -> float:
        return self.args.budget_seconds - (time.perf_counter() - T_START)

    def n_for(self, bytes_per_fwd: int, target: float) -> int:
        return max(self.args.iters, math.ceil(target / max(1, bytes_per_fwd)))

    # -------------------------------------------------------------- row 1
    def row_no_capture(self, key: str = "1", host_sync: bool = False) -> None:
        """Row 1: the plain forward loop. Row 1b (``host_sync``): the same, plus what the capture's
        token selection does at the start of every forward -- ``input_ids`` and the attention mask
        copied to the CPU, which waits for the GPU to finish the previous forward."""
        a = self.args
        with torch.no_grad():
            for _ in range(a.warmup):
                self.fwd()
            sync()
            t_w = time.perf_counter()
            self.fwd()
            sync()
            # as long as the capture rows run (--max-seconds), so clocks that settle under a
            # sustained load weigh on both sides of "vs none" alike
            n = max(a.iters, min(int(a.max_seconds / max(1e-6, time.perf_counter() - t_w)), 100 * a.iters))
            gpu_reset()
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                c0 = time.thread_time()
                for _ in range(n):
                    if host_sync:
                        self.ids.to("cpu")
                        self.mask.to("cpu")
                    self.fwd()
                sync()
                dt = time.perf_counter() - t0
                cpu_s = time.thread_time() - c0
        tps = n * self.tokens_per_fwd / dt
        label = "no capture (forward only)"
        if host_sync:
            label = "diagnostic: no capture + input_ids/mask .to('cpu') before each forward (the sync token selection does)"
        else:
            self.base_tps, self.base_fwd_s = tps, dt / n
        self.rows[key] = {"key": key, "label": label, "kind": "none", "forwards": n,
                          "tokens_per_s": tps, "loop_tokens_per_s": tps,
                          "speed_vs_no_capture": tps / self.base_tps if self.base_tps else None,
                          "seconds": dt, "ms_per_forward": dt / n * 1e3, "model_thread_cpu_share": cpu_s / dt,
                          "peak_rss_bytes": rss.peak, "rss_start_bytes": rss.start_bytes, "peak_gpu_bytes": gpu_peak()}
        log(f"[{key}] {label}: {tps:,.0f} tokens/s, {dt / n * 1e3:.1f} ms per forward, model thread CPU "
            f"{cpu_s / dt:.0%} of wall")

    def row_background_compress(self) -> None:
        """Row 1c (diagnostic): the plain forward loop while the capture's number of compression
        threads encode (+ crc32) chunks of real activations non-stop: what CPU / GIL contention
        alone costs the model thread, with no capture at all."""
        a = self.args
        chunks = getattr(self, "_bg_chunks", None)
        if not chunks or not a.sink_codec_ok:
            return
        spec = a.sink_codec
        codec = make_codec(spec)
        workers = self.config(spec).workers()
        shuffled = cuda() and codec.shuffle
        stop = threading.Event()
        counts = [0] * workers

        def work(i: int) -> None:
            k = i
            while not stop.is_set():
                data = codec.encode(chunks[k % len(chunks)], 2, shuffled=shuffled)
                zlib.crc32(data)
                counts[i] += chunks[k % len(chunks)].nbytes
                k += workers

        threads = [threading.Thread(target=work, args=(i,), name=f"bench-bg-{i}", daemon=True) for i in range(workers)]
        with torch.no_grad():
            self.fwd()
            for t in threads:
                t.start()
            time.sleep(0.2)
            sync()
            b0 = sum(counts)
            t0 = time.perf_counter()
            c0 = time.thread_time()
            for _ in range(a.iters):
                self.fwd()
            sync()
            dt = time.perf_counter() - t0
            cpu_s = time.thread_time() - c0
            bg = sum(counts) - b0
            stop.set()
            for t in threads:
                t.join()
        tps = a.iters * self.tokens_per_fwd / dt
        label = (f"diagnostic: no capture, while {workers} threads run {codec.spec} encode+crc32 non-stop "
                 f"(CPU/GIL contention only)")
        self.rows["1c"] = {"key": "1c", "label": label, "kind": "none", "forwards": a.iters, "tokens_per_s": tps,
                           "loop_tokens_per_s": tps, "speed_vs_no_capture": tps / self.base_tps if self.base_tps else None,
                           "seconds": dt, "model_thread_cpu_share": cpu_s / dt, "background_gbps": bg / dt / GB,
                           "background_workers": workers}
        log(f"[1c] {label}: {tps:,.0f} tokens/s ({self.rows['1c']['speed_vs_no_capture'] or 0:.2f}x), background "
            f"{bg / dt / GB:.2f} GB/s, model thread CPU {cpu_s / dt:.0%} of wall")

    # -------------------------------------------------------------- activations for the compression ceiling
    def real_activations(self) -> np.ndarray:
        blocks = self.model.get_submodule(self.layout.blocks)
        got: list[torch.Tensor] = []

        def hook(mod: Any, args: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            got.append(t.detach().reshape(-1, self.d).to("cpu"))

        hs = [b.register_forward_hook(hook) for b in blocks]
        try:
            with torch.no_grad():
                self.fwd()
        finally:
            for h in hs:
                h.remove()
        acts = torch.cat(got).view(torch.int16).numpy().view(np.uint16)
        return np.ascontiguousarray(acts)

    # -------------------------------------------------------------- row 6: ceilings
    def measure_ceilings(self) -> None:
        a = self.args
        c: dict[str, Any] = {}
        if cuda():
            log("[6] D2D copy ...")
            c["d2d"] = ceil_d2d()
            log(f"[6] D2D {c['d2d']['gbps']:.0f} GB/s (read+write); D2H pinned ...")
            c["d2h"] = ceil_d2h()
            log(f"[6] D2H pinned {c['d2h']['gbps']:.1f} GB/s, pageable {c['d2h']['pageable_gbps']:.1f} GB/s, "
                f"pinning new memory {c['d2h']['pin_new_gbps']:.2f} GB/s")
        else:
            self.notes.append("no CUDA: D2D copy, D2H and the CUDA pack kernel are GPU-only and were skipped")
        disk_bytes = int(a.disk_ceiling_gib * GIB)
        log(f"[6] disk write + fsync, {disk_bytes / GIB:.2f} GiB in 16 MiB writes ({self.work}) ...")
        c["disk"] = ceil_write(self.work, disk_bytes, fsync=True)
        log(f"[6] disk {c['disk']['gbps']:.2f} GB/s (write {c['disk']['write_s']:.2f} s + fsync "
            f"{c['disk']['fsync_s']:.2f} s), fs {c['disk']['fs']}")
        if a.disk_sustained_gib:
            c["disk_shards"] = ceil_write_shards(self.work, int(a.disk_sustained_gib * GIB))
            log(f"[6] disk, {a.disk_sustained_gib:.0f} GiB as 256 MiB files fsynced behind the writes: "
                f"{c['disk_shards']['gbps']:.2f} GB/s")
        shm = self.shm_dir()
        if shm is not None:
            c["tmpfs"] = ceil_write(shm, min(disk_bytes, GIB), fsync=False)
            log(f"[6] tmpfs write {c['tmpfs']['gbps']:.2f} GB/s")
        # compression pool on this model's activations
        log("[6] capturing real activations for the compression ceiling ...")
        acts = self.real_activations()
        chunk_bytes = parse_bytes(a.chunk_size or ("4MiB" if cuda() else "1MiB"), "chunk_size")
        rows, planes, chunk_rows = activation_chunks(acts, self.d, chunk_bytes)
        job_chunks = max(1, self.tokens_per_fwd // chunk_rows)  # one hook point's rows of a forward
        c["compress_input"] = {"bytes": int(acts.nbytes), "chunks": len(rows), "chunk_rows": chunk_rows,
                               "chunk_bytes": int(rows[0].nbytes)}
        comp: dict[str, Any] = {}
        for spec in self.codec_specs(include_sink=True):
            workers = self.config(spec).workers()
            for pre in ((True, False) if cuda() else (False,)):
                key = f"{spec}{'' if pre else ' (cpu shuffle)'}"
                r = ceil_compress(rows, planes, spec, workers, pre, min_bytes=a.compress_min_gb * GB,
                                  min_s=0.3 if a.quick else 1.0, job_chunks=job_chunks)
                comp[key] = r
                log(f"[6] compression {key}: {r['gbps']:.2f} GB/s raw on {workers} workers "
                    f"({r['per_worker_gbps']:.2f}/worker, {r['cores_used']:.1f} cores), ratio {r['ratio']:.3f}")
                if make_codec(spec).name == "none":
                    break
        c["compress"] = comp
        self._bg_chunks = (planes if cuda() else rows)[:256]  # for the contention diagnostic (row 1c)
        del acts, rows, planes
        # pack kernel
        prow, pd = (1024, 768) if a.quick else (8192, 2048)
        reps = 20 if a.quick else 200
        pk: dict[str, Any] = {}
        impls = ["torch"]
        if cuda():
            if self.ext_ok:
                impls.insert(0, "cuda")
            else:
                self.notes.append(f"CUDA pack extension unavailable ({self.ext_error}): pack ceiling and captures use "
                                  "the torch pack path")
        else:
            self.notes.append("pack kernel impl='cuda' skipped (no GPU); impl='torch' timed on the CPU, smaller tensor")
        for impl in impls:
            for frac in (0.9, None):
                r = ceil_pack(self.device, impl, prow, pd, frac, reps)
                pk[f"{impl}, {r['index']}"] = r
                if "d2d" in c:
                    r["fraction_of_d2d"] = r["gbps"] / c["d2d"]["gbps"]
                log(f"[6] pack {impl} {r['index']}: {r['gbps']:.0f} GB/s (read+write), {r['us_per_call']:.0f} us/call"
                    + (f", {r['fraction_of_d2d']:.2f} of D2D" if "fraction_of_d2d" in r else "")
                    + (f", bytes equal torch: {r['bytes_equal_torch']}" if "bytes_equal_torch" in r else ""))
        c["pack"] = pk
        host_empty_cache()
        self.ceilings = c

    # -------------------------------------------------------------- configs
    def codec_specs(self, include_sink: bool = False) -> list[str]:
        specs = list(self.args.codec_list)
        if include_sink and self.args.sink_codec not in specs and self.args.sink_codec_ok:
            specs.append(self.args.sink_codec)
        if include_sink and self.args.one_codec not in specs and self.args.one_codec_ok:
            specs.append(self.args.one_codec)
        return specs

    def config(self, spec: str, **kw: Any) -> InstrumentationConfig:
        codec = make_codec(spec)
        a = self.args
        return InstrumentationConfig(
            compression_algorithm=None if codec.name == "none" else codec.name,
            compression_level=codec.level if codec.name == "zstd" else None,
            target_throughput_gbps=a.target_gbps, max_memory_gb=a.max_memory_gb, gpu_buffer_mb=a.gpu_buffer_mb,
            chunk_size=a.chunk_size, **kw)

    def shm_dir(self) -> Path | None:
        p = Path(self.args.shm_dir)
        if not p.is_dir() or not os.access(p, os.W_OK):
            return None
        return p

    # -------------------------------------------------------------- ours
    def run_ours(self, key: str, label: str, cfg: InstrumentationConfig, base_dir: Path, n_target: int,
                 sink: str, codec_spec: str) -> None:
        a = self.args
        path = Path(tempfile.mkdtemp(prefix=f"capture-{key}-", dir=base_dir))
        CREATED.append(path)
        store = path / "store"
        fw = InstrumentationFramework(cfg)
        fw.instrument_model(self.model)
        dropped = {"bytes": 0, "chunks": 0}
        original = shard_module.OpenShard.write_chunk
        original_many = shard_module.OpenShard.write_chunks
        if sink == "noop":
            def write_chunk(self_: Any, col: Any, chunk_index: int, valid_rows: int, data: Any, crc: int) -> None:
                ds = self_.datasets[col.key]
                start = chunk_index * col.chunk_rows
                if ds.shape[0] < start + valid_rows:
                    ds.resize(start + valid_rows, axis=0)  # metadata only: no chunk is written
                nbytes = memoryview(data).nbytes
                self_.chunks[col.key][chunk_index] = (crc, nbytes, valid_rows * col.row_bytes)
                dropped["bytes"] += nbytes
                dropped["chunks"] += 1

            def write_chunks(self_: Any, col: Any, first: int, valid: list[int], datas: list[Any],
                             crcs: list[int]) -> None:
                for i, (v, d, c) in enumerate(zip(valid, datas, crcs, strict=True)):
                    write_chunk(self_, col, first + i, v, d, c)

            shard_module.OpenShard.write_chunk = write_chunk  # type: ignore[method-assign]
            shard_module.OpenShard.write_chunks = write_chunks  # type: ignore[method-assign]
        host_empty_cache()
        gpu_reset()
        error = None
        stamps: list[float] = []
        capped = False
        impl = workers = copy_threads = None
        started = time.perf_counter() - T_START
        t0 = t_loop = t_end = time.perf_counter()
        open_s = loop_cpu = 0.0
        loop_stats: dict[str, Any] = {}
        try:
            with PeakRSS() as rss, torch.no_grad():
                t_open = time.perf_counter()
                ram_sink = CountingSink() if sink == "ram" else None
                with fw.capture_activations(None if ram_sink else store, sink=ram_sink):
                    open_s = time.perf_counter() - t_open
                    impl = fw.pipeline.impl  # type: ignore[union-attr]
                    workers = getattr(fw.pipeline.writer, "num_workers", 0)  # type: ignore[union-attr]
                    copies = getattr(fw.pipeline, "_copies", None)
                    copy_threads = getattr(copies, "_max_workers", 1) if copies is not None else 1
                    sync()
                    t0 = time.perf_counter()
                    c0 = time.thread_time()
                    for _ in range(n_target):
                        self.fwd()
                        stamps.append(time.perf_counter())
                        if stamps[-1] - t0 > a.max_seconds:
                            capped = True
                            break
                    sync()
                    t_loop = time.perf_counter()
                    loop_cpu = time.thread_time() - c0
                    loop_stats = fw.stats()
                t_end = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            t_end = time.perf_counter()
        finally:
            shard_module.OpenShard.write_chunk = original  # type: ignore[method-assign]
            shard_module.OpenShard.write_chunks = original_many  # type: ignore[method-assign]
        st = fw.stats()
        rss_after_close = current_rss()
        gc.collect()
        malloc_trim()
        rss_after_trim = current_rss()
        on_disk = tree_bytes(path) if path.exists() else 0
        shutil.rmtree(path, ignore_errors=True)
        n = len(stamps)
        e2e = t_end - t0
        loop = t_loop - t0
        half = n // 2
        steady = (n - half) * self.tokens_per_fwd / (t_loop - stamps[half - 1]) if half >= 1 and n >= 4 else None
        raw_act = st.get("bytes_captured", 0)
        w_raw, w_stored = st.get("writer_raw_bytes", 0), st.get("writer_stored_bytes", 0)
        if sink == "ram":  # rows delivered to the sink
            w_raw = w_stored = st.get("writer_bytes", 0)
            st["writer_rows_committed"] = st.get("writer_rows")
            st["writer_compression_ratio"] = 1.0
        tps = n * self.tokens_per_fwd / e2e if e2e > 0 else 0.0
        problems = []
        if error:
            problems.append(error)
        if st.get("forwards") != n:
            problems.append(f"{st.get('forwards')} forwards captured of {n}")
        if st.get("forwards_dropped"):
            problems.append(f"{st['forwards_dropped']} forwards dropped")
        if st.get("writer_rows_committed") != n * self.tokens_per_fwd:
            problems.append(f"{st.get('writer_rows_committed')} rows committed, expected {n * self.tokens_per_fwd}")
        row = {
            "key": key, "label": label, "kind": "ours", "sink": sink, "codec": make_codec(codec_spec).spec,
            "codec_arg": codec_spec,
            "hooks": len(fw.hook_points), "forwards": n, "forwards_target": n_target, "capped_by_max_seconds": capped,
            "tokens_per_s": tps, "loop_tokens_per_s": n * self.tokens_per_fwd / loop if loop > 0 else None,
            "steady_tokens_per_s": steady, "speed_vs_no_capture": tps / self.base_tps if self.base_tps else None,
            "loop_speed_vs_no_capture": (n * self.tokens_per_fwd / loop / self.base_tps) if self.base_tps and loop > 0
            else None,
            "seconds_end_to_end": e2e, "seconds_loop": loop, "seconds_drain_and_commit": t_end - t_loop,
            "open_s": open_s, "raw_activation_bytes": raw_act, "bytes_per_forward": raw_act // max(1, n),
            "raw_gbps": raw_act / e2e / GB if e2e > 0 else 0.0,
            "raw_gbps_loop": raw_act / loop / GB if loop > 0 else 0.0,
            "stored_gbps": w_stored / e2e / GB if e2e > 0 else 0.0,
            "writer_raw_bytes": w_raw, "writer_stored_bytes": w_stored,
            "compression_ratio": st.get("writer_compression_ratio"), "bytes_on_disk": on_disk,
            "noop_dropped_bytes": dropped["bytes"] if sink == "noop" else None,
            "exceeds_buffers": raw_act > a.max_memory_gb * GB,
            "host_pool_bytes": st.get("host_pool_bytes"), "host_pool_peak_bytes": st.get("host_pool_peak_bytes"),
            "host_pool_pinned": st.get("host_pool_pinned"), "gpu_ring_bytes": st.get("gpu_ring_bytes"),
            "gpu_ring_peak_bytes": st.get("gpu_ring_peak_bytes"),
            "writer_peak_buffered_bytes": st.get("writer_peak_buffered_bytes"),
            "writer_max_buffer_bytes": st.get("writer_max_buffer_bytes"),
            "peak_rss_bytes": rss.peak, "rss_start_bytes": rss.start_bytes, "rss_peak_reset": rss.reset_ok,
            "rss_after_close_bytes": rss_after_close, "rss_after_malloc_trim_bytes": rss_after_trim,
            "peak_gpu_bytes": gpu_peak(),
            "host_pool_wait_s": st.get("host_pool_wait_s", 0.0), "gpu_ring_wait_s": st.get("gpu_ring_wait_s", 0.0),
            "writer_time_blocked_s": st.get("writer_time_blocked_s", 0.0),
            "hook_s": st.get("hook_s"), "hook_share_of_loop": st.get("hook_s", 0.0) / loop if loop > 0 else None,
            "model_thread_cpu_share": loop_cpu / loop if loop > 0 else None,
            "writer_compress_s": st.get("writer_compress_s"), "writer_write_s": st.get("writer_write_s"),
            "writer_commit_s": st.get("writer_commit_s"), "shards": st.get("writer_shards_committed"),
            "impl": impl, "workers": workers, "copy_threads": copy_threads, "started_at_s": started,
            "row_wall_s": time.perf_counter() - T_START - started, "problems": problems, "stats": st, "stats_at_loop_end": loop_stats,
        }
        row["time_blocked_s"] = row["host_pool_wait_s"] + (row["gpu_ring_wait_s"] or 0.0) + row["writer_time_blocked_s"]
        self.rows[key] = row
        fw.model = None
        del fw
        host_empty_cache()
        log(f"[{key}] {label}: {n} forwards, {tps:,.0f} tokens/s end-to-end ({row['speed_vs_no_capture'] or 0:.2f}x), "
            f"loop {row['loop_tokens_per_s'] or 0:,.0f} tokens/s, raw {row['raw_gbps']:.2f} GB/s, stored "
            f"{row['stored_gbps']:.2f} GB/s, ratio {row['compression_ratio'] or 0:.3f}, drain+commit "
            f"{row['seconds_drain_and_commit']:.2f} s, blocked {row['time_blocked_s']:.2f} s (pool "
            f"{row['host_pool_wait_s']:.2f}, ring {row['gpu_ring_wait_s'] or 0:.2f}, writer "
            f"{row['writer_time_blocked_s']:.2f}), impl {impl}, {workers} workers"
            + (f" PROBLEMS: {problems}" if problems else ""))

    # -------------------------------------------------------------- baselines
    def _h5_datasets(self, f: Any, names: list[str]) -> list[Any]:
        chunk_rows = max(1, MIB // (self.d * 2))
        return [f.create_dataset(n, shape=(0, self.d), maxshape=(None, self.d), chunks=(chunk_rows, self.d),
                                 dtype="<i2") for n in names]

    def _run_baseline(self, key: str, label: str, step: Any, n_target: int, extra: dict[str, Any] | None = None) -> None:
        """``step()`` runs one forward and returns the list of [tokens, d] CPU tensors to store."""
        import h5py

        a = self.args
        path = Path(tempfile.mkdtemp(prefix=f"capture-{key}-", dir=self.work))
        file = path / "baseline.h5"
        host_empty_cache()
        gpu_reset()
        started = time.perf_counter() - T_START
        error = None
        n = 0
        raw = 0
        loop_cpu = 0.0
        capped = False
        t0 = t_loop = t_end = time.perf_counter()
        try:
            with PeakRSS() as rss, torch.no_grad():
                f = h5py.File(file, "w")
                ds = None
                rows_written = 0
                sync()
                t0 = time.perf_counter()
                c0 = time.thread_time()
                for _ in range(n_target):
                    outs = step()
                    if ds is None:
                        ds = self._h5_datasets(f, [f"layer{i}" for i in range(len(outs))])
                    for d_, t in zip(ds, outs):
                        arr = t.reshape(-1, self.d).view(torch.int16).numpy()
                        d_.resize(rows_written + arr.shape[0], axis=0)
                        d_[rows_written:] = arr
                        raw += arr.nbytes
                    rows_written += outs[0].reshape(-1, self.d).shape[0]
                    n += 1
                    if time.perf_counter() - t0 > a.max_seconds:
                        capped = True
                        break
                sync()
                t_loop = time.perf_counter()
                loop_cpu = time.thread_time() - c0
                f.close()
                fsync_path(file)
                t_end = time.perf_counter()
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            t_end = time.perf_counter()
        size = file.stat().st_size if file.exists() else 0
        shutil.rmtree(path, ignore_errors=True)
        e2e, loop = t_end - t0, t_loop - t0
        tps = n * self.tokens_per_fwd / e2e if e2e > 0 and n else 0.0
        row = {"key": key, "label": label, "kind": "baseline", "forwards": n, "forwards_target": n_target,
               "capped_by_max_seconds": capped, "tokens_per_s": tps,
               "loop_tokens_per_s": n * self.tokens_per_fwd / loop if loop > 0 and n else None,
               "speed_vs_no_capture": tps / self.base_tps if self.base_tps else None,
               "seconds_end_to_end": e2e, "seconds_loop": loop, "seconds_close_fsync": t_end - t_loop,
               "model_thread_cpu_share": loop_cpu / loop if loop > 0 else None,
               "raw_activation_bytes": raw, "raw_gbps": raw / e2e / GB if e2e > 0 else 0.0,
               "stored_gbps": size / e2e / GB if e2e > 0 else 0.0, "compression_ratio": raw / size if size else None,
               "file_bytes": size, "peak_rss_bytes": rss.peak if error is None else None,
               "rss_start_bytes": rss.start_bytes if error is None else None, "peak_gpu_bytes": gpu_peak(),
               "started_at_s": started, "row_wall_s": time.perf_counter() - T_START - started,
               "problems": [error] if error else []}
        row.update(extra or {})
        self.rows[key] = row
        host_empty_cache()
        log(f"[{key}] {label}: {n} forwards, {tps:,.0f} tokens/s ({row['speed_vs_no_capture'] or 0:.2f}x), "
            f"{row['raw_gbps']:.2f} GB/s raw, close+fsync {row['seconds_close_fsync']:.2f} s"
            + (f" ERROR: {error}" if error else ""))

    def row_hooks_baseline(self) -> None:
        blocks = self.model.get_submodule(self.layout.blocks)
        buf: list[torch.Tensor] = []

        def hook(mod: Any, args: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            buf.append(t.detach().cpu())

        handles = [b.register_forward_hook(hook) for b in blocks]

        def step() -> list[torch.Tensor]:
            buf.clear()
            self.fwd()
            return list(buf)

        try:
            self._run_baseline("5i", "baseline: forward hooks .cpu() on every layer -> h5py, fsync", step,
                               self.args.iters)
        finally:
            for h in handles:
                h.remove()

    def row_hidden_states_baseline(self) -> None:
        def step() -> list[torch.Tensor]:
            out = self.fwd(output_hidden_states=True)
            return [h.cpu() for h in out.hidden_states[1:]]

        self._run_baseline("5ii", "baseline: output_hidden_states=True .cpu() -> h5py, fsync", step, self.args.iters)

    def row_tl_baseline(self) -> None:
        label = "baseline: TransformerLens run_with_cache (hook_resid_post) -> cpu -> h5py, fsync"
        try:
            import transformer_lens  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            self.rows["5iii"] = {"key": "5iii", "label": label, "kind": "unavailable",
                                 "reason": f"transformer_lens not importable ({type(exc).__name__}: {exc})",
                                 "design_figure": DESIGN_TL}
            self.notes.append(f"5iii: TransformerLens is not available here ({type(exc).__name__}); DESIGN figure "
                              f"quoted instead: {DESIGN_TL}")
            log(f"[5iii] TransformerLens not available: {exc}")
            return
        try:
            t0 = time.perf_counter()
            tl = tl_model(self.info, self.device)
            init_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.rows["5iii"] = {"key": "5iii", "label": label, "kind": "unavailable",
                                 "reason": f"building the HookedTransformer failed: {type(exc).__name__}: {exc}",
                                 "design_figure": DESIGN_TL}
            self.notes.append(f"5iii: building the HookedTransformer failed ({exc}); DESIGN figure: {DESIGN_TL}")
            return
        toks = self.ids
        a = self.args
        with torch.no_grad():  # TL's own forward, for its ratio
            for _ in range(a.warmup):
                tl(toks, return_type="logits")
            sync()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                tl(toks, return_type="logits")
            sync()
            own = a.iters * self.tokens_per_fwd / (time.perf_counter() - t0)

        def step() -> list[torch.Tensor]:
            _, cache = tl.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"),
                                         return_type="logits")
            outs = [cache[f"blocks.{i}.hook_resid_post"].cpu() for i in range(self.L)]
            del cache
            return outs

        self._run_baseline("5iii", label, step, a.iters, {"tl_init_s": init_s, "tl_own_forward_tokens_per_s": own})
        r = self.rows["5iii"]
        r["speed_vs_own_forward"] = r["tokens_per_s"] / own if own else None
        log(f"[5iii] TL own forward {own:,.0f} tokens/s; with cache -> h5py {r['speed_vs_own_forward'] or 0:.2f}x of it")
        del tl
        host_empty_cache()

    # -------------------------------------------------------------- the limiting stage
    def stages(self, row: dict[str, Any]) -> dict[str, Any]:
        """Each stage's achieved rate over its ceiling (and the rate the model would need at full
        speed over it); the stage closest to its ceiling is named."""
        c = self.ceilings
        if not c or row.get("kind") != "ours" or not row["forwards"]:
            return {}
        impl = row.get("impl") or "torch"
        pk = c.get("pack", {}).get(f"{impl}, None (all rows)") or c.get("pack", {}).get("torch, None (all rows)")
        req_raw = row["bytes_per_forward"] / self.base_fwd_s if self.base_fwd_s else None
        raw_loop = row["raw_gbps_loop"] * GB
        raw_e2e = row["raw_gbps"] * GB
        ratio = row["compression_ratio"] or 1.0
        out: dict[str, Any] = {"required_raw_gbps": req_raw / GB if req_raw else None}

        def put(name: str, ceiling_gbps: float | None, achieved: float, required: float | None, what: str) -> None:
            if not ceiling_gbps:
                return
            out[name] = {"ceiling_gbps": ceiling_gbps, "achieved_gbps": achieved / GB,
                         "achieved_over_ceiling": achieved / GB / ceiling_gbps,
                         "required_over_ceiling": required / GB / ceiling_gbps if required else None, "counts": what}

        if pk:
            put("GPU pack", pk["gbps"], 2 * raw_loop, 2 * req_raw if req_raw else None, "bytes read + written, loop")
        if "d2h" in c:
            put("D2H", c["d2h"]["gbps"], raw_loop, req_raw, "raw bytes, loop")
        comp = c.get("compress", {})
        ce = comp.get(row["codec_arg"] if cuda() else f"{row['codec_arg']} (cpu shuffle)")
        if ce:
            put("compression", ce["gbps"], raw_e2e, req_raw, f"raw bytes, end-to-end, {ce['workers']} workers")
        if row["sink"] == "disk" and "disk" in c:
            put("disk", c["disk"]["gbps"], raw_e2e / ratio, req_raw / ratio if req_raw else None,
                "stored bytes, end-to-end")
        elif row["sink"] == "tmpfs" and "tmpfs" in c:
            put("tmpfs", c["tmpfs"]["gbps"], raw_e2e / ratio, req_raw / ratio if req_raw else None,
                "stored bytes, end-to-end")
        named = {k: v for k, v in out.items() if isinstance(v, dict)}
        if named:
            top = max(named, key=lambda k: named[k]["achieved_over_ceiling"])
            pred = max(named, key=lambda k: named[k]["required_over_ceiling"] or 0.0)
            speed = row.get("speed_vs_no_capture") or 0.0
            util = named[top]["achieved_over_ceiling"]
            out["limiting"] = top
            out["limiting_util"] = util
            out["predicted"] = pred
            out["model_bound"] = speed >= 0.95
            if speed >= 0.95:
                out["verdict"] = f"model (capture keeps up; top stage {top} {util:.2f})"
            elif util >= 0.6:
                out["verdict"] = f"{top} {util:.2f}"
            else:  # no stage near its ceiling: the cost is in the model's thread (hooks, syncs, waits)
                loop_share = row.get("hook_share_of_loop") or 0.0
                cpu_share = row.get("model_thread_cpu_share") or 0.0
                out["verdict"] = (f"model thread (hooks {loop_share:.0%} of loop, its CPU {cpu_share:.0%} of wall, "
                                  f"blocked {row['time_blocked_s']:.2f} s); top stage {top} {util:.2f}")
        return out

    # -------------------------------------------------------------- run all rows
    def run(self) -> dict[str, Any]:
        a = self.args
        want = a.row_set
        mid = self.L // 2
        log(f"=== {self.name}: {self.info['params'] / 1e6:.0f} M params, {self.L} layers, d {self.d}, "
            f"{self.B} x {self.T} tokens, attn {self.info['attn_implementation']}, device {self.device}")
        self.ext_ok, self.ext_error, self.ext_s = False, "no CUDA", 0.0
        if cuda():
            from lightning_llm_inst.buffer import _backend

            t0 = time.perf_counter()
            try:
                _backend.load_extension()
                self.ext_ok, self.ext_error = True, None
            except RuntimeError as exc:
                self.ext_error = str(exc)
            self.ext_s = time.perf_counter() - t0
            log(f"CUDA pack extension: {'ready' if self.ext_ok else 'unavailable: ' + str(self.ext_error)} "
                f"({self.ext_s:.1f} s)")
        self.row_no_capture()
        if "1b" in want:
            self.row_no_capture("1b", host_sync=True)
        bytes_all = self.L * self.tokens_per_fwd * self.d * 2
        bytes_one = self.tokens_per_fwd * self.d * 2
        if "6" in want or any(k in want for k in ("1c", "2", "3a", "3b", "4")):
            self.measure_ceilings()
        if "1c" in want:
            self.row_background_compress()
        plan: list[tuple[str, Any]] = []
        one = f"blocks.{mid}.hook_resid_post"
        if "2" in want:
            if a.one_codec_ok:
                plan.append(("2", lambda: self.run_ours(
                    "2", f"ours, 1 layer ({one}) -> disk, {make_codec(a.one_codec).spec}, fsync",
                    self.config(a.one_codec, hooks=[one]), self.work, self.n_for(bytes_one, a.disk_target_gb * GB),
                    "disk", a.one_codec)))
            else:
                self.notes.append(f"row 2 skipped: codec {a.one_codec} not installed")
        if "3" in want:
            plan.append(("3", lambda: self.run_ours(
                "3", f"ours, all {self.L} resid_post -> RAM sink (pinned host memory, CountingSink; no compression, "
                     f"no disk)", self.config(None, granularity=HookGranularity.RESIDUAL, fsync=False), self.work,
                self.n_for(bytes_all, 8 * a.disk_target_gb * GB), "ram", None)))
        shm = self.shm_dir()
        if "3a" in want:
            if shm is None or not a.sink_codec_ok:
                self.notes.append(f"row 3a skipped: {a.shm_dir} not writable" if shm is None else
                                  f"row 3a skipped: codec {a.sink_codec} not installed")
            else:
                free = shutil.disk_usage(shm).free
                avail = mem_available() or free
                room = min(0.5 * free, 0.25 * avail)
                n3 = min(self.n_for(bytes_all, 0), max(1, int(room // bytes_all)))
                if n3 < a.iters:
                    self.notes.append(f"row 3a: {shm} has room for {n3} forwards only (free {free / GB:.1f} GB, "
                                      f"memory available {avail / GB:.1f} GB)")
                plan.append(("3a", lambda: self.run_ours(
                    "3a", f"ours, all {self.L} resid_post -> RAM sink A: store on tmpfs {shm}, fsync=False, "
                          f"{make_codec(a.sink_codec).spec}",
                    self.config(a.sink_codec, granularity=HookGranularity.RESIDUAL, fsync=False), shm, n3, "tmpfs",
                    a.sink_codec)))
        if "3b" in want:
            if not a.sink_codec_ok:
                self.notes.append(f"row 3b skipped: codec {a.sink_codec} not installed")
            else:
                base = shm if shm is not None else self.work
                plan.append(("3b", lambda: self.run_ours(
                    "3b", f"ours, all {self.L} resid_post -> RAM sink B: no-op writer (write_chunk drops the bytes; "
                          f"pack + D2H + compression only), {make_codec(a.sink_codec).spec}",
                    self.config(a.sink_codec, granularity=HookGranularity.RESIDUAL, fsync=False), base,
                    self.n_for(bytes_all, a.disk_target_gb * GB), "noop", a.sink_codec)))
        if "4" in want:
            for spec in a.codec_list:
                plan.append((f"4 {make_codec(spec).spec}", lambda spec=spec: self.run_ours(
                    f"4-{make_codec(spec).name}", f"ours, all {self.L} resid_post -> disk, {make_codec(spec).spec}, "
                                                   f"fsync",
                    self.config(spec, granularity=HookGranularity.RESIDUAL), self.work,
                    self.n_for(bytes_all, a.disk_target_gb * GB), "disk", spec)))
        if "5i" in want:
            plan.append(("5i", self.row_hooks_baseline))
        if "5ii" in want:
            plan.append(("5ii", self.row_hidden_states_baseline))
        if "5iii" in want:
            plan.append(("5iii", self.row_tl_baseline))
        for key, fn in plan:
            left = self.budget_left()
            if left < a.max_seconds + 15:
                self.notes.append(f"row {key} skipped: time budget (--budget-seconds {a.budget_seconds:.0f}) "
                                  f"nearly spent ({left:.0f} s left)")
                log(f"[{key}] skipped: {left:.0f} s of budget left")
                continue
            log(f"[{key}] starting ({left:.0f} s of budget left)")
            fn()
        for r in self.rows.values():
            st = self.stages(r)
            if st:
                r["stages"] = st
        return {"model": self.info, "batch": self.B, "seq": self.T, "tokens_per_forward": self.tokens_per_fwd,
                "bytes_per_forward_all_layers": bytes_all, "bytes_per_forward_one_layer": bytes_one,
                "ext_ok": self.ext_ok, "ext_error": self.ext_error, "ext_build_s": self.ext_s,
                "ceilings": self.ceilings, "rows": self.rows, "notes": self.notes}


# ---------------------------------------------------------------------------- report
def f_gb(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x / GB:.{digits}f}"


def f_num(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def rss_cell(r: dict[str, Any]) -> str:
    peak, start = r.get("peak_rss_bytes"), r.get("rss_start_bytes")
    if peak is None:
        return "-"
    return f"{peak / GB:.1f} (+{(peak - start) / GB:.1f})" if start else f"{peak / GB:.1f}"


def row_order(key: str) -> tuple:
    order = {"1": 0, "1b": 0.3, "1c": 0.6, "2": 1, "3": 1.5, "3a": 2, "3b": 3, "4-none": 4, "4-lz4": 5, "4-zstd": 6, "5i": 7, "5ii": 8, "5iii": 9}
    return (order.get(key, 50), key)


def build_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Capture benchmark ({result['tag']})", "",
             f"{result['timestamp']}; `{result['command']}`", "",
             f"Machine: {result['machine']['cuda_device'] or 'no GPU'}, {result['machine']['cpu_count']} CPUs "
             f"({result['machine']['cpu_model']}), torch {result['machine']['torch']}, transformers "
             f"{result['machine']['transformers']}, h5py {result['machine']['h5py']}, zstandard "
             f"{result['machine']['zstandard']}, lz4 {result['machine']['lz4']}. Capture config: max_memory_gb "
             f"{result['config']['max_memory_gb']}, target_throughput_gbps {result['config']['target_gbps']}, "
             f"gpu_buffer_mb {result['config']['gpu_buffer_mb']}, chunk_size "
             f"{result['config'].get('chunk_size') or 'default (4 MiB on a GPU, 1 MiB on a CPU)'}, disk rows >= {result['config']['disk_target_gb']:.1f}"
             f" GB raw or {result['config']['max_seconds']:.0f} s of forwards. GB = 10^9 bytes.", "",
             "**RAM sink** (row 3): rows packed on the GPU, copied into the pinned host pool and handed to a "
             "`CountingSink` (`capture_activations(sink=...)`: no compression, no disk). Diagnostic rows 3a/3b: 3a writes the ordinary store into a tmpfs directory with `fsync=False` (every "
             "stage runs, the \"disk\" is memory); 3b monkeypatches `OpenShard.write_chunk` to drop the compressed "
             "bytes (counted; shard files hold metadata only), so only pack + D2H + compression (+ the drain "
             "thread's chunk copies) run. Tokens/s of \"ours\" rows are end-to-end: first forward to after "
             "`capture_activations` exits (drained, committed, fsynced); \"loop\" is the forward loop alone, "
             "\"steady\" its last half. Row 1 (no capture) runs as long as a capture row (--max-seconds), so "
             "that GPU clocks settling under sustained load weigh on both sides of \"vs none\".", ""]
    notes = [*result["notes"]]
    for m in result["models"]:
        notes += [f"{m['model']['name']}: {n}" for n in m["notes"]]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for m in result["models"]:
        name = m["model"]["name"]
        c = m["ceilings"]
        lines += [f"## {name}: ceilings (same run)", ""]
        cl = []
        if "d2d" in c:
            cl.append(f"D2D copy {c['d2d']['gbps']:.0f} GB/s (read+write)")
        if "d2h" in c:
            cl.append(f"D2H pinned {c['d2h']['gbps']:.1f} GB/s (pageable {c['d2h']['pageable_gbps']:.1f}, pinning "
                      f"new memory {c['d2h']['pin_new_gbps']:.2f})")
        if "disk" in c:
            cl.append(f"disk write+fsync {c['disk']['gbps']:.2f} GB/s ({c['disk']['bytes'] / GIB:.1f} GiB, "
                      f"{(c['disk'].get('fs') or {}).get('type', '?')})")
        if "disk_shards" in c:
            ds = c["disk_shards"]
            cl.append(f"disk as the store writes it {ds['gbps']:.2f} GB/s ({ds['bytes'] / GIB:.0f} GiB in "
                      f"{ds['shard_bytes'] // MIB} MiB files, each fsynced while the next is written)")
        if "tmpfs" in c:
            cl.append(f"tmpfs write {c['tmpfs']['gbps']:.2f} GB/s")
        lines += ["- " + "; ".join(cl)] if cl else []
        for k, v in c.get("compress", {}).items():
            lines.append(f"- compression {k}: {v['gbps']:.2f} GB/s raw on {v['workers']} workers "
                         f"({v['per_worker_gbps']:.2f}/worker), ratio {v['ratio']:.3f} [{v['input']}; jobs of "
                         f"{v.get('job_chunks', 1)} chunks, as the writer compresses a hook point's slice]")
        for k, v in c.get("pack", {}).items():
            lines.append(f"- pack {k}: {v['gbps']:.0f} GB/s (read+write), {v['us_per_call']:.0f} us/call"
                         + (f", {v['fraction_of_d2d']:.3f} of D2D" if "fraction_of_d2d" in v else "")
                         + (f", bytes equal torch: {v['bytes_equal_torch']}" if "bytes_equal_torch" in v else ""))
        lines.append(f"- CUDA pack extension: {'ready' if m['ext_ok'] else 'unavailable (' + str(m['ext_error']) + ')'}"
                     f", {m['ext_build_s']:.1f} s")
        rows = sorted(m["rows"].values(), key=lambda r: row_order(r["key"]))
        st_rows = [r for r in rows if r.get("stages")]
        if st_rows:
            lines += ["", f"## {name}: stage use (achieved / ceiling; in brackets: rate needed for full model speed "
                      "/ ceiling)", "", "| row | GPU pack | D2H | compression | disk / tmpfs | hooks / loop | "
                      "model-thread CPU / loop | worker compress s | write s | commit s | impl, workers, copy threads |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in st_rows:
                s = r["stages"]

                def cell(name: str) -> str:
                    v = s.get(name)
                    if not v:
                        return "-"
                    req = v["required_over_ceiling"]
                    return f"{v['achieved_over_ceiling']:.2f} ({req:.2f})" if req is not None else \
                        f"{v['achieved_over_ceiling']:.2f}"

                lines.append(f"| {r['key']} | {cell('GPU pack')} | {cell('D2H')} | {cell('compression')} | "
                             f"{cell('disk') if 'disk' in s else cell('tmpfs')} | {f_num(r.get('hook_share_of_loop'))} | "
                             f"{f_num(r.get('model_thread_cpu_share'))} |"
                             f" {f_num(r.get('writer_compress_s'))} | {f_num(r.get('writer_write_s'))} | "
                             f"{f_num(r.get('writer_commit_s'))} | {r.get('impl')}, {r.get('workers')}, {r.get('copy_threads')} |")
        problems = [f"{r['key']}: {p}" for r in rows for p in r.get("problems", [])]
        if problems:
            lines += ["", "PROBLEMS:", ""] + [f"- {p}" for p in problems]
    for m in result["models"]:
        name = m["model"]["name"]
        base = m["rows"].get("1", {})
        lines += ["", f"## {name}: {m['batch']} x {m['seq']} tokens per forward, {m['model']['layers']} layers, d "
                  f"{m['model']['d_model']}; all layers = {m['bytes_per_forward_all_layers'] / 1e6:.0f} MB per forward; "
                  f"no capture {base.get('ms_per_forward', 0):.1f} ms per forward", "",
                  "| row | what | fwd | tokens/s | vs none | loop (steady) tokens/s | raw GB/s | stored GB/s | ratio | "
                  "pinned pool / peak GB | peak RSS GB (+ over row start) | peak GPU GB (ring) | blocked s (pool/ring/writer) | limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(m["rows"].values(), key=lambda r: row_order(r["key"])):
            if r["kind"] == "unavailable":
                lines.append(f"| {r['key']} | {r['label']} | - | not available: {r['reason']}. DESIGN figure: "
                             f"{r['design_figure']} | | | | | | | | | | |")
                continue
            fwd = f"{r['forwards']}" + ("*" if r.get("capped_by_max_seconds") else "")
            loop = f_num(r.get("loop_tokens_per_s"), ",.0f")
            if r.get("steady_tokens_per_s"):
                loop += f" ({r['steady_tokens_per_s']:,.0f})"
            what = r["label"]
            if r["kind"] == "baseline" and r.get("tl_own_forward_tokens_per_s"):
                what += f" [TL own forward {r['tl_own_forward_tokens_per_s']:,.0f} tokens/s; " \
                        f"{r['speed_vs_own_forward']:.2f}x of it]"
            if r["kind"] == "ours":
                pool = f"{f_gb(r['host_pool_bytes'])} / {f_gb(r['host_pool_peak_bytes'])}"
                gpu = f"{f_gb(r['peak_gpu_bytes'])} ({f_gb(r['gpu_ring_bytes'])})"
                blocked = (f"{r['time_blocked_s']:.2f} ({r['host_pool_wait_s']:.2f}/{r['gpu_ring_wait_s'] or 0:.2f}/"
                           f"{r['writer_time_blocked_s']:.2f})")
                limit = (r.get("stages") or {}).get("verdict", "-")
            else:
                pool, gpu, blocked, limit = "-", f_gb(r.get("peak_gpu_bytes")), "-", "-"
            lines.append(f"| {r['key']} | {what} | {fwd} | {r['tokens_per_s']:,.0f} | "
                         f"{f_num(r.get('speed_vs_no_capture'), '.3f')} | {loop} | {f_num(r.get('raw_gbps'))} | "
                         f"{f_num(r.get('stored_gbps'))} | {f_num(r.get('compression_ratio'), '.3f')} | {pool} | "
                         f"{rss_cell(r)} | {gpu} | {blocked} | {limit} |")
        lines.append("")
        lines.append("`*` = stopped by --max-seconds. Blocked: pool / ring = the model thread waiting for host-pool / "
                     "GPU-ring space; writer = threads handing rows to the writer waiting on its memory budget, "
                     "summed over those threads (can exceed wall time). Peak RSS includes the process baseline "
                     "(CUDA context, pinned pool; freed heap is trimmed between rows); GPU peak includes the weights.")
    return "\n".join(lines) + "\n"


def machine_info(work: Path) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
                            "platform": platform.platform(), "torch": torch.__version__,
                            "cuda_device": torch.cuda.get_device_name(0) if cuda() else None,
                            "cuda_version": torch.version.cuda, "work_dir": str(work), "work_fs": fs_of(work),
                            "memory_available_bytes": mem_available()}
    for mod in ("transformers", "h5py", "zstandard", "lz4", "transformer_lens", "numpy"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or getattr(m, "version", None)
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["llama-1b", "gpt2-small", "both"], default=None,
                   help="default: both (gpt2-small with --quick)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="default 1024 (64 with --quick)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per row (default 20, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--dir", default=None, help="where stores go (a temp dir is made inside; default: the repo root)")
    p.add_argument("--shm-dir", default="/dev/shm", help="tmpfs directory of the RAM-sink row 3a")
    p.add_argument("--max-memory-gb", type=float, default=None, help="capture max_memory_gb (default 16, 1 with --quick)")
    p.add_argument("--target-gbps", type=float, default=4.0, help="capture target_throughput_gbps")
    p.add_argument("--gpu-buffer-mb", type=int, default=1024, help="capture gpu_buffer_mb")
    p.add_argument("--chunk-size", default=None, help="capture chunk_size (raw bytes per HDF5 chunk; default: the "
                   "config's, 4 MiB on a GPU)")
    p.add_argument("--codecs", default="none,lz4,zstd", help="codecs of row 4 (none, lz4, zstd, zstd:N)")
    p.add_argument("--one-codec", default="zstd", help="codec of row 2")
    p.add_argument("--sink-codec", default="zstd", help="codec of the RAM-sink rows 3a/3b")
    p.add_argument("--rows", default="all", help=f"subset of rows: comma list of {','.join(ROW_KEYS)} ("
                   f"5 = 5i,5ii,5iii); row 1 always runs")
    p.add_argument("--disk-target-gb", type=float, default=None,
                   help="raw GB of activations per disk / no-op row (default max(8, 2 x max-memory-gb); 0 with --quick)")
    p.add_argument("--max-seconds", type=float, default=None, help="cap on one row's forward loop (default 30)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="rows are skipped once the run has used this much wall time (default 420)")
    p.add_argument("--disk-ceiling-gib", type=float, default=None, help="size of the disk write test (default 2)")
    p.add_argument("--disk-sustained-gib", type=float, default=0.0,
                   help="also measure the disk with this many GiB written as 256 MiB shards fsynced behind the writes")
    p.add_argument("--compress-min-gb", type=float, default=None, help="raw GB through each compression ceiling")
    p.add_argument("--tag", default=None, help="result file tag (default: h100 with CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, CPU smoke test")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    a = p.parse_args(argv)
    q = a.quick
    a.model = a.model or ("gpt2-small" if q else "both")
    a.batch = a.batch or (2 if q else 8)
    a.seq = a.seq or (64 if q else 1024)
    a.iters = a.iters or (3 if q else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 3)
    a.max_memory_gb = a.max_memory_gb or (1.0 if q else 16.0)
    if a.disk_target_gb is None:
        a.disk_target_gb = 0.0 if q else max(8.0, 2 * a.max_memory_gb)
    a.max_seconds = a.max_seconds or (10.0 if q else 30.0)
    a.budget_seconds = a.budget_seconds or (110.0 if q else 420.0)
    a.disk_ceiling_gib = a.disk_ceiling_gib or (0.0625 if q else 2.0)
    a.compress_min_gb = a.compress_min_gb if a.compress_min_gb is not None else (0.02 if q else 1.0)
    a.tag = a.tag or ("h100" if cuda() else "cpu")
    want: set[str] = set()
    for tok in (t.strip() for t in a.rows.split(",")):
        if not tok:
            continue
        if tok == "all":
            want.update(DEFAULT_ROWS)
        elif tok == "5":
            want.update(("5i", "5ii", "5iii"))
        elif tok in ROW_KEYS:
            want.add(tok)
        else:
            p.error(f"--rows: unknown row {tok!r}; use {','.join(ROW_KEYS)}, 3, 5 or all")
    a.row_set = want
    return a


def codec_available(spec: str) -> tuple[bool, str | None]:
    name = make_codec(spec).name
    try:
        if name == "lz4":
            import lz4.block  # noqa: F401
        elif name == "zstd":
            import zstandard  # noqa: F401
    except ImportError as exc:
        return False, f"codec {spec} skipped: {exc}"
    return True, None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    notes: list[str] = []
    a.codec_list = []
    for spec in (s.strip() for s in a.codecs.split(",") if s.strip()):
        ok, why = codec_available(spec)
        if ok:
            a.codec_list.append(spec)
        else:
            notes.append(why)
    a.one_codec_ok, why = codec_available(a.one_codec)
    if why:
        notes.append(f"row 2: {why}")
    a.sink_codec_ok, why = codec_available(a.sink_codec)
    if why:
        notes.append(f"rows 3a/3b: {why}")
    try:
        import h5py  # noqa: F401
    except ImportError:
        a.row_set -= {"5i", "5ii", "5iii"}
        notes.append("h5py missing: baselines 5 skipped")
    device = torch.device("cuda" if cuda() else "cpu")
    if not cuda():
        notes.append("no CUDA device: the capture runs its CPU path (no GPU ring, workers shuffle on the CPU)")
    base = Path(a.dir) if a.dir else REPO
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".capture_bench_", dir=base))
    models = ["llama-1b", "gpt2-small"] if a.model == "both" else [a.model]
    result: dict[str, Any] = {
        "tag": a.tag, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(work),
        "config": {"batch": a.batch, "seq": a.seq, "iters": a.iters, "warmup": a.warmup,
                   "max_memory_gb": a.max_memory_gb, "target_gbps": a.target_gbps, "gpu_buffer_mb": a.gpu_buffer_mb,
                   "chunk_size": a.chunk_size,
                   "codecs": a.codec_list, "one_codec": a.one_codec, "sink_codec": a.sink_codec,
                   "rows": sorted(a.row_set), "disk_target_gb": a.disk_target_gb, "max_seconds": a.max_seconds,
                   "budget_seconds": a.budget_seconds, "quick": a.quick, "shm_dir": a.shm_dir,
                   "shm_fs": fs_of(Path(a.shm_dir)) if Path(a.shm_dir).exists() else None},
        "notes": notes, "models": [],
    }
    wfs = result["machine"]["work_fs"]
    if wfs and wfs["type"] in ("tmpfs", "ramfs"):
        notes.append(f"the store directory {work} is on {wfs['type']}: disk figures are memory speed")
    log(f"machine: {result['machine']['cuda_device'] or 'CPU only'}, {os.cpu_count()} CPUs; stores in {work}")
    rc = 0
    try:
        for name in models:
            b = None
            try:
                b = Bench(a, name, work, device)
                result["models"].append(b.run())
            except Exception as exc:  # noqa: BLE001 - keep the other model's results
                traceback.print_exc()
                notes.append(f"{name}: failed with {type(exc).__name__}: {exc}")
                rc = 1
            finally:
                if b is not None:
                    del b.model
                del b
                host_empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for p in CREATED:  # row directories outside ``work`` (tmpfs) left by a failed row
            shutil.rmtree(p, ignore_errors=True)
    if any(r.get("problems") for m in result["models"] for r in m["rows"].values()):
        rc = 1
    result["wall_s"] = time.perf_counter() - T_START
    md = build_markdown(result)
    outs = [Path(a.results_dir)]
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]))
    for o in outs:
        o.mkdir(parents=True, exist_ok=True)
        (o / f"capture-{a.tag}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (o / f"capture-{a.tag}.md").write_text(md)
        log(f"wrote {o / f'capture-{a.tag}.json'} and .md")
    print()
    print(md, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
