"""Analysis of stored activations: summaries, and later SAE features and causal graphs."""

from lightning_llm_inst.analysis.summary import summarize_store

__all__ = ["summarize_store"]
