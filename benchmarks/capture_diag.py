"""Where a capture's time goes on a GPU: the plain forward loop next to the same loop with one
piece of the pipeline's work running beside it (h5py chunk writes, zstd compression, memcpy
threads) and next to captures whose later stages are cut off (no-op chunk writes).

Run on a CUDA machine: ``python benchmarks/capture_diag.py --model llama-1b``. Prints one line per
variant: tokens/s and speed vs the plain loop of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capture import build_model  # noqa: E402

from lightning_llm_inst import InstrumentationConfig, InstrumentationFramework  # noqa: E402
from lightning_llm_inst.store import shard as shard_module  # noqa: E402

MIB = 1 << 20


def loop(fwd: Callable[[], Any], n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fwd()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


class Background:
    """Threads doing ``work`` at ``rate`` bytes/s in total (0: as fast as they can)."""

    def __init__(self, work: Callable[[int], int], threads: int, rate: float) -> None:
        self.work, self.rate, self.stop = work, rate, threading.Event()
        self.done = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        self.n = threads

    def run(self, i: int) -> None:
        t0 = time.perf_counter()
        mine = 0
        while not self.stop.is_set():
            mine += self.work(i)
            if self.rate:
                ahead = mine / (self.rate / self.n) - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        with self.lock:
            self.done += mine

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--impl", default="auto")
    p.add_argument("--only", default="")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    model, info = build_model(a.model, False, dev)
    B, T = 8, 1024
    ids = torch.randint(0, info["vocab"], (B, T), device=dev)
    mask = torch.ones(B, T, dtype=torch.int64, device=dev)

    def fwd() -> Any:
        return model(input_ids=ids, attention_mask=mask, use_cache=False)

    d = info["d_model"]
    layer_bytes = B * T * d * 2
    results: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(3):
            fwd()
        base = a.iters * B * T / loop(fwd, a.iters)
        fwd_s = B * T / base
        results["base"] = base
        print(f"base: {base:,.0f} tokens/s, {fwd_s * 1e3:.1f} ms per forward", flush=True)
        rate1 = layer_bytes / fwd_s  # bytes/s of one layer at full speed

        def report(name: str, tps: float, extra: str = "") -> None:
            results[name] = tps
            print(f"{name}: {tps:,.0f} tokens/s = {tps / base:.3f}x {extra}", flush=True)

        def want(name: str) -> bool:
            return not a.only or any(name.startswith(x) for x in a.only.split(","))

        # --- background work beside the plain loop
        rng = np.random.default_rng(0)
        chunk = (rng.standard_normal(MIB // 2).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = chunk.view(np.uint8)
        planes = np.ascontiguousarray(raw.reshape(-1, 2).T)
        import zstandard

        cctxs = [zstandard.ZstdCompressor(level=1) for _ in range(16)]
        comp = cctxs[0].compress(planes.tobytes())
        tmp = Path(tempfile.mkdtemp(prefix="diag-"))

        def zstd_work(i: int) -> int:
            cctxs[i].compress(planes)
            return raw.nbytes

        def memcpy_work(i: int, dst=[np.empty(MIB, np.uint8) for _ in range(16)]) -> int:
            np.copyto(dst[i], raw)
            return raw.nbytes

        def h5_writer() -> Callable[[int], int]:
            import h5py
            import hdf5plugin

            f = h5py.File(tempfile.mktemp(suffix=".h5", dir=tmp), "w")
            ds = f.create_dataset("x", shape=(0, d), maxshape=(None, d), chunks=(MIB // (2 * d) // 2 * 2 or 1, d),
                                  dtype=np.uint16, **hdf5plugin.Zstd(clevel=1))
            rows = ds.chunks[0]
            state = {"i": 0}

            def work(_: int) -> int:
                i = state["i"]
                state["i"] += 1
                if ds.shape[0] < (i + 1) * rows:
                    ds.resize((i + 1 + 64) * rows, axis=0)
                ds.id.write_direct_chunk((i * rows, 0), comp)
                return rows * d * 2
            return work

        if want("bg-h5"):
            with Background(h5_writer(), 1, rate1) as bg:
                tps = a.iters * B * T / loop(fwd, a.iters)
            report("bg-h5 1 thread @1 layer rate", tps, f"({bg.done / 1e9:.2f} GB raw)")
            with Background(h5_writer(), 1, 0) as bg:
                tps = a.iters * B * T / loop(fwd, a.iters)
            report("bg-h5 1 thread flat out", tps, f"({bg.done / 1e9:.2f} GB raw)")
        for n in (9, 4, 2):
            if want("bg-zstd"):
                with Background(zstd_work, n, rate1) as bg:
                    tps = a.iters * B * T / loop(fwd, a.iters)
                report(f"bg-zstd {n} threads @1 layer rate", tps, f"({bg.done / 1e9:.2f} GB raw)")
        if want("bg-zstd"):
            with Background(zstd_work, 9, 0) as bg:
                tps = a.iters * B * T / loop(fwd, a.iters)
            report("bg-zstd 9 threads flat out", tps, f"({bg.done / 1e9:.2f} GB raw)")
        if want("bg-memcpy"):
            with Background(memcpy_work, 8, 0) as bg:
                tps = a.iters * B * T / loop(fwd, a.iters)
            report("bg-memcpy 8 threads flat out", tps, f"({bg.done / 1e9:.2f} GB)")

        # --- captures with cut-off stages
        original = shard_module.OpenShard.write_chunk

        def noop_write(self_: Any, col: Any, chunk_index: int, valid_rows: int, data: Any, crc: int) -> None:
            ds = self_.datasets[col.key]
            start = chunk_index * col.chunk_rows
            if ds.shape[0] < start + valid_rows:
                ds.resize(start + valid_rows, axis=0)
            self_.chunks[col.key][chunk_index] = (crc, memoryview(data).nbytes, valid_rows * col.row_bytes)

        def capture(name: str, layers: Any, codec: Any, noop: bool, fsync: bool = True, **kw: Any) -> None:
            if not want(name):
                return
            cfg = InstrumentationConfig(hooks="blocks.*.hook_resid_post", layers=layers,
                                        compression_algorithm=codec, max_memory_gb=16, target_throughput_gbps=4,
                                        buffer_impl=a.impl, fsync=fsync, **kw)
            fw = InstrumentationFramework(cfg)
            fw.instrument_model(model)
            if noop:
                shard_module.OpenShard.write_chunk = noop_write
            store = Path(tempfile.mkdtemp(prefix="cap-", dir=tmp)) / "s"
            try:
                with fw.capture_activations(store):
                    for _ in range(3):
                        fwd()
                    t_loop = loop(fwd, a.iters)
                    t_end = time.perf_counter()
                tail = time.perf_counter() - t_end
            finally:
                shard_module.OpenShard.write_chunk = original
            st = fw.stats()
            e2e = t_loop + tail
            print(f"{name}: end to end {a.iters * B * T / e2e:,.0f} tokens/s, raw "
                  f"{st.get('bytes_captured', 0) / max(1, st.get('rows', 1)) * a.iters * B * T / e2e / 1e9:.2f} GB/s "
                  f"(loop + close {e2e:.1f} s)", flush=True)
            report(name, a.iters * B * T / t_loop,
                   f"(close {tail:.2f} s; hook_s {st.get('hook_s', 0):.2f}; impl {fw.config.buffer_impl}; "
                   f"workers {st.get('writer_workers')}; blocked ring/pool {st.get('gpu_ring_wait_s', 0):.2f}/"
                   f"{st.get('host_pool_wait_s', 0):.2f})")

        capture("cap1-none-noop", [8], None, True)
        capture("cap1-zstd-noop", [8], "zstd", True)
        capture("cap1-zstd-disk", [8], "zstd", False)
        capture("cap16-none-noop", None, None, True)
        capture("cap1-zstd-disk-1copy", [8], "zstd", False, copy_threads=1)
        capture("cap16-zstd-disk", None, "zstd", False)
        capture("cap16-zstd-disk-2copy", None, "zstd", False, copy_threads=2)
        capture("cap16-zstd-disk-2copy-8w", None, "zstd", False, copy_threads=2, num_workers=8)
        capture("cap16-zstd-disk-8w", None, "zstd", False, num_workers=8)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
