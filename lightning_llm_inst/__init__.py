"""lightning-llm-inst: capture transformer activations to compressed HDF5 stores, fast, and
train sparse autoencoders on them.

The public API lives here; names are imported on first use so that light tools (the CLI,
a store reader) do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_llm_inst._version import __version__

_EXPORTS = {
    "ActivationCapture": "lightning_llm_inst.capture.callback",
    "ActivationSink": "lightning_llm_inst.capture.sink",
    "CountingSink": "lightning_llm_inst.capture.sink",
    "HookGranularity": "lightning_llm_inst.config",
    "InstrumentationConfig": "lightning_llm_inst.config",
    "InstrumentationFramework": "lightning_llm_inst.framework",
    "CausalLM": "lightning_llm_inst.lm",
    "TextDataModule": "lightning_llm_inst.lm",
    "resolve_hook_points": "lightning_llm_inst.capture.hooks",
    "summarize_store": "lightning_llm_inst.analysis.summary",
    "ActivationStore": "lightning_llm_inst.store",
    "ChunkShuffleBatchSampler": "lightning_llm_inst.store",
    "Codec": "lightning_llm_inst.store",
    "StoreError": "lightning_llm_inst.store",
    "StoreWriteError": "lightning_llm_inst.store",
    "StoreWriter": "lightning_llm_inst.store",
    "ActivationDataModule": "lightning_llm_inst.sae",
    "SAEConfig": "lightning_llm_inst.sae",
    "SAELensExport": "lightning_llm_inst.sae",
    "SAEModule": "lightning_llm_inst.sae",
    "SparseAutoencoder": "lightning_llm_inst.sae",
    "evaluate_sae": "lightning_llm_inst.sae",
    "load_saelens": "lightning_llm_inst.sae",
    "save_saelens": "lightning_llm_inst.sae",
    "SAETensorBoard": "lightning_llm_inst.viz",
    "write_sae_views": "lightning_llm_inst.viz",
    "summarize_sae_features": "lightning_llm_inst.analysis.summary",
    "make_codec": "lightning_llm_inst.store",
    "merge_rank_manifests": "lightning_llm_inst.store",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_llm_inst' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
