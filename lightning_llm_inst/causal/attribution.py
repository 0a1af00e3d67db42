"""Attribution: the score of every node (and edge) of a causal graph, from a live model.

Stage: analysis. ``attribute(model, pairs)`` runs the corrupt prompts once to record every
node's output, then, per method:

- ``"atp"``: one forward and backward pass of the clean prompts; ``score(n) = (a_corrupt - a_clean)
  . dM/da`` at the clean run;
- ``"eap-ig"``: the same product with the gradient averaged over ``ig_steps`` runs whose input
  embeddings are ``x_corrupt + (k / steps) (x_clean - x_corrupt)``, ``k = 1 .. steps``;
- ``"exact"``: one patched run per node (all nodes of a chunk stacked into one batch; blocks
  below the lowest patched layer reuse the clean run's outputs): ``M(patched) - M(clean)``.

Edges (``atp`` / ``eap-ig``) score ``(a_corrupt,u - a_clean,u) . dM/dx_v`` for every sender u
upstream of each receiver v's read. Everything accumulates in float32; scores are means over
pairs, summed over positions unless ``per_position``.
"""

from __future__ import annotations

import contextlib

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_llm_inst.causal.engine import training_off
from lightning_llm_inst.causal.exact import _exact_batch
from lightning_llm_inst.causal.gradient import _gradient_batch
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import Metric, PairBatch, PromptPairs, resolve_metric
from lightning_llm_inst.causal.scores import METHODS, _Accumulator, _check_args, _to_graph, build_space

__all__ = ["METHODS", "attribute", "build_space"]


def attribute(model: torch.nn.Module, pairs: PromptPairs, *, method: str = "atp",
              nodes: Sequence[str] = ("heads", "mlp"), edges: bool = False, metric: Metric = "logit_diff",
              saes: Mapping[str, Any] | None = None, ig_steps: int = 5, per_position: bool = False,
              batch_size: int = 8, progress: bool | None = None, token_budget: int | None = None) -> CausalGraph:
    """Score every node (``input``, ``a{L}.h{H}``, ``m{L}``, SAE latents and errors, ``logits``)
    by the change of the metric when its output takes its corrupt-run value.

    ``method``: ``"atp"`` (first order, one backward pass), ``"eap-ig"`` (gradients averaged over
    ``ig_steps`` input interpolations), ``"exact"`` (one patched run per node). ``edges=True``
    adds edge scores (gradient methods). ``saes={hook: SparseAutoencoder}`` adds latent nodes
    (those active on some clean or corrupt token) and an error node per SAE. ``metric``:
    ``"logit_diff"`` or a callable ``(logits, pairs) -> scalar``. ``token_budget``: tokens per
    patched run of ``exact`` (default 4096 on CPU, 32768 on GPU). Returns a :class:`CausalGraph`.
    """
    _check_args(model, pairs, method, ig_steps, batch_size, edges, per_position, saes)
    metric_fn = resolve_metric(metric)
    space = build_space(model, nodes, saes)
    parts = space.parts
    device = parts.device
    budget = token_budget or (32768 if device.type == "cuda" else 4096)
    seq = max(pairs.lengths)
    acc = _Accumulator(space, per_position, seq, edges, device)
    from tqdm.auto import tqdm

    batches = list(pairs.batches(batch_size))
    if method == "exact":  # SAE latents are patched only where they changed: unknown in advance
        total = None if space.saes else sum(_patch_count(space, b, per_position) for b in batches)
        bar = tqdm(total=total, unit="patch", desc="exact", disable=(None if progress is None else not progress))
    else:
        bar = tqdm(total=len(pairs), unit="pair", desc=method, disable=(None if progress is None else not progress))
    ungroup = parts.ungrouped() if edges else contextlib.nullcontext()
    try:
        with training_off(model), ungroup:
            for i, batch in enumerate(batches):
                batch = batch.to(device)
                if method == "exact":
                    _exact_batch(acc, space, batch, metric_fn, i == 0, budget, bar)
                else:
                    _gradient_batch(acc, space, batch, metric_fn, method, ig_steps, edges, i == 0)
                    bar.update(len(batch))
    finally:
        bar.close()
    return _to_graph(acc, space, pairs, method, metric, ig_steps, per_position, model)


def _patch_count(space: NodeSpace, batch: PairBatch, per_position: bool) -> int:
    """Patched runs of one batch (no SAEs): one per node, or per node and position."""
    return sum(seg.size for seg in space.segments) * (batch.clean.shape[1] if per_position else 1)
