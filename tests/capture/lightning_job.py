"""A Lightning predict run with ActivationCapture, used by the callback tests as a script
(DDP re-launches the script for its other ranks)."""

from __future__ import annotations

import argparse
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_llm_inst.capture.callback import ActivationCapture


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def samples(n: int, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - (i % 4) :] = 0  # right padding of 0..3 tokens
        out.append({"input_ids": torch.randint(0, 256, (seq,), generator=g), "attention_mask": mask,
                    "sequence_id": torch.tensor(i)})
    return out


class LM(L.LightningModule):
    def __init__(self, fail_at: int = -1) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.fail_at = fail_at

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            # fail in the middle of a forward: after layer 0 ran, before layer 1 does
            def boom(*_):
                raise RuntimeError("predict_step failed on purpose")

            self.model.model.layers[1].register_forward_pre_hook(boom)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--samples", type=int, default=11)
    p.add_argument("--fail-at", type=int, default=-1)
    a = p.parse_args()
    cap = ActivationCapture(a.out, granularity="residual")
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy="ddp" if a.devices > 1 else "auto",
                        callbacks=[cap], logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(LM(a.fail_at), DataLoader(samples(a.samples), batch_size=2), return_predictions=False)
    print("stats", trainer.global_rank, cap.stats()["rows"], flush=True)


if __name__ == "__main__":
    sys.exit(main())
