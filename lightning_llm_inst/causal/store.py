"""Attribution data in an activation store, and the graph read back from it without the model.

Stage: capture for analysis, then analysis from the store. :func:`capture_attribution` runs
the clean and corrupt prompts and writes, into an ordinary store (same format, manifest and
readers as any capture), one row per clean token (token fields ``input_ids``, ``sequence_id``
= the pair's index, ``position``) with these hook points (``{site}`` is ``input``, ``z.{L}``
(head inputs of the output projection, ``[heads * head_dim]``), ``m.{L}`` (MLP outputs) or
``sae.{hook}`` (the activation an SAE reads)):

    attr.clean.{site} / attr.corrupt.{site}   the node's output in the clean / corrupt run
    attr.grad.{site}                          dM/d(output) at the clean run (EAP-IG: averaged)
    attr.{clean,corrupt,grad}.sae.{hook}.latents   SAE latents and dM/d(latent) = g . decoder row
    attr.logits                               the sink's term (logits_corrupt - logits_clean) . dM/dlogits
    attr.metric                               [M(clean), M(corrupt)] of the row's pair

and, with ``edges=True``, ``attr.delta.a.{L}`` (each head's output difference in the residual,
``[heads * d_model]``), ``attr.grad.reads.{L}`` (dM at each head's q, k, v read, ``[heads * 3 *
d_model]``), ``attr.grad.mid.{L}`` (at the MLP's read) and ``attr.grad.final`` (at the
unembedding's read). The store's metadata ``causal_attribution`` describes the node space.

:func:`attribute_from_store` streams the rows window by window (memory does not grow with the
number of pairs) and sums the same products as the live call: the same graph.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.gradient import _add_edges, _gradient_batch_values
from lightning_llm_inst.causal.scores import _Accumulator, _check_args, _to_graph, build_space, model_name
from lightning_llm_inst.causal.engine import sae_parts, training_off
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import Metric, PromptPairs, resolve_metric

__all__ = ["ATTRIBUTION_PREFIX", "METADATA_KEY", "attribute_from_store", "capture_attribution", "has_attribution"]

METADATA_KEY = "causal_attribution"
ATTRIBUTION_PREFIX = "attr."


def _rows(t: Tensor) -> Tensor:
    """``[batch, seq, *f]`` -> ``[batch * seq, prod(f)]`` float32 on the CPU."""
    return t.detach().float().reshape(t.shape[0] * t.shape[1], -1).cpu()


def capture_attribution(model: torch.nn.Module, pairs: PromptPairs, output_path: str | os.PathLike, *,
                        method: str = "atp", nodes: Sequence[str] = ("heads", "mlp"),
                        saes: Mapping[str, Any] | None = None, edges: bool = False, metric: Metric = "logit_diff",
                        ig_steps: int = 5, batch_size: int = 8, codec: str | None = "zstd", mode: str = "create",
                        shard_size: int | str = "256MiB", progress: bool | None = None) -> str:
    """Write the clean and corrupt outputs of every node and the metric's gradients at them
    (``method="atp"``: at the clean run; ``"eap-ig"``: averaged over the input interpolation)
    into a store at ``output_path``; :func:`attribute_from_store` turns it into the graph."""
    from tqdm.auto import tqdm

    from lightning_llm_inst.store import StoreWriter

    if method == "exact":
        raise ValueError("method: got 'exact'; a store holds gradients, allowed: 'atp' or 'eap-ig'")
    _check_args(model, pairs, method, ig_steps, batch_size, edges, False, saes)
    if edges and saes:
        raise ValueError("edges: edges from a store are written for head, MLP and input senders; "
                         "use saes=None with edges=True (or attribute the live model)")
    metric_fn = resolve_metric(metric)
    space = build_space(model, nodes, saes)
    parts = space.parts
    meta = {
        "method": method, "ig_steps": ig_steps, "edges": edges, "nodes": list(space.nodes),
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
        "n_layers": parts.n_layers, "n_heads": parts.n_heads, "head_dim": parts.head_dim, "d_model": parts.d_model,
        "saes": {hook: {"d_sae": int(sae.cfg.d_sae), "kind": space.sae_points[hook].kind,
                        "layer": space.sae_points[hook].layer} for hook, sae in space.saes.items()},
        "model": model_name(model),
        "model_class": type(model).__name__, "pairs": pairs.to_dict(),
    }
    writer = StoreWriter(output_path, codec=codec, mode=mode, shard_size=shard_size, metadata={METADATA_KEY: meta})
    bar = tqdm(total=len(pairs), unit="pair", desc=f"capture {method}", disable=(None if progress is None else not progress))
    ungroup = parts.ungrouped() if edges else contextlib.nullcontext()
    try:
        with training_off(model), ungroup:
            for i, batch in enumerate(pairs.batches(batch_size)):
                batch = batch.to(parts.device)
                clean, corrupt, grads, m_clean, m_corr = _gradient_batch_values(
                    space, batch, metric_fn, method, ig_steps, edges, i == 0)
                writer.append(_batch_columns(space, clean, corrupt, grads, m_clean, m_corr, edges),
                              _batch_tokens(batch))
                bar.update(len(batch))
        writer.close()
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    return os.fspath(output_path)


def _batch_tokens(batch: Any) -> dict[str, Tensor]:
    rows, seq = batch.clean.shape
    pair = torch.tensor(batch.indices, dtype=torch.int64)[:, None].expand(rows, seq)
    pos = torch.arange(seq, dtype=torch.int64)[None, :].expand(rows, seq)
    return {"input_ids": batch.clean.cpu().reshape(-1), "sequence_id": pair.reshape(-1), "position": pos.reshape(-1)}


def _batch_columns(space: NodeSpace, clean: Any, corrupt: Any, grads: dict, m_clean: Tensor, m_corr: Tensor,
                   edges: bool) -> dict[str, Tensor]:
    parts = space.parts
    cols: dict[str, Tensor] = {}

    def node(site: str, c: Tensor, k: Tensor, g: Tensor) -> None:
        cols[f"attr.clean.{site}"], cols[f"attr.corrupt.{site}"], cols[f"attr.grad.{site}"] = _rows(c), _rows(k), _rows(g)

    node("input", clean.x0, corrupt.x0, grads[("x0",)])
    for layer in range(parts.n_layers):
        if "heads" in space.nodes:
            node(f"z.{layer}", clean.z[layer], corrupt.z[layer], grads[("z", layer)])
        if "mlp" in space.nodes:
            node(f"m.{layer}", clean.m[layer], corrupt.m[layer], grads[("m", layer)])
    for hook, sae in space.saes.items():
        node(f"sae.{hook}", clean.sae_x[hook], corrupt.sae_x[hook], grads[("sae", hook)])
        rows, encode = sae_parts(sae)
        with torch.no_grad():
            node(f"sae.{hook}.latents", encode(clean.sae_x[hook]), encode(corrupt.sae_x[hook]),
                 grads[("sae", hook)] @ rows.float().T)
    dl = corrupt.logits.float() - clean.logits.float()
    cols["attr.logits"] = _rows((dl * grads[("logits",)]).sum(-1, keepdim=True))
    seq = clean.x0.shape[1]
    cols["attr.metric"] = torch.stack([m_clean, m_corr], dim=-1)[:, None, :].expand(-1, seq, -1).reshape(-1, 2).float().cpu()
    if edges:
        for layer in range(parts.n_layers):
            if "heads" in space.nodes:
                dz = corrupt.z[layer].float() - clean.z[layer].float()
                cols[f"attr.delta.a.{layer}"] = _rows(torch.einsum("bphe,hed->bphd", dz, parts.w_out(layer).float()))
                reads = grads[("reads", layer)]  # [heads, 3, rows, seq, d]
                cols[f"attr.grad.reads.{layer}"] = _rows(reads.permute(2, 3, 0, 1, 4))
            if "mlp" in space.nodes:
                cols[f"attr.grad.mid.{layer}"] = _rows(grads[("mid", layer)])
        cols["attr.grad.final"] = _rows(grads[("final",)])
    return cols


# ---------------------------------------------------------------------------- reading back
def has_attribution(store: Any) -> bool:
    """Whether an open :class:`~lightning_llm_inst.store.ActivationStore` holds attribution data."""
    return isinstance(store.metadata.get(METADATA_KEY), dict) and "attr.grad.input" in store.hooks


def _space_from_meta(meta: Mapping[str, Any]) -> NodeSpace:
    parts = SimpleNamespace(n_layers=int(meta["n_layers"]), n_heads=int(meta["n_heads"]))
    saes = {hook: SimpleNamespace(cfg=SimpleNamespace(d_sae=int(info["d_sae"]))) for hook, info in meta["saes"].items()}
    points = {hook: SimpleNamespace(kind=info["kind"], layer=info["layer"]) for hook, info in meta["saes"].items()}
    return NodeSpace(parts, meta["nodes"], saes, points)  # type: ignore[arg-type]


def attribute_from_store(path: str | os.PathLike, *, per_position: bool = False, window_rows: int = 4096,
                         progress: bool | None = None) -> CausalGraph:
    """The graph of a store written by :func:`capture_attribution`, read window by window."""
    from tqdm.auto import tqdm

    from lightning_llm_inst.store import ActivationStore

    if not isinstance(window_rows, int) or window_rows < 1:
        raise ValueError(f"window_rows: got {window_rows!r}; allowed: an integer >= 1")
    with ActivationStore(path) as store:
        if not has_attribution(store):
            raise ValueError(f"path: the store at {os.fspath(path)!r} holds no attribution data "
                             f"(write it with capture_attribution)")
        meta = store.metadata[METADATA_KEY]
        space = _space_from_meta(meta)
        pairs = PromptPairs(**meta["pairs"])
        if per_position and len(set(pairs.lengths)) > 1:
            raise ValueError(f"per_position: needs pairs of one token length; got lengths {sorted(set(pairs.lengths))}")
        edges = bool(meta["edges"])
        acc = _Accumulator(space, per_position, max(pairs.lengths), edges, torch.device("cpu"))
        n_heads = space.parts.n_heads
        bar = tqdm(total=store.rows, unit="row", desc="read attribution",
                   disable=(None if progress is None else not progress))
        metric = torch.zeros(2, dtype=torch.float64)  # sums of M(clean), M(corrupt) over pairs
        try:
            for start in range(0, store.rows, window_rows):
                stop = min(store.rows, start + window_rows)
                cache: dict[str, Tensor] = {}

                def col(name: str) -> Tensor:  # each column read once per window
                    if name not in cache:
                        cache[name] = store[name][start:stop].float()  # [r, f]
                    return cache[name]

                pos = store.tokens["position"][start:stop].long()
                _window(acc, space, col, pos, n_heads, per_position, edges, meta)
                metric += col("attr.metric")[pos == 0].double().sum(0)  # one row per pair: its first token
                bar.update(stop - start)
        finally:
            bar.close()
        acc.clean_sum, acc.corrupt_sum = float(metric[0]), float(metric[1])
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=meta["model"]))
    graph = _to_graph(acc, space, pairs, meta["method"], meta["metric"], int(meta["ig_steps"]), per_position, model)
    graph.metadata["model_class"] = meta["model_class"]
    graph.metadata["source"] = os.fspath(path)
    return graph


def _per_row(t: Tensor, pos: Tensor, seq: int, per_position: bool) -> Tensor:
    """``[r, *f]`` summed over rows -> ``[*f]`` or, per position, ``[*f, seq]``."""
    if not per_position:
        return t.double().sum(0)
    out = torch.zeros(seq, *t.shape[1:], dtype=torch.float64)
    out.index_add_(0, pos, t.double())
    return out.movedim(0, -1)


def _window(acc: _Accumulator, space: NodeSpace, col: Any, pos: Tensor, n_heads: int, per_position: bool,
            edges: bool, meta: Mapping[str, Any]) -> None:
    seq = acc.nodes.shape[-1] if per_position else 0
    for seg in space.segments:
        if seg.kind == "input":
            val = ((col("attr.corrupt.input") - col("attr.clean.input")) * col("attr.grad.input")).sum(-1)
        elif seg.kind == "heads":
            dz = col(f"attr.corrupt.z.{seg.layer}") - col(f"attr.clean.z.{seg.layer}")
            val = (dz * col(f"attr.grad.z.{seg.layer}")).view(dz.shape[0], n_heads, -1).sum(-1)
        elif seg.kind == "mlp":
            val = ((col(f"attr.corrupt.m.{seg.layer}") - col(f"attr.clean.m.{seg.layer}"))
                   * col(f"attr.grad.m.{seg.layer}")).sum(-1)
        elif seg.kind == "sae":
            f_clean, f_corr = col(f"attr.clean.sae.{seg.hook}.latents"), col(f"attr.corrupt.sae.{seg.hook}.latents")
            acc.active[seg.hook] |= ((f_clean != 0) | (f_corr != 0)).any(dim=0)
            val = (f_corr - f_clean) * col(f"attr.grad.sae.{seg.hook}.latents")
        else:
            base = ((col(f"attr.corrupt.sae.{seg.hook}") - col(f"attr.clean.sae.{seg.hook}"))
                    * col(f"attr.grad.sae.{seg.hook}")).sum(-1)
            lat = ((col(f"attr.corrupt.sae.{seg.hook}.latents") - col(f"attr.clean.sae.{seg.hook}.latents"))
                   * col(f"attr.grad.sae.{seg.hook}.latents")).sum(-1)
            val = base - lat
        summed = _per_row(val, pos, seq, per_position)
        if seg.size == 1:
            acc.nodes[seg.start] += summed.reshape(acc.nodes[seg.start].shape)
        else:
            acc.nodes[seg.start:seg.start + seg.size] += summed
    acc.nodes[-1] += _per_row(col("attr.logits")[:, 0], pos, seq, per_position)
    if edges:
        _window_edges(acc, space, col, pos, n_heads, per_position, meta)


def _window_edges(acc: _Accumulator, space: NodeSpace, col: Any, pos: Tensor, n_heads: int, per_position: bool,
                  meta: Mapping[str, Any]) -> None:
    d = int(meta["d_model"])
    r = pos.shape[0]
    seq = acc.nodes.shape[-1] if per_position else 1
    # rows become [r, 1] (one position each) unless per position, where they are scattered to [1, r] ... as
    # [rows=r, seq=1]; per-position edges need the position axis, so place each row at its position
    def shape(t: Tensor) -> Tensor:  # [m, r, d] -> [m, rows, seq, d]
        if not per_position:
            return t[:, :, None, :]
        out = torch.zeros(t.shape[0], r, seq, d)
        out[:, torch.arange(r), pos] = t
        return out

    deltas, index = [], []
    for seg in space.segments:
        if seg.kind == "input":
            deltas.append((col("attr.corrupt.input") - col("attr.clean.input"))[None])
        elif seg.kind == "heads":
            deltas.append(col(f"attr.delta.a.{seg.layer}").view(r, n_heads, d).permute(1, 0, 2))
        elif seg.kind == "mlp":
            deltas.append((col(f"attr.corrupt.m.{seg.layer}") - col(f"attr.clean.m.{seg.layer}"))[None])
        index.append(torch.arange(seg.start, seg.start + seg.size))
    delta = shape(torch.cat(deltas))
    idx = torch.cat(index)
    writes = torch.tensor(space.sender_writes())[idx]
    receivers = []
    c = 0
    n_layers = space.parts.n_layers
    for layer in range(n_layers):
        if "heads" in space.nodes:
            g = col(f"attr.grad.reads.{layer}").view(r, n_heads * 3, d).permute(1, 0, 2)
            receivers.append((4 * layer + 1, shape(g), slice(c, c + n_heads * 3)))
            c += n_heads * 3
        if "mlp" in space.nodes:
            receivers.append((4 * layer + 3, shape(col(f"attr.grad.mid.{layer}")[None]), slice(c, c + 1)))
            c += 1
    receivers.append((4 * n_layers + 1, shape(col("attr.grad.final")[None]), slice(c, c + 1)))
    _add_edges(acc, space, delta, idx, writes, receivers)

