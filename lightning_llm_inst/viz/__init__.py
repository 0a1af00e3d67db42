"""Views of captured activations and SAEs: TensorBoard summaries, projector and figures.

Names are imported on first use (the TensorBoard views import Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SAETensorBoard": "lightning_llm_inst.viz.tensorboard",
    "write_sae_views": "lightning_llm_inst.viz.tensorboard",
    "write_graph_views": "lightning_llm_inst.viz.causal_views",
}

__all__ = ["SAETensorBoard", "write_graph_views", "write_sae_views"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_llm_inst.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
