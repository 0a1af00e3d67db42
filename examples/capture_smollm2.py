"""Capture SmolLM2-135M-Instruct's activations inside ``Trainer.predict``, inspect the store, and
train a small sparse autoencoder on it.

Run: ``make demo`` (or ``python examples/capture_smollm2.py [--out runs/demo] [--limit N]``).
All 30 residual streams plus attention and MLP outputs of layers 0, 15 and 29 are captured
over the corpus in ``examples/data`` (padding excluded), then the store's table, the capture
throughput and a check against a direct forward pass are printed. Then a TopK SAE is trained on
the layer-15 residual stream with ``llm-inst sae fit --config configs/sae_smollm2.yaml`` (each
text's first token, the attention sink, and special tokens left out, as by default), spliced back
into the model on text it has not seen (CE loss recovered, FVU without and with those tokens), and
the TensorBoard command that shows its features is printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import lightning as L
import torch

from lightning_llm_inst import ActivationCapture, ActivationStore, CausalLM, TextDataModule
from lightning_llm_inst.cli import main as cli

SAE_HOOK = "blocks.15.hook_resid_post"
HOOKS = ["blocks.*.hook_resid_post"] + [f"blocks.{i}.hook_{k}" for i in (0, 15, 29) for k in ("attn_out", "mlp_out")]


def main(out: str, limit: int | None, batch_size: int) -> None:
    t0 = time.perf_counter()
    lm = CausalLM("smollm2")
    data = TextDataModule(tokenizer="smollm2", max_length=128, batch_size=batch_size, limit=limit)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    capture = ActivationCapture(out, hooks=HOOKS, codec="zstd", storage_dtype="bfloat16",
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
    store.close()
    train_sae(lm, path, out)


def train_sae(lm: CausalLM, path: str, out: str) -> None:
    from lightning_llm_inst.models import corpus_texts
    from lightning_llm_inst.sae import evaluate_sae, load_saelens

    logs = f"{out}/sae"
    print(f"\ntraining a TopK SAE on {SAE_HOOK} (configs/sae_smollm2.yaml) ...")
    t0 = time.perf_counter()
    cli(["sae", "fit", "--config", "configs/sae_smollm2.yaml", "--data.store_path", path,
         "--trainer.logger.init_args.save_dir", logs, "--trainer.enable_progress_bar", "false"])
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    run = max(glob.glob(f"{logs}/smollm2/version_*"), key=os.path.getmtime)
    sae = load_saelens(f"{run}/saelens")
    # text the capture did not see: the standard library's help topics
    import pydoc_data.topics

    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 400][:16]
    seen = set(corpus_texts())
    texts = [t for t in texts if t not in seen]
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    result = evaluate_sae(lm.model, sae, SAE_HOOK, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    print(f"spliced into the model on {int(result['tokens'])} unseen tokens (each text's first token and special "
          f"tokens left as they were): CE loss {result['ce_loss_clean']:.3f} clean, {result['ce_loss_spliced']:.3f} "
          f"with the SAE, {result['ce_loss_zero']:.3f} zero-ablated -> CE loss recovered "
          f"{result['ce_loss_recovered']:.2f}; L0 {result['l0']:.1f}")
    print(f"FVU {result['fvu']:.3f} without each text's first token and special tokens "
          f"({result['fvu_all_tokens']:.3f} with them: the first token's residual norm is over 100x the others', "
          "so it holds most of the variance and hides the error on every other token)")
    print(f"SAELens files: {run}/saelens (cfg.json, sae_weights.safetensors)")
    print(f"see the features (top contexts, densities, projector): tensorboard --logdir {logs}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=int, default=None, help="texts to use (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    main(a.out, a.limit, a.batch_size)
