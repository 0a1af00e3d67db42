"""Write a store of activation-like data, then inspect and verify it.

Run: ``make demo`` (or ``python examples/store_demo.py [--out DIR] [--mib 256]``).
Shows the writer's throughput, the store's ``info`` table and a verified read-back.
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch
from tqdm import tqdm

from lightning_llm_inst.cli import main as cli
from lightning_llm_inst.store import ActivationStore, StoreWriter


def activation_like(g: torch.Generator, rows: int, d: int) -> torch.Tensor:
    """Heavy-tailed rows with a few outlier dimensions, like a residual stream, in bfloat16."""
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[:4]] = 40.0
    t = torch.randn(rows, d, generator=g) / torch.rand(rows, d, generator=g).clamp_min(0.05).sqrt()  # heavy tails
    return (t * scale).to(torch.bfloat16)


def run(out: str, mib: int, codec: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    d, rows, hooks = 576, 1024, [f"blocks.{i}.hook_resid_post" for i in range(4)]
    batches = [{h: activation_like(g, rows, d) for h in hooks} for _ in range(4)]
    n_batches = max(1, mib * 2**20 // (rows * d * 2 * len(hooks)))
    t0 = time.perf_counter()
    with StoreWriter(out, codec=codec, shard_size="64MiB", metadata={"demo": "synthetic activations"}) as w:
        for i in tqdm(range(n_batches), desc="writing", unit="batch"):
            seq = torch.arange(rows) // 128 + 8 * i
            w.append(batches[i % len(batches)],
                     tokens={"input_ids": torch.randint(0, 49152, (rows,), generator=g), "sequence_id": seq,
                             "position": (torch.arange(rows) % 128).to(torch.int32)})
    dt = time.perf_counter() - t0
    stats = w.stats()
    print(f"\nwrote {stats['raw_bytes'] / 1e9:.2f} GB raw in {dt:.1f} s: {stats['raw_bytes'] / dt / 1e9:.2f} GB/s, "
          f"ratio {stats['compression_ratio']:.2f}, blocked {stats['time_blocked_s']:.1f} s\n")
    cli(["info", out])
    print()
    cli(["verify", "-q", out])
    store = ActivationStore(out)
    x = store[hooks[0]][:rows]
    assert torch.equal(x.view(torch.int16), batches[0][hooks[0]].view(torch.int16))
    print(f"\nread back {hooks[0]}[:{rows}]: {tuple(x.shape)} {x.dtype}, bit-exact")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output/store")
    p.add_argument("--mib", type=int, default=256, help="raw MiB to write")
    p.add_argument("--codec", default="zstd:1")
    a = p.parse_args()
    run(a.out, a.mib, a.codec)
