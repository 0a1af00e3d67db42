"""SAE training data: one hook point of an activation store as shuffled, resumable batches.

Stage: between the activation store and :class:`~lightning_llm_inst.sae.module.SAEModule`.
:class:`ActivationDataModule` splits a store's rows into training and validation chunk blocks
(whole chunks, so a read decodes each chunk once), deals the training blocks to DDP ranks,
shuffles them at chunk granularity each epoch and reads one whole batch per DataLoader task in
worker processes, handing ``[batch, d_in]`` float tensors (pinned when a GPU is present) to the
training step. By default it leaves out the first token of each sequence and special tokens
(:mod:`lightning_llm_inst.sae.rows` says why and how), filtering the row ids of each batch and
cutting full batches again. Its ``state_dict`` records the epoch and the batches consumed, so a
resumed fit neither repeats nor skips rows.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_llm_inst.sae.rows import RowScan, as_id_list, describe, excluded_between, model_hub_name, scan_rows
from lightning_llm_inst.store import ActivationStore, ChunkShuffleBatchSampler, StoreError

__all__ = ["ActivationDataModule", "BatchDType", "StoreBatchSampler"]

log = logging.getLogger(__name__)

_MIN_BLOCKS = 16  # stores with fewer chunks are read in smaller blocks
BatchDType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(_DTYPES) == get_args(BatchDType)


def _in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Bool mask: which of ``ids`` are in ``sorted_ids`` (one binary search each)."""
    if not sorted_ids.size:
        return np.zeros(ids.shape, dtype=bool)
    where = np.searchsorted(sorted_ids, ids)
    return sorted_ids[np.minimum(where, sorted_ids.size - 1)] == ids


