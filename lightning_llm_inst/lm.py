"""Ready-made Lightning pieces for capture runs: a causal LM module and a text DataModule.

Stage: what ``configs/*.yaml`` and the demo plug into ``Trainer.predict`` /
``Trainer.validate`` so that :class:`ActivationCapture` has something to hook. The model is
the offline SmolLM2 checkpoint or a tiny random-init architecture; the data is the shipped
corpus (or any JSONL / text file), tokenized with padding into dict batches that carry
``input_ids``, ``attention_mask`` and a ``sequence_id`` per text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CausalLM", "TextDataModule", "load_texts"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_texts(path: str | None = None, limit: int | None = None) -> list[str]:
    """Texts from a ``.jsonl`` file (field ``text``) or a plain file (one text per blank-line
    separated paragraph); ``None`` reads the corpus shipped in ``examples/data``."""
    if path is None:
        from lightning_llm_inst.models import corpus_texts

        return corpus_texts(limit)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"texts_path {path!r} does not exist")
    if p.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return texts[:limit] if limit else texts


def _load(model: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from lightning_llm_inst import models

    if model == "smollm2":
        return models.load_smollm2(dtype=dtype)
    net = models.tiny_model(model.removeprefix("tiny-"), dtype=dtype)
    return net, None


class CausalLM(L.LightningModule):
    """A frozen causal LM whose predict / validate / test steps run the forward pass (or
    ``generate``) so a capture callback can record it.

    Args:
        model: ``"smollm2"`` (the offline SmolLM2-135M-Instruct) or ``"tiny-<arch>"`` (a
            random-init model: llama, mistral, qwen2, gemma, gpt2, gpt_neox).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_new_tokens: if > 0, predict runs ``generate`` (greedy, KV cache) for that many tokens.
    """

    def __init__(self, model: str = "smollm2", dtype: str = "float32", max_new_tokens: int = 0) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
        self.save_hyperparameters()
        self.model, self.tokenizer = _load(model, _DTYPES[dtype])
        self.model.requires_grad_(False)
        self.max_new_tokens = max_new_tokens

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        if self.max_new_tokens > 0:
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            return self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return self._forward(batch).argmax(-1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._forward(batch)
        loss = _lm_loss(logits, batch)
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._forward(batch)
        self.log("test_loss", _lm_loss(logits, batch), batch_size=batch["input_ids"].shape[0])


def _lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100)


class _Encoded(Dataset):
    def __init__(self, ids: list[list[int]]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return i, self.ids[i]


class TextDataModule(L.LightningDataModule):
    """Texts tokenized into padded dict batches (``input_ids``, ``attention_mask``,
    ``sequence_id``), the same for predict, validate and test.

    Args:
        texts_path: ``.jsonl`` (field ``text``) or plain text; ``None``: the shipped corpus.
        tokenizer: ``"smollm2"`` or ``"bytes"`` (UTF-8 bytes as ids, for tiny models).
        max_length: tokens per text (longer texts are cut).
        batch_size: texts per batch.
        limit: use only the first ``limit`` texts.
        padding_side: ``"right"`` or ``"left"`` (``"left"`` for generation).
    """

    def __init__(self, texts_path: str | None = None, tokenizer: str = "smollm2", max_length: int = 128,
                 batch_size: int = 8, limit: int | None = None, padding_side: str = "right") -> None:
        super().__init__()
        if tokenizer not in ("smollm2", "bytes"):
            raise ValueError(f"tokenizer={tokenizer!r} is not valid; choose one of: smollm2, bytes")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is not valid; choose one of: right, left")
        self.texts_path, self.tokenizer_name = texts_path, tokenizer
        self.max_length, self.batch_size, self.limit, self.padding_side = max_length, batch_size, limit, padding_side
        self.pad_id = 0
        self._data: _Encoded | None = None

    def setup(self, stage: str) -> None:
        if self._data is not None:
            return
        texts = load_texts(self.texts_path, self.limit)
        if self.tokenizer_name == "smollm2":
            from lightning_llm_inst.models import load_smollm2_tokenizer

            tok = load_smollm2_tokenizer()
            ids = [tok(t, add_special_tokens=True)["input_ids"][: self.max_length] for t in texts]
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        else:
            ids = [list(t.encode("utf-8"))[: self.max_length] for t in texts]
        self._data = _Encoded(ids)

    def _collate(self, items: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for _, ids in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            sl = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, sl] = torch.tensor(ids, dtype=torch.long)
            mask[row, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "sequence_id": torch.tensor([i for i, _ in items], dtype=torch.long)}

    def _loader(self) -> DataLoader:
        assert self._data is not None, "setup() first"
        return DataLoader(self._data, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
