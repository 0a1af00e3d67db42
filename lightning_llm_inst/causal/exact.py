"""Exact patching over one batch of pairs: one patched run per node, batched.

Stage: attribution, ``method="exact"``. The nodes (or node x position patches) of a chunk are
stacked into one batch of copies of the clean prompts, copy c with node c set to its corrupt
output; blocks below the lowest patched layer of the chunk return the clean run's recorded
outputs instead of computing, and with the default metric the unembedding sees only the last
position. ``score = M(patched) - M(clean)``, summed over the batch's pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.engine import Values, check_sequential, metric_sums, record, repeat_block_outputs
from lightning_llm_inst.causal.nodes import NodeSpace, Segment
from lightning_llm_inst.causal.pairs import PairBatch
from lightning_llm_inst.causal.scores import _Accumulator, _sae_deltas
from lightning_llm_inst.causal.sites import Site, SiteFn, hooked, run_model, skipped_blocks


def _replicas(space: NodeSpace, sae_d: dict, seq: int, per_position: bool) -> list[tuple[Segment, int, int | None]]:
    """(segment, offset, position or None) for every patch of this batch, lowest layer first."""
    out = []
    for seg in space.segments:
        if seg.kind == "sae":
            changed = (sae_d[seg.hook][0] != 0).flatten(0, -2).any(dim=0).nonzero()[:, 0].tolist()
            offsets = changed
        else:
            offsets = list(range(seg.size))
        for off in offsets:
            for pos in (range(seq) if per_position else [None]):
                out.append((seg, off, pos))
    return out


def _patch_fns(space: NodeSpace, chunk: list, clean: Values, corrupt: Values, sae_d: dict, rows: int
               ) -> dict[Site, SiteFn]:
    """Site functions that set, in copy c of the batch, node chunk[c] to its corrupt value."""
    by_site: dict[Site, list[tuple[int, Segment, int, int | None]]] = {}
    for c, (seg, off, pos) in enumerate(chunk):
        site: Site = {"input": ("input",), "heads": ("z", seg.layer), "mlp": ("mlp", seg.layer)}.get(
            seg.kind, ("sae", seg.hook))
        by_site.setdefault(site, []).append((c, seg, off, pos))
    reps = len(chunk)

    def make(site: Site, items: list) -> SiteFn:
        def fn(x: Tensor) -> Tensor:
            y = x.clone()
            yv = y.view(reps, rows, *y.shape[1:])
            for c, seg, off, pos in items:
                sl = slice(None) if pos is None else slice(pos, pos + 1)
                if seg.kind == "input":
                    yv[c, :, sl] = corrupt.x0[:, sl].to(y.dtype)
                elif seg.kind == "heads":
                    yv[c, :, sl, off] = corrupt.z[seg.layer][:, sl, off].to(y.dtype)
                elif seg.kind == "mlp":
                    yv[c, :, sl] = corrupt.m[seg.layer][:, sl].to(y.dtype)
                elif seg.kind == "sae":
                    df, _, dec = sae_d[seg.hook]
                    yv[c, :, sl] += (df[:, sl, off, None] * dec[off]).to(y.dtype)
                else:
                    yv[c, :, sl] += sae_d[seg.hook][1][:, sl].to(y.dtype)
            return y
        return fn

    return {site: make(site, items) for site, items in by_site.items()}


def _lowest_layer(chunk: list) -> int:
    return min(seg.layer for seg, _, _ in chunk)


def _exact_batch(acc: _Accumulator, space: NodeSpace, batch: PairBatch, metric: Any, first: bool,
                 token_budget: int, bar: Any, only: set[int] | None = None) -> None:
    with torch.no_grad():
        corrupt = record(space, batch.corrupt, reads=first)
        if first:
            check_sequential(space, corrupt)
        clean = record(space, batch.clean, blocks=True)
        m_clean = float(metric_sums(clean.logits, batch, metric)[0])
        m_corr = float(metric_sums(corrupt.logits, batch, metric)[0])
        acc.clean_sum += m_clean
        acc.corrupt_sum += m_corr
        sae_d = _sae_deltas(space, clean, corrupt, acc)
        rows, seq = batch.clean.shape
        if acc.per_position:
            acc.nodes[-1] += _exact_logits_per_position(space, batch, metric, clean, corrupt, m_clean)
        else:
            acc.nodes[-1] += m_corr - m_clean
        replicas = _replicas(space, sae_d, seq, acc.per_position)
        if only is not None:
            replicas = [r for r in replicas if r[0].start + r[1] in only]
        per_chunk = max(1, token_budget // (rows * seq))
        last_only = metric is None
        for start in range(0, len(replicas), per_chunk):
            chunk = replicas[start:start + per_chunk]
            reps = len(chunk)
            fns = _patch_fns(space, chunk, clean, corrupt, sae_d, rows)
            if last_only:
                fns[("lm_head",)] = lambda x: x[:, -1:]
            skip = repeat_block_outputs({i: clean.blocks[i] for i in range(max(0, _lowest_layer(chunk)))}, reps)
            with skipped_blocks(space.parts, skip), hooked(space.parts, fns, space.sae_points):
                logits = run_model(space.parts, batch.clean.repeat(reps, 1))
            m = metric_sums(logits, batch, metric, reps) - m_clean  # [reps]
            for c, (seg, off, pos) in enumerate(chunk):
                if pos is None:
                    acc.nodes[seg.start + off] += float(m[c])
                else:
                    acc.nodes[seg.start + off, pos] += float(m[c])
            if bar is not None:
                bar.update(reps)


def _exact_logits_per_position(space: NodeSpace, batch: PairBatch, metric: Any, clean: Values, corrupt: Values,
                               m_clean: float) -> Tensor:
    """Exact score of the sink per position: the clean logits with one position's logits corrupt."""
    seq = batch.clean.shape[1]
    out = torch.zeros(seq, dtype=torch.float64, device=clean.logits.device)
    for pos in range(seq):
        logits = clean.logits.clone()
        logits[:, pos] = corrupt.logits[:, pos]
        out[pos] = float(metric_sums(logits, batch, metric)[0]) - m_clean
    return out
