"""Verification: a graph's strongest nodes patched exactly, its strongest edges path-patched.

Stage: analysis, after attribution. :func:`verify` takes the top ``k`` nodes by |score| and
measures each one's true effect with the exact method's batched patching, or the top ``k``
edges and measures each by path patching: a clean run in which only the receiver reads the
sender's corrupt output (the residual it reads gets ``a_corrupt,u - a_clean,u`` added; for a
head's q, k or v read, that head's projection is recomputed from the shifted read), and sets
the truth beside the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.circuits import _space_for
from lightning_llm_inst.causal.engine import Values, metric_sums, record, repeat_block_outputs, training_off
from lightning_llm_inst.causal.exact import _exact_batch
from lightning_llm_inst.causal.gradient import _senders
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import Metric, PromptPairs, resolve_metric
from lightning_llm_inst.causal.scores import _Accumulator
from lightning_llm_inst.causal.sites import Site, SiteFn, hooked, run_model, skipped_blocks

__all__ = ["Verification", "verify"]


@dataclass
class Verification:
    """The graph's estimate of each of its strongest nodes (or edges) beside the exact value."""

    names: list[str]
    estimates: list[float]
    exact: list[float]
    level: str = "nodes"

    @property
    def pearson(self) -> float:
        if len(self.names) < 2:
            return float("nan")
        return float(torch.corrcoef(torch.tensor([self.estimates, self.exact], dtype=torch.float64))[0, 1])

    @property
    def sign_agreement(self) -> float:
        same = [(e > 0) == (x > 0) for e, x in zip(self.estimates, self.exact)]
        return sum(same) / len(same) if same else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "names": self.names, "estimates": self.estimates, "exact": self.exact,
                "pearson": self.pearson, "sign_agreement": self.sign_agreement}

    def table(self) -> str:
        width = max([len(n) for n in self.names] + [4])
        lines = [f"{'node' if self.level == 'nodes' else 'edge':<{width}}  {'estimate':>10}  {'exact':>10}",
                 f"{'-' * width}  {'-' * 10}  {'-' * 10}"]
        lines += [f"{n:<{width}}  {e:>10.4f}  {x:>10.4f}" for n, e, x in zip(self.names, self.estimates, self.exact)]
        lines.append(f"pearson {self.pearson:.3f}   sign agreement {self.sign_agreement:.2f}")
        return "\n".join(lines)


def verify(model: torch.nn.Module, pairs: PromptPairs, graph: CausalGraph, k: int = 10, *, edges: bool = False,
           saes: Mapping[str, Any] | None = None, metric: Metric = "logit_diff", batch_size: int = 8) -> Verification:
    """Exact patching of ``graph``'s top ``k`` nodes by |score| (or path patching of its top ``k``
    edges: the receiver alone reads the sender's corrupt output), beside the graph's estimates."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: got {k!r}; allowed: an integer >= 1")
    nodes = tuple(graph.metadata.get("nodes", ("heads", "mlp")))
    space = _space_for(model, pairs, nodes, saes)
    metric_fn = resolve_metric(metric)
    if edges:
        if not len(graph.edges):
            raise ValueError("edges: the graph has no edges (attribute(..., edges=True))")
        top = graph.top(k, kind="edges")
        exact = _path_patch(model, space, pairs, [n for n, _ in top], metric_fn, batch_size)
        return Verification([n for n, _ in top], [s for _, s in top], exact, "edges")
    top = graph.top(k)
    index = {name: i for i, name in enumerate(space.sender_names())}
    missing = [n for n, _ in top if n not in index]
    if missing:
        raise ValueError(f"graph: node(s) {missing[:5]} are not nodes of this model"
                         + (" (pass the SAEs with saes=)" if any(m.startswith("sae.") for m in missing) else ""))
    only = {index[n] for n, _ in top}
    acc = _Accumulator(space, False, max(pairs.lengths), False, space.parts.device)
    with training_off(model):
        for i, batch in enumerate(pairs.batches(batch_size)):
            _exact_batch(acc, space, batch.to(space.parts.device), metric_fn, i == 0, 4096, None, only=only)
    exact = (acc.nodes / len(pairs)).tolist()
    return Verification([n for n, _ in top], [s for _, s in top], [float(exact[index[n]]) for n, _ in top])


def _path_patch(model: torch.nn.Module, space: NodeSpace, pairs: PromptPairs, edges: list[str], metric: Any,
                batch_size: int) -> list[float]:
    """Exact effect of each edge: M(clean, only the receiver reading the sender's corrupt output) - M(clean)."""
    if space.saes:
        raise ValueError("edges: path patching supports input, head and MLP senders; verify edges with saes=None")
    parts = space.parts
    index = {name: i for i, name in enumerate(space.sender_names())}
    parsed = []
    for edge in edges:
        u, _, v = edge.partition("->")
        parsed.append((index[u], v))
    totals = [0.0] * len(edges)
    with training_off(model), parts.ungrouped(), torch.no_grad():
        for batch in pairs.batches(batch_size):
            batch = batch.to(parts.device)
            corrupt = record(space, batch.corrupt)
            clean = record(space, batch.clean, reads=True, blocks=True)
            m_clean = float(metric_sums(clean.logits, batch, metric)[0])
            deltas, _ = _senders(space, clean, corrupt, {})  # [senders, rows, seq, d], in sender order
            for c, (u, v) in enumerate(parsed):
                fns = _single_edge_fns(space, clean, deltas[u], v)
                layer = _receiver_layer(v, parts.n_layers)
                skip = repeat_block_outputs({i: clean.blocks[i] for i in range(layer)}, 1)
                with skipped_blocks(parts, skip), hooked(parts, fns, space.sae_points):
                    logits = run_model(parts, batch.clean)
                totals[c] += float(metric_sums(logits, batch, metric)[0]) - m_clean
    return [t / len(pairs) for t in totals]


def _receiver_layer(v: str, n_layers: int) -> int:
    if v == "logits":
        return n_layers
    return int(v[1:].split(".")[0].split("<")[0])


def _single_edge_fns(space: NodeSpace, clean: Values, delta: Tensor, v: str) -> dict[Site, SiteFn]:
    parts = space.parts
    if v == "logits":
        return {("final",): lambda x: (x.float() + delta).to(x.dtype)}
    if not v.startswith("a"):
        layer = int(v[1:])
        return {("mid", layer): lambda x: (x.float() + delta).to(x.dtype)}
    head_part, kind = v[:-3], v[-2]
    layer, head = (int(s) for s in head_part[1:].split(".h"))

    def fn(out: Tensor) -> Tensor:
        x = clean.resid[layer].float() + delta  # [rows, seq, d]
        h_in = parts.blocks[layer].ln_attn.forward(x.to(out.dtype)).float()
        w, b = parts.w_in(layer, kind)
        new = h_in @ w[head].float().T + (b[head].float() if b is not None else 0.0)
        out = out.clone()
        out[:, :, head] = new.to(out.dtype)
        return out
    return {(kind, layer): fn}