class StoreBatchSampler(DistributedSampler):
    """Row-id batches of one rank, for a ``DataLoader`` with ``batch_size=None``.

    Wraps :class:`~lightning_llm_inst.store.ChunkShuffleBatchSampler` (blocks dealt to ranks
    round-robin, chunk-granular shuffling, every row of the rank once per epoch). With
    ``even_batches`` every rank yields the same number of batches (the smallest over ranks), which
    DDP training needs. :meth:`resume` skips the batches an interrupted epoch already consumed.
    It is a ``DistributedSampler`` so that Lightning uses it as it is instead of wrapping it.

    ``excluded`` (sorted row ids) are taken out of every batch, and the rest is cut into full
    batches again, so only the epoch's last batch can be short.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 16, rank: int = 0, world_size: int = 1, even_batches: bool = True,
                 excluded: np.ndarray | None = None) -> None:
        self.blocks = [(int(a), int(b)) for a, b in blocks]
        self.num_replicas, self.rank = world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, False
        self.batch_size = batch_size
        self.epoch = 0
        self.excluded = excluded if excluded is not None and excluded.size else None
        self._inner = ChunkShuffleBatchSampler(self.blocks, batch_size, shuffle=shuffle, seed=seed,
                                               buffer_chunks=buffer_chunks, rank=rank, world_size=world_size)
        excl = self.excluded if self.excluded is not None else np.empty(0, dtype=np.int64)
        kept = [b - a - excluded_between(excl, a, b).size for a, b in self.blocks]
        per_rank = [sum(kept[r::world_size]) for r in range(world_size)]  # the inner sampler deals blocks so
        lengths = [-(-n // batch_size) for n in (per_rank if even_batches else [per_rank[rank]])]
        self.num_batches = min(lengths)
        self.num_samples = per_rank[rank]
        self.total_size = sum(kept)
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._inner.set_epoch(epoch)

    def resume(self, epoch: int, batches_consumed: int) -> None:
        """Start at ``epoch`` and skip its first ``batches_consumed`` batches (once)."""
        self.set_epoch(epoch)
        self._skip = (epoch, batches_consumed)

    def __len__(self) -> int:
        return self.num_batches

    def _batches(self) -> Iterator[list[int]]:
        if self.excluded is None:
            yield from self._inner
            return
        pending = np.empty(0, dtype=np.int64)
        for batch in self._inner:
            ids = np.asarray(batch, dtype=np.int64)
            pending = np.concatenate([pending, ids[~_in_sorted(ids, self.excluded)]])
            while pending.size >= self.batch_size:
                yield pending[: self.batch_size].tolist()
                pending = pending[self.batch_size :]
        if pending.size:
            yield pending.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        skip = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        self._skip = None
        for i, batch in enumerate(self._batches()):
            if i >= self.num_batches:
                return
            if i >= skip:
                yield batch


class _StoreBatches(Dataset):
    """``dataset[row_ids]`` is one batch ``[len(row_ids), d_in]``, read with one gather."""

    def __init__(self, store: ActivationStore, hook: str, dtype: torch.dtype) -> None:
        self.store, self.hook, self.dtype = store, hook, dtype

    def __len__(self) -> int:
        return self.store.rows

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        x = self.store[self.hook][rows]  # [batch, *feature_shape], stored dtype
        return x.reshape(len(rows), -1).to(self.dtype)  # [batch, d_in]


class _ResumableLoader(DataLoader):
    """A training DataLoader whose ``state_dict`` is its datamodule's progress, so Lightning treats it
    as resumable and restores it even when it was passed to ``fit`` without the datamodule."""

    def state_dict(self) -> dict[str, Any]:
        return self._datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._datamodule.load_state_dict(state_dict)


class ActivationDataModule(L.LightningDataModule):
    """Batches of one hook point of an activation store, for training a sparse autoencoder.

    Args:
        store_path: the store directory (holds ``manifest.json``).
        hook: hook point to read, e.g. ``"blocks.3.hook_resid_post"``; ``None``: the store's only
            hook point (or its first one, with a log message, when it holds several).
        batch_size: rows (tokens) per batch.
        num_workers: DataLoader worker processes reading and decoding batches (0: in the main process).
        val_fraction: fraction of the rows held out for validation, as whole chunk blocks chosen
            at random with ``seed``; 0 means no validation set.
        val_rows: rows to hold out instead of ``val_fraction`` (rounded up to whole chunk blocks).
        seed: seed of the validation split and of the per-epoch shuffling.
        buffer_chunks: chunks whose rows are shuffled together; more mixes better, costs memory.
        pin_memory: pin batches for fast host-to-GPU copies; ``None``: when CUDA is available.
        dtype: dtype of the batches: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        exclude_bos: leave out the first token of each sequence (rows at ``position == 0``): the BOS
            token, or the attention sink of a tokenizer that adds none; its norm is many times the
            others' and it would dominate training and the metrics.
        exclude_special_tokens: leave out rows whose token is a special token.
        special_token_ids: the special token ids; ``None``: the ``bos_token_id``, ``eos_token_id`` and
            ``pad_token_id`` of the model config the store records.

    Rows with a multi-dimensional feature shape (e.g. ``[heads, d_head]``) are flattened, so
    ``d_in`` is the product of the feature shape. A store of fewer than 16 chunks is read in blocks
    of part of a chunk, so that it still splits into training, validation and DDP ranks. The split
    is made over all rows; rows left out are then skipped in each split (``train_rows`` and
    ``val_rows_held_out`` count the rows served; ``excluded_rows`` the others). A store without
    ``position`` / ``input_ids`` token columns has nothing to leave out (a warning says so).
    """

    def __init__(self, store_path: str, hook: str | None = None, batch_size: int = 4096, num_workers: int = 2,
                 val_fraction: float = 0.0, val_rows: int | None = None, seed: int = 0, buffer_chunks: int = 16,
                 pin_memory: bool | None = None, dtype: BatchDType = "float32", exclude_bos: bool = True,
                 exclude_special_tokens: bool = True, special_token_ids: list[int] | None = None) -> None:
        super().__init__()
        for name, value in (("exclude_bos", exclude_bos), ("exclude_special_tokens", exclude_special_tokens)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.special_token_ids = as_id_list(special_token_ids, "special_token_ids")
        self.exclude_bos, self.exclude_special_tokens = exclude_bos, exclude_special_tokens
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("buffer_chunks", buffer_chunks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if val_rows is not None and (isinstance(val_rows, bool) or not isinstance(val_rows, int) or val_rows < 0):
            raise ValueError(f"val_rows must be a non-negative integer or None, got {val_rows!r}")
        if val_rows is not None and val_fraction:
            raise ValueError(f"give val_fraction or val_rows, not both (got val_fraction={val_fraction!r}, "
                             f"val_rows={val_rows!r})")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
        self.store_path = os.fspath(store_path)
        self.batch_size, self.num_workers, self.buffer_chunks = batch_size, num_workers, buffer_chunks
        self.val_fraction, self.val_rows, self.seed = float(val_fraction), val_rows, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.dtype = dtype
        self._hook = hook
        self._store: ActivationStore | None = None
        self._split: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None
        self._scan: RowScan | None = None
        self._train_sampler: StoreBatchSampler | None = None
        self._epoch, self._consumed = 0, 0  # training progress: epoch and batches consumed in it
        self._resume: tuple[int, int] | None = None

    # ------------------------------------------------------------------ the store
    @property
    def store(self) -> ActivationStore:
        """The opened store (opened on first use)."""
        if self._store is None:
            try:
                self._store = ActivationStore(self.store_path)
            except StoreError as exc:
                raise StoreError(f"ActivationDataModule(store_path={self.store_path!r}): {exc}") from exc
            if not self._store.hooks:
                raise StoreError(f"ActivationDataModule(store_path={self.store_path!r}): the store holds no hook "
                                 "points yet")
        return self._store

    @property
    def hook(self) -> str:
        """The hook point read (resolved from the store when ``hook`` was ``None``)."""
        hooks = list(self.store.hooks)
        if self._hook is None:
            self._hook = hooks[0]
            if len(hooks) > 1:
                log.info("ActivationDataModule: hook=None and the store holds %d hook points; using the first, %s",
                         len(hooks), self._hook)
        elif self._hook not in self.store.hooks:
            raise ValueError(f"hook={self._hook!r} is not in the store at {self.store_path!r}; it holds: "
                             f"{', '.join(hooks)}")
        return self._hook

    @property
    def d_in(self) -> int:
        """Width of a batch row: the product of the hook point's feature shape."""
        return math.prod(self.store.hooks[self.hook].feature_shape)

    @property
    def model_name(self) -> str | None:
        """The captured model's name from the store's metadata, as a Hugging Face Hub id where known
        (the offline SmolLM2 checkpoint records a local path); ``None`` if none is recorded."""
        return model_hub_name(self.store.metadata)

    @property
    def row_scan(self) -> RowScan:
        """Which rows are left out (read from the store's token columns once)."""
        if self._scan is None:
            self._scan = scan_rows(self.store, exclude_bos=self.exclude_bos,
                                   exclude_special_tokens=self.exclude_special_tokens,
                                   special_token_ids=self.special_token_ids)
            log.info("ActivationDataModule(%s): %s", self.store_path, describe(self._scan))
        return self._scan

    @property
    def excluded_rows(self) -> int:
        """Rows of the store left out of both splits."""
        return int(self.row_scan.excluded.size)

    def provenance(self) -> dict[str, Any]:
        """Where the rows come from and which were left out, for the SAE's exported ``cfg.json``:
        ``hook_name``, ``model_name``, ``context_size``, ``prepend_bos``, ``dataset_path`` (the store's
        absolute path), ``seqpos_slice`` (``[1, None]`` when position 0 is left out, here or by the
        capture) and ``excluded_token_ids`` (here or by the capture)."""
        scan = self.row_scan
        capture = self.store.metadata.get("capture_config")
        capture = capture if isinstance(capture, dict) else {}
        dropped = [int(i) for i in capture.get("drop_token_ids") or [] if isinstance(i, int)]
        window = capture.get("position_window")
        start, stop = (1 if scan.exclude_bos or capture.get("drop_bos") else 0), None
        if isinstance(window, (list, tuple)) and len(window) == 2:  # the capture kept positions [lo, hi)
            start = max(start, window[0] if isinstance(window[0], int) else 0)
            stop = window[1] if isinstance(window[1], int) else None
        seqpos = [start or None, stop] if start or stop is not None else None
        ids = sorted(set(scan.special_token_ids) | set(dropped))
        return {"hook_name": self.hook, "model_name": self.model_name, "context_size": scan.context_size,
                "prepend_bos": scan.prepend_bos, "dataset_path": os.path.abspath(self.store_path),
                "seqpos_slice": seqpos, "excluded_token_ids": ids or None}

    def _blocks(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(training blocks, validation blocks), fixed by ``seed``."""
        if self._split is None:
            blocks = self.store.chunk_blocks(self.hook)
            if len(blocks) < _MIN_BLOCKS:  # a small store: cut its chunks so a split and ranks can be dealt
                parts = -(-_MIN_BLOCKS // max(1, len(blocks)))
                blocks = [(a + (b - a) * i // parts, a + (b - a) * (i + 1) // parts)
                          for a, b in blocks for i in range(parts) if (b - a) * (i + 1) // parts > (b - a) * i // parts]
            rows = sum(b - a for a, b in blocks)
            want = self.val_rows if self.val_rows is not None else math.ceil(self.val_fraction * rows)
            val: set[int] = set()
            if want > 0:
                held = 0
                for i in np.random.default_rng(self.seed).permutation(len(blocks)).tolist():
                    if held >= want:
                        break
                    val.add(i)
                    held += blocks[i][1] - blocks[i][0]
            train = [b for i, b in enumerate(blocks) if i not in val]
            if not train:
                raise ValueError(f"the validation split (val_fraction={self.val_fraction!r}, val_rows="
                                 f"{self.val_rows!r}) takes all {len(blocks)} chunk blocks of {self.hook!r} "
                                 f"({rows} rows); nothing is left to train on")
            self._split = (train, [b for i, b in enumerate(blocks) if i in val])
        return self._split

    def _kept(self, blocks: list[tuple[int, int]]) -> int:
        excluded = self.row_scan.excluded
        return sum(b - a - excluded_between(excluded, a, b).size for a, b in blocks)

    @property
    def train_rows(self) -> int:
        """Training rows served (without the rows left out)."""
        return self._kept(self._blocks()[0])

    @property
    def val_rows_held_out(self) -> int:
        """Validation rows served (without the rows left out)."""
        return self._kept(self._blocks()[1])

    # ------------------------------------------------------------------ Lightning hooks
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        self._blocks()  # opens the store, resolves the hook and checks the split early
        if self.row_scan.kept == 0:
            raise ValueError(f"ActivationDataModule(store_path={self.store_path!r}): every row is left out "
                             f"({describe(self.row_scan)}); set exclude_bos / exclude_special_tokens to False "
                             "or give special_token_ids")

    def _loader(self, sampler: StoreBatchSampler, cls: type[DataLoader] = DataLoader) -> DataLoader:
        dataset = _StoreBatches(self.store, self.hook, _DTYPES[self.dtype])
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if self.num_workers else {}
        return cls(dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                   pin_memory=self.pin_memory, **extra)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        sampler = StoreBatchSampler(self._blocks()[0], self.batch_size, shuffle=True, seed=self.seed,
                                    buffer_chunks=self.buffer_chunks, rank=rank, world_size=world_size,
                                    excluded=self.row_scan.excluded)
        if len(sampler) == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no training batch from {self.train_rows} rows in "
                             f"{len(self._blocks()[0])} chunk blocks; use a larger store or fewer processes")
        self._train_sampler = sampler
        self._start(*(self._resume if self._resume is not None else (self._epoch, 0)))
        loader = self._loader(sampler, _ResumableLoader)
        loader._datamodule = self
        return loader

    def _start(self, epoch: int, skip: int) -> None:
        """Point the training sampler at ``epoch`` after ``skip`` consumed batches."""
        sampler = self._train_sampler
        assert sampler is not None
        if skip >= len(sampler):  # the checkpoint was taken at the end of that epoch
            epoch, skip = epoch + 1, 0
        sampler.resume(epoch, skip)
        self._resume = None
        self._epoch, self._consumed = epoch, skip

    def val_dataloader(self) -> DataLoader:
        blocks = self._blocks()[1]
        rank, world_size = self._rank()
        if not blocks:
            return []  # type: ignore[return-value]  # Lightning skips validation
        if len(blocks) < world_size:
            raise ValueError(f"the validation set has {len(blocks)} chunk block(s), fewer than the {world_size} "
                             "processes; raise val_fraction / val_rows")
        sampler = StoreBatchSampler(blocks, self.batch_size, shuffle=False, seed=self.seed, rank=rank,
                                    world_size=world_size, even_batches=False, excluded=self.row_scan.excluded)
        return self._loader(sampler)

    def excluded_val_batches(self) -> Iterator[torch.Tensor] | None:
        """This process's validation rows that are left out, in batches ``[n, d_in]`` (blocks dealt to
        ranks as the validation loader deals them); ``None`` when no validation row is left out on any
        rank. ``SAEModule`` uses them for ``val/fvu_all_tokens``."""
        blocks = self._blocks()[1]
        excluded = self.row_scan.excluded
        per_block = [excluded_between(excluded, a, b) for a, b in blocks]
        if not any(ids.size for ids in per_block):
            return None
        rank, world_size = self._rank()
        mine = per_block[rank::world_size]
        ids = np.concatenate(mine) if mine else np.empty(0, dtype=np.int64)
        dataset = _StoreBatches(self.store, self.hook, _DTYPES[self.dtype])
        return (dataset[ids[a : a + self.batch_size].tolist()] for a in range(0, ids.size, self.batch_size))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or trainer.training:
            self.note_train_batch()
        return batch

    def note_train_batch(self) -> None:
        """Count one consumed training batch (Lightning does it through ``on_after_batch_transfer``)."""
        sampler = self._train_sampler
        if sampler is not None and sampler.epoch != self._epoch:
            self._epoch, self._consumed = sampler.epoch, 0
        self._consumed += 1

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """Training progress: the epoch and the batches of it consumed, with what fixes the order."""
        sampler = self._train_sampler
        if sampler is not None and sampler.epoch != self._epoch:  # a new epoch began, nothing consumed yet
            self._epoch, self._consumed = sampler.epoch, 0
        return {"epoch": self._epoch, "batches_consumed": self._consumed, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self._rank()[1], "hook": self._hook}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [f"{k} {state_dict[k]!r} -> {v!r}" for k, v in (("seed", self.seed), ("batch_size", self.batch_size),
                                                                    ("world_size", self._rank()[1]))
                   if k in state_dict and state_dict[k] != v]
        if changed:
            log.warning("ActivationDataModule: resuming with %s; the rest of the interrupted epoch is not the "
                        "same set of rows", ", ".join(changed))
        self._epoch, self._consumed = int(state_dict["epoch"]), int(state_dict["batches_consumed"])
        self._resume = (self._epoch, self._consumed)
        if self._train_sampler is not None:
            self._start(*self._resume)

    # ------------------------------------------------------------------ helpers
    def sample(self, rows: int, seed: int | None = None) -> torch.Tensor:
        """About ``rows`` training rows ``[n, d_in]`` (whole random chunk blocks, then trimmed), for
        initialising an SAE. The same on every rank for the same ``seed`` (default: ``self.seed``)."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        train = self._blocks()[0]
        excluded = self.row_scan.excluded
        rng = np.random.default_rng(self.seed if seed is None else seed)
        picked, total = [], 0
        for i in rng.permutation(len(train)).tolist():
            if total >= rows:
                break
            a, b = train[i]
            picked.append(train[i])
            total += b - a - excluded_between(excluded, a, b).size
        index = np.concatenate([np.arange(a, b) for a, b in sorted(picked)])
        index = index[~_in_sorted(index, excluded)]
        index = np.sort(rng.choice(index, size=rows, replace=False)) if len(index) > rows else index
        x = self.store[self.hook][index]
        return x.reshape(len(index), -1).to(_DTYPES[self.dtype])  # [n, d_in]
