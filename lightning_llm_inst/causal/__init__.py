"""Causal graphs: which heads, MLPs and SAE latents carry the information that decides an output.

``attribute(model, pairs)`` scores every node (and edge) of a graph over a live Hugging Face
causal LM by exact patching, attribution patching or EAP-IG; ``evaluate_circuit``,
``faithfulness_curve`` and ``verify`` check a graph by real interventions;
``capture_attribution`` / ``attribute_from_store`` build the same graph from an activation
store. Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CausalGraph": "lightning_llm_inst.causal.graph",
    "GraphEdges": "lightning_llm_inst.causal.graph",
    "PromptPairs": "lightning_llm_inst.causal.pairs",
    "logit_diff": "lightning_llm_inst.causal.pairs",
    "attribute": "lightning_llm_inst.causal.attribution",
    "node_outputs": "lightning_llm_inst.causal.outputs",
    "METHODS": "lightning_llm_inst.causal.attribution",
    "evaluate_circuit": "lightning_llm_inst.causal.circuits",
    "faithfulness_curve": "lightning_llm_inst.causal.circuits",
    "FaithfulnessCurve": "lightning_llm_inst.causal.circuits",
    "verify": "lightning_llm_inst.causal.verify",
    "Verification": "lightning_llm_inst.causal.verify",
    "capture_attribution": "lightning_llm_inst.causal.store",
    "attribute_from_store": "lightning_llm_inst.causal.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_llm_inst.causal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
