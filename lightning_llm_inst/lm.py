"""Ready-made Lightning pieces for capture runs: a causal LM module and a text DataModule.

Stage: what ``configs/*.yaml`` and the demo plug into ``Trainer.predict`` /
``Trainer.validate`` so that :class:`ActivationCapture` has something to hook. The model is any
causal LM that loads offline (:func:`~lightning_llm_inst.models.load_causal_lm`: SmolLM2, a
local directory, a GGUF file, a cached Hugging Face id, or a named random-init model); the data
is the shipped corpus, a JSONL / text file or a Hugging Face ``datasets`` dataset, tokenized into
dict batches that carry ``input_ids``, ``attention_mask`` and a ``sequence_id`` per row: padded,
one text per row, or packed into full rows with no padding.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CausalLM", "TextDataModule", "load_texts"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TEXT_SOURCES = ("a .jsonl file (one JSON object per line), a text file (blank-line separated paragraphs), "
                 "a directory written by datasets' save_to_disk, a directory of data files, or the name of a "
                 "Hugging Face dataset already in the local datasets cache")
_DATASETS_HINT = "reading Hugging Face datasets needs the `datasets` package: pip install datasets"


# ---------------------------------------------------------------- texts

def _read_jsonl(path: Path, text_field: str, limit: int | None) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(texts) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"texts_path {str(path)!r} line {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"texts_path {str(path)!r} line {lineno}: no string field text_field={text_field!r} "
                                 f"(the line holds: {fields})")
            texts.append(record[text_field])
    return texts


@contextlib.contextmanager
def _hf_offline() -> Iterator[Any]:
    """``datasets`` with every Hub request refused (the ``HF_HUB_OFFLINE=1`` behaviour), for this call only."""
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(_DATASETS_HINT, name="datasets") from exc
    from huggingface_hub import constants

    # datasets reads its own copy of the flag (HF_DATASETS_OFFLINE before 2.19), huggingface_hub its
    flags = [(m, n) for m, n in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                                 (constants, "HF_HUB_OFFLINE")) if hasattr(m, n)]
    saved = [getattr(m, n) for m, n in flags]
    for m, n in flags:
        setattr(m, n, True)
    try:
        yield datasets
    finally:
        for (m, n), value in zip(flags, saved):
            setattr(m, n, value)


def _read_dataset(source: str, text_field: str, split: str, dataset_config: str | None,
                  limit: int | None) -> list[str]:
    path = Path(source).expanduser()
    saved = path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())
    with _hf_offline() as datasets:
        try:
            if saved:
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path) if path.is_dir() else source, dataset_config, split=split)
        except ConnectionError as exc:  # offline and not in the cache
            raise ValueError(f"texts_path={source!r} was not found locally: it is not a file or directory, and not a "
                             f"dataset in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
                             f"nothing is downloaded. Accepted: {_TEXT_SOURCES}") from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"texts_path={source!r} (split={split!r}, dataset_config={dataset_config!r}): "
                             f"{' '.join(str(exc).split())}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"texts_path={source!r}: no split={split!r}; it has: {', '.join(ds)}")
            ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"texts_path={source!r}: no column text_field={text_field!r}; "
                         f"columns: {', '.join(ds.column_names)}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    texts = list(ds[text_field])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts_path={source!r}: column {text_field!r} must hold strings; row {bad} holds "
                         f"{type(texts[bad]).__name__}")
    return texts


def load_texts(path: str | None = None, limit: int | None = None, text_field: str = "text", split: str = "train",
               dataset_config: str | None = None) -> list[str]:
    """The texts of a source, in order (the first ``limit`` only, when given).

    ``path``: ``None`` (the corpus shipped in ``examples/data``), a ``.jsonl`` file (field
    ``text_field`` of each line), any other file (plain text: one text per blank-line separated
    paragraph), a directory written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` gives
    ``split``), a directory of data files, or the name of a Hugging Face dataset in the local
    ``datasets`` cache (``load_dataset(path, dataset_config, split=split)`` offline: nothing is
    downloaded). Datasets need the optional ``datasets`` package.
    """
    if path is None:
        from lightning_llm_inst.models import corpus_texts

        return corpus_texts(limit)
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            return _read_jsonl(p, text_field, limit)
        texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        return texts[:limit] if limit is not None else texts
    if p.is_dir() or not _looks_like_a_path(path):
        return _read_dataset(path, text_field, split, dataset_config, limit)
    raise FileNotFoundError(f"texts_path {path!r} does not exist; accepted: {_TEXT_SOURCES}")


def _looks_like_a_path(source: str) -> bool:
    """True for what can only be a file path (so a missing one is a clear error, not a dataset lookup)."""
    from lightning_llm_inst.models import is_hub_id

    return not is_hub_id(source) or source.endswith((".jsonl", ".json", ".txt", ".md", ".csv", ".parquet"))


# ---------------------------------------------------------------- model

class CausalLM(L.LightningModule):
    """A frozen causal LM whose predict / validate / test steps run the forward pass (or
    ``generate``) so a capture callback can record it.

    Args:
        model: ``"smollm2"`` (the offline SmolLM2-135M-Instruct), ``"random:<arch>"`` (a tiny
            random-init model with the byte tokenizer; arch: llama, mistral, qwen2, gemma, gpt2,
            gpt_neox), a local directory written by ``save_pretrained``, a path to a ``.gguf`` file,
            or a Hugging Face model id already in the local cache. Nothing is downloaded; any other
            value is a ``ValueError`` that lists these forms. ``"tiny-<arch>"`` is a deprecated
            alias of ``"random:<arch>"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        tokenizer: ``None`` (the model's own; a directory or GGUF file without one gives ``None``),
            or ``"bytes"``, ``"smollm2"``, a directory, a ``.gguf`` file or a cached id.
        max_new_tokens: if > 0, predict runs ``generate`` (greedy, KV cache) for that many tokens.
    """

    def __init__(self, model: str = "smollm2", dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 tokenizer: str | None = None, max_new_tokens: int = 0) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.save_hyperparameters()
        from lightning_llm_inst.models import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model, _DTYPES[dtype], tokenizer=tokenizer)
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


# ---------------------------------------------------------------- data

class _Encoded(Dataset):
    """One text per item: ``(sequence_id, token ids)``, the id being the text's index in the source."""

    def __init__(self, items: list[tuple[int, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return self.items[i]


class _Packed(Dataset):
    """Packed rows: item ``i`` is ``(i, ids)``, a full row of the concatenated token stream."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # [rows, max_length]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return i, self.rows[i].tolist()


class TextDataModule(L.LightningDataModule):
    """Texts tokenized into dict batches (``input_ids``, ``attention_mask``, ``sequence_id``), the
    same for predict, validate and test.

    Without packing each row is one text, cut to ``max_length`` and padded to the longest row of
    its batch; ``sequence_id`` is the text's index in the source. With ``pack=True`` the texts
    are tokenized whole, each followed by the tokenizer's EOS token (when it has one and the text
    does not already end with it), concatenated in order and cut into rows of exactly
    ``max_length`` tokens: no padding, ``attention_mask`` all ones, and a final partial row is
    dropped. A packed row's ``sequence_id`` is the row's index; the model sees the row as one
    sequence (positions 0 .. max_length - 1, attention across the texts in it, as in pretraining),
    so a captured token's ``position`` is its offset in the row. :meth:`text_index` maps
    ``(sequence_id, position)`` back to the source text and the token's offset in it.

    Args:
        texts_path: ``None`` (the shipped corpus), a ``.jsonl`` file, a text file (blank-line
            separated paragraphs), a directory written by ``datasets``' ``save_to_disk``, a
            directory of data files, or a Hugging Face dataset name in the local cache (offline).
        tokenizer: ``"model"`` (the ``tokenizer`` attribute of the LightningModule this runs with,
            e.g. :class:`CausalLM`'s own), ``"bytes"`` (UTF-8 bytes as ids, for random-init
            models), ``"smollm2"``, a local directory, a ``.gguf`` file or a cached Hugging Face id.
        max_length: tokens per row (longer texts are cut when not packing).
        batch_size: rows per batch.
        limit: use only the first ``limit`` texts.
        padding_side: ``"right"`` or ``"left"`` (``"left"`` for generation); unused when packing.
        pack: concatenate the texts into full rows of ``max_length`` (no padding).
        text_field: the field of a ``.jsonl`` line or the dataset column that holds the text.
        split: the dataset split (Hugging Face datasets only).
        dataset_config: the dataset configuration name (``load_dataset``'s ``name``), if it has several.
    """

    def __init__(self, texts_path: str | None = None, tokenizer: str = "model", max_length: int = 128,
                 batch_size: int = 8, limit: int | None = None, padding_side: Literal["right", "left"] = "right",
                 pack: bool = False, text_field: str = "text", split: str = "train",
                 dataset_config: str | None = None) -> None:
        super().__init__()
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is not valid; choose one of: right, left")
        for name, value, low in (("max_length", max_length, 2 if pack else 1), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be 'model', 'bytes', 'smollm2' or a tokenizer path or id, "
                             f"got {tokenizer!r}")
        if texts_path is not None and not Path(texts_path).expanduser().exists() and _looks_like_a_path(texts_path):
            raise ValueError(f"texts_path={texts_path!r} does not exist; accepted: {_TEXT_SOURCES}")
        self.texts_path, self.tokenizer_name = texts_path, tokenizer
        self.max_length, self.batch_size, self.limit, self.padding_side = max_length, batch_size, limit, padding_side
        self.pack, self.text_field, self.split, self.dataset_config = pack, text_field, split, dataset_config
        self.tokenizer: Any = None
        self.pad_id = 0
        self._data: _Encoded | _Packed | None = None
        self._text_starts: torch.Tensor | None = None  # packed: offset of each text in the token stream

    def _resolve_tokenizer(self) -> Any:
        if self.tokenizer_name != "model":
            from lightning_llm_inst.models import load_tokenizer

            return load_tokenizer(self.tokenizer_name)
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        tok = getattr(module, "tokenizer", None)
        if tok is None:
            what = "no LightningModule is attached" if module is None else f"{type(module).__name__} has no tokenizer"
            raise ValueError(f"TextDataModule(tokenizer='model') takes the tokenizer of the LightningModule it runs "
                             f"with, but {what}; set tokenizer to 'bytes', 'smollm2', a model directory, a .gguf file "
                             f"or a cached Hugging Face id")
        return tok

    def setup(self, stage: str) -> None:
        if self._data is not None:
            return
        texts = load_texts(self.texts_path, self.limit, self.text_field, self.split, self.dataset_config)
        if not texts:
            raise ValueError(f"texts_path={self.texts_path!r} holds no texts")
        tok = self.tokenizer = self._resolve_tokenizer()
        ids = [list(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]  # one batched call
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
        if self.pack:
            self._data = self._packed(ids, getattr(tok, "eos_token_id", None))
        else:
            self._data = _Encoded([(i, x[: self.max_length]) for i, x in enumerate(ids) if x])

    def _packed(self, ids: list[list[int]], eos: int | None) -> _Packed:
        pieces = [x + [eos] if eos is not None and (not x or x[-1] != eos) else x for x in ids]
        lengths = torch.tensor([len(x) for x in pieces], dtype=torch.long)
        self._text_starts = torch.cumsum(lengths, 0) - lengths
        stream = torch.tensor([t for x in pieces for t in x], dtype=torch.long)
        rows = stream.numel() // self.max_length
        if rows == 0:
            raise ValueError(f"pack=True: the texts give {stream.numel()} tokens, fewer than one row of "
                             f"max_length={self.max_length}")
        dropped = stream.numel() - rows * self.max_length
        if dropped:
            logger.info("pack=True: %d texts -> %d rows of %d tokens; the last %d tokens do not fill a row and "
                        "are dropped", len(ids), rows, self.max_length, dropped)
        return _Packed(stream[: rows * self.max_length].view(rows, self.max_length))

    def text_index(self, sequence_id: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text, offset)`` of tokens given by their ``sequence_id`` and ``position`` (as a capture
        stores them): the index of the source text and the token's offset in that text's tokens.

        Without packing that is ``(sequence_id, position)``; packed, the row and position give the
        offset in the token stream, which falls in one text (an EOS separator belongs to the text
        it ends). Call after ``setup``.
        """
        sequence_id, position = torch.as_tensor(sequence_id).long(), torch.as_tensor(position).long()
        if not self.pack:
            return sequence_id, position
        if self._text_starts is None:
            raise RuntimeError("text_index needs the packed data: call setup() first")
        offset = sequence_id * self.max_length + position
        text = torch.searchsorted(self._text_starts, offset, right=True) - 1
        return text, offset - self._text_starts[text]

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
        if self._data is None:
            raise RuntimeError("TextDataModule: call setup() first (the Trainer does)")
        return DataLoader(self._data, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
