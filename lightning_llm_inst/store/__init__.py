"""The activation store: compressed, crash-safe, standard HDF5 shards and their manifest.

``StoreWriter`` writes, ``ActivationStore`` reads; the format is in ``format.py`` and
``docs/store-format.md``.
"""

from lightning_llm_inst.store.codecs import Codec, make_codec
from lightning_llm_inst.store.format import StoreError, StoreLockedError, StoreWriteError
from lightning_llm_inst.store.merge import merge_rank_manifests
from lightning_llm_inst.store.reader import ActivationStore, ChunkShuffleBatchSampler, ColumnInfo, ColumnView, VerifyReport
from lightning_llm_inst.store.writer import StoreWriter

__all__ = [
    "ActivationStore",
    "ChunkShuffleBatchSampler",
    "Codec",
    "ColumnInfo",
    "ColumnView",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "StoreWriter",
    "VerifyReport",
    "make_codec",
    "merge_rank_manifests",
]
