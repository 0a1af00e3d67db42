"""Sparse autoencoders over activation stores: the model, its training, metrics and SAELens export.

Stage: analysis. ``ActivationDataModule`` feeds rows of a store to ``SAEModule``, which trains a
``SparseAutoencoder``; ``evaluate_sae`` splices it into the model, ``save_saelens`` exports it.
Names are imported on first use, so importing the model does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SAEConfig": "lightning_llm_inst.sae.model",
    "SAEOutput": "lightning_llm_inst.sae.model",
    "SparseAutoencoder": "lightning_llm_inst.sae.model",
    "SAEFileError": "lightning_llm_inst.sae.saelens",
    "load_saelens": "lightning_llm_inst.sae.saelens",
    "save_saelens": "lightning_llm_inst.sae.saelens",
    "ActivationDataModule": "lightning_llm_inst.sae.data",
    "SAEModule": "lightning_llm_inst.sae.module",
    "SAELensExport": "lightning_llm_inst.sae.module",
    "evaluate_sae": "lightning_llm_inst.sae.evaluate",
    "DeadLatentFraction": "lightning_llm_inst.sae.metrics",
    "FeatureDensity": "lightning_llm_inst.sae.metrics",
    "FractionOfVarianceUnexplained": "lightning_llm_inst.sae.metrics",
    "L0": "lightning_llm_inst.sae.metrics",
    "ReconstructionMSE": "lightning_llm_inst.sae.metrics",
    "dead_latent_fraction": "lightning_llm_inst.sae.metrics",
    "feature_density": "lightning_llm_inst.sae.metrics",
    "fraction_of_variance_unexplained": "lightning_llm_inst.sae.metrics",
    "l0": "lightning_llm_inst.sae.metrics",
    "reconstruction_mse": "lightning_llm_inst.sae.metrics",
}

__all__ = [
    "L0",
    "ActivationDataModule",
    "DeadLatentFraction",
    "FeatureDensity",
    "FractionOfVarianceUnexplained",
    "ReconstructionMSE",
    "SAEConfig",
    "SAEFileError",
    "SAELensExport",
    "SAEModule",
    "SAEOutput",
    "SparseAutoencoder",
    "dead_latent_fraction",
    "evaluate_sae",
    "feature_density",
    "fraction_of_variance_unexplained",
    "l0",
    "load_saelens",
    "reconstruction_mse",
    "save_saelens",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_llm_inst.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
