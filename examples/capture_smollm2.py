"""Capture SmolLM2-135M-Instruct's activations inside ``Trainer.predict`` and inspect the store.

Run: ``make demo`` (or ``python examples/capture_smollm2.py [--out runs/demo] [--limit N]``).
All 30 residual streams plus attention and MLP outputs of layers 0, 15 and 29 are captured
over the corpus in ``examples/data`` (padding excluded), then the store's table, the capture
throughput and a check against a direct forward pass are printed.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from lightning_llm_inst import ActivationCapture, ActivationStore, CausalLM, TextDataModule
from lightning_llm_inst.cli import main as cli

HOOKS = ["blocks.*.hook_resid_post"] + [f"blocks.{i}.hook_{k}" for i in (0, 15, 29) for k in ("attn_out", "mlp_out")]


def main(out: str, limit: int | None, batch_size: int) -> None:
    t0 = time.perf_counter()
    lm = CausalLM("smollm2")
    data = TextDataModule(tokenizer="smollm2", max_length=128, batch_size=batch_size, limit=limit)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    capture = ActivationCapture(out, hooks=HOOKS, compression="zstd", storage_dtype="bfloat16",
                                max_memory_gb=2.0, mode="overwrite", stages=["predict"])
    trainer = L.Trainer(accelerator="auto", devices=1, callbacks=[capture], logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    t1 = time.perf_counter()
    trainer.predict(lm, datamodule=data, return_predictions=False)
    dt = time.perf_counter() - t1
    s = capture.stats()
    print(f"\ncaptured {s['rows']} tokens x {len(HOOKS) - 1 + 30} hook points in {dt:.1f} s: "
          f"{s['rows'] / dt:.0f} tokens/s, {s['bytes_captured'] / dt / 1e6:.1f} MB/s raw, "
          f"compression ratio {s['writer_compression_ratio']:.2f}, writer blocked {s['writer_time_blocked_s']:.2f} s\n")
    path = f"{out}/predict"
    cli(["info", path])
    # the stored rows are the model's own activations: compare one batch with a direct run
    store = ActivationStore(path)
    batch = data._collate([data._data[i] for i in range(min(batch_size, len(data._data)))])
    with torch.no_grad():
        hidden = lm.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                          output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].reshape(-1).bool()
    want = hidden[16].reshape(-1, hidden[16].shape[-1])[valid].to(torch.bfloat16)
    got = store["blocks.15.hook_resid_post"][: want.shape[0]]
    print(f"\nblocks.15.hook_resid_post of the first batch equals output_hidden_states[16]: {torch.equal(got, want)}")
    print("texts of stored rows: token ids, sequence ids and positions are in store.tokens")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=int, default=None, help="texts to use (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    main(a.out, a.limit, a.batch_size)
