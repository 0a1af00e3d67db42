"""Scores as they accumulate: node and edge sums over batches, then the CausalGraph.

Stage: attribution bookkeeping. :class:`_Accumulator` holds the float64 sums of node scores
``[senders + 1 (logits), (positions)]`` and edge scores ``[senders, receivers, (positions)]``,
which SAE latents were active, and the metric sums; :func:`_to_graph` divides by the number of
pairs and builds the :class:`~lightning_llm_inst.causal.graph.CausalGraph` (SAE latents never
active are dropped). Shared by the live methods (:mod:`.gradient`, :mod:`.exact`) and the
store reader (:mod:`.store`), which is why the store's graph is the live graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.engine import Values, sae_parts
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace, Segment
from lightning_llm_inst.causal.pairs import Metric, PromptPairs
from lightning_llm_inst.causal.parts import ModelParts
from lightning_llm_inst.causal.sites import sae_hook_points

__all__ = ["METHODS", "build_space"]

METHODS = ("atp", "eap-ig", "exact")


def _check_args(model: Any, pairs: Any, method: str, ig_steps: int, batch_size: int, edges: bool,
                per_position: bool, saes: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
    if not isinstance(pairs, PromptPairs):
        raise TypeError(f"pairs: expected a PromptPairs (PromptPairs.from_text / from_jsonl), got {type(pairs).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(repr(m) for m in METHODS)}")
    if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1:
        raise ValueError(f"ig_steps: got {ig_steps!r}; allowed: an integer >= 1")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; allowed: an integer >= 1")
    if edges and method == "exact":
        raise ValueError("edges: exact edge scores need one run per edge; use method='atp' or 'eap-ig' for "
                         "edges and verify(model, pairs, graph, k, edges=True) for exact path patching of the top edges")
    if per_position and len(set(pairs.lengths)) > 1:
        raise ValueError(f"per_position: needs pairs of one token length; got lengths {sorted(set(pairs.lengths))}")
    if saes is not None and not isinstance(saes, Mapping):
        raise TypeError(f"saes: expected a mapping {{hook name: SparseAutoencoder}}, got {type(saes).__name__}")


def build_space(model: torch.nn.Module, nodes: Sequence[str], saes: Mapping[str, Any] | None) -> NodeSpace:
    parts = ModelParts(model)
    points = sae_hook_points(model, list(saes or {}))
    for hook, sae in (saes or {}).items():
        if int(sae.cfg.d_in) != parts.d_model:
            raise ValueError(f"saes: the SAE at {hook!r} has d_in {sae.cfg.d_in}, the model's d_model is "
                             f"{parts.d_model}; SAE nodes need SAEs on residual-width hook points")
    return NodeSpace(parts, nodes, saes, points)


def model_name(model: Any) -> str:
    """The model's Hub id, or the last part of the directory it was loaded from, or its class."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return type(model).__name__
    return os.path.basename(os.path.normpath(name)) if os.path.isabs(name) else str(name)


def _reduce(t: Tensor, per_position: bool) -> Tensor:
    """``[rows, seq, *rest]`` -> sum over rows (and seq) -> ``[*rest]`` or ``[*rest, seq]``."""
    t = t.float().sum(dim=0)
    return t.movedim(0, -1) if per_position else t.sum(dim=0)


class _Accumulator:
    """Node scores ``[senders (+1 logits), (seq)]`` and edge scores ``[senders, receivers, (seq)]``."""

    def __init__(self, space: NodeSpace, per_position: bool, seq: int, edges: bool, device: torch.device) -> None:
        extra = (seq,) if per_position else ()
        self.space = space
        self.per_position = per_position
        self.nodes = torch.zeros(space.num_senders + 1, *extra, dtype=torch.float64, device=device)
        n_recv = len(space.receiver_names)
        self.edges = torch.zeros(space.num_senders, n_recv, *extra, dtype=torch.float64, device=device) if edges else None
        self.active = {hook: torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool, device=device)
                       for hook, sae in space.saes.items()}
        self.clean_sum = 0.0
        self.corrupt_sum = 0.0
        self.pairs = 0

    def add(self, seg: Segment, value: Tensor, offset: int = 0) -> None:
        """``value [seg.size, (seq)]`` or one row at ``offset``."""
        if value.dim() == (1 if self.per_position else 0):
            self.nodes[seg.start + offset] += value.double()
        else:
            self.nodes[seg.start:seg.start + seg.size] += value.double()


def _sae_deltas(space: NodeSpace, clean: Values, corrupt: Values, acc: _Accumulator
                ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per SAE: ``(delta f [rows, seq, d_sae], delta err [rows, seq, d], decoder rows [d_sae, d])``."""
    out = {}
    for hook, sae in space.saes.items():
        rows, encode = sae_parts(sae)
        with torch.no_grad():
            f_clean = encode(clean.sae_x[hook].detach()).float()
            f_corr = encode(corrupt.sae_x[hook]).float()
        acc.active[hook] |= (f_clean != 0).flatten(0, -2).any(dim=0) | (f_corr != 0).flatten(0, -2).any(dim=0)
        df = f_corr - f_clean  # [rows, seq, d_sae]
        dx = (corrupt.sae_x[hook].float() - clean.sae_x[hook].detach().float())
        out[hook] = (df, dx - df @ rows.float(), rows.float())
    return out


def _to_graph(acc: _Accumulator, space: NodeSpace, pairs: PromptPairs, method: str, metric: Metric,
              ig_steps: int, per_position: bool, model: torch.nn.Module) -> CausalGraph:
    n = len(pairs)
    names = space.sender_names() + ["logits"]
    layers = space.draw_layers() + [float(space.parts.n_layers)]
    keep = torch.ones(len(names), dtype=torch.bool)
    for seg in space.segments:
        if seg.kind == "sae":
            keep[seg.start:seg.start + seg.size] = acc.active[seg.hook].cpu()
    scores = (acc.nodes / n).float().cpu()
    kept = keep.nonzero()[:, 0]
    metadata: dict[str, Any] = {
        "method": method, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
        "ig_steps": ig_steps if method == "eap-ig" else None, "n_pairs": n, "per_position": per_position,
        "clean_metric": acc.clean_sum / n, "corrupt_metric": acc.corrupt_sum / n,
        "model": model_name(model),
        "model_class": type(model).__name__, **space.describe(), "pairs": pairs.to_dict()}
    graph_kwargs: dict[str, Any] = {}
    if acc.edges is not None:
        writes = torch.tensor(space.sender_writes())
        reads = torch.tensor(space.receiver_reads)
        valid = (writes[:, None] < reads[None, :]) & keep[:-1, None]
        src, dst = valid.nonzero(as_tuple=True)
        edge_scores = (acc.edges[src.to(acc.edges.device), dst.to(acc.edges.device)] / n).float().cpu()
        new_index = torch.full((len(names),), -1, dtype=torch.long)
        new_index[kept] = torch.arange(len(kept))
        graph_kwargs = {"receivers": list(space.receiver_names),
                        "edge_index": torch.stack([new_index[src], dst]), "edge_scores": edge_scores}
    return CausalGraph([names[i] for i in kept.tolist()], scores[kept], layers=[layers[i] for i in kept.tolist()],
                       metadata=metadata, **graph_kwargs)
