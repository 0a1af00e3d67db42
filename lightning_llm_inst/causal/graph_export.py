"""A causal graph for other eyes: circuit-tracer's graph-viewer file and a matplotlib picture.

Stage: the end of the flow, looking. :func:`_circuit_tracer_payload` turns a
:class:`~lightning_llm_inst.causal.graph.CausalGraph` into the JSON that circuit-tracer's
graph viewer reads (``metadata``, ``qParams``, ``nodes``, ``links``; q/k/v edges into one head
merged into one link, as the viewer keys links by source and target); :func:`_draw` draws
layers bottom to top, nodes coloured by signed score, the strongest edges. Both are reached
through ``CausalGraph.to_json(..., format="circuit-tracer")`` and ``CausalGraph.figure()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_llm_inst.causal.graph import (_SAE_ERROR, _SAE_FEATURE, CIRCUIT_TRACER_TYPES, CausalGraph, _invalid,
                                            node_kind, receiver_owner)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _merged_edges(graph: CausalGraph) -> dict[tuple[str, str], dict[str, float]]:
    """``(source, receiving node) -> {channel: total score}``; channel ``""`` for MLP and logits receivers."""
    merged: dict[tuple[str, str], dict[str, float]] = {}
    src, dst = graph.edges.edge_index.tolist()
    for s, d, w in zip(src, dst, graph.edges.totals.tolist()):
        owner, channel = receiver_owner(graph.receivers[d])
        channels = merged.setdefault((graph.nodes[s], owner), {})
        channels[channel] = channels.get(channel, 0.0) + w
    return merged


def _circuit_tracer_payload(graph: CausalGraph, slug: str, prompt_tokens: Sequence[str] | None) -> dict[str, Any]:
    """circuit-tracer's graph file (``frontend/graph_models.py``: ``Model`` of ``Metadata``, ``QParams``,
    ``nodes`` and ``links``), one node per graph node and one link per source and receiving node.

    Mapping: ``feature_type`` per :data:`CIRCUIT_TRACER_TYPES` (heads and MLPs get types of their own,
    which the viewer draws as plain nodes without fetching transcoder feature pages); ``layer`` is
    ``"E"`` for ``input``, else the node's integer layer (``logits`` one above); ``feature`` is the
    node's index in the graph (unique, so the viewer never merges two nodes); ``ctx_idx`` is the
    position of the largest |score| for per-position graphs, else the last prompt position;
    ``influence`` is the cumulative share of |score| down the ranking (circuit-tracer's meaning: the
    viewer's pruning slider keeps nodes with influence <= its value); ``activation`` carries the
    signed score; ``clerp`` the node name. Links carry the summed edge score as ``weight``.
    """
    if prompt_tokens is None:
        known = graph.metadata.get("prompt_tokens")
        placeholders = [f"<{i}>" for i in range(graph.n_positions or 1)]
        prompt_tokens = known if isinstance(known, list) and known else placeholders
    tokens = [str(t) for t in prompt_tokens]
    if graph.n_positions and len(tokens) < graph.n_positions:
        raise _invalid("to_json(prompt_tokens)", f"<{len(tokens)} tokens>",
                       f"a per-position graph needs at least {graph.n_positions} tokens")
    while len(tokens) < 2:  # the viewer hides a node present at more than 2/3 of the prompt's positions
        tokens.insert(0, "")
    offset = len(tokens) - (graph.n_positions or 1)  # per-position scores cover the last P tokens
    ctx = (graph.scores.abs().argmax(-1) + offset).tolist() if graph.n_positions else [len(tokens) - 1] * len(graph)
    ranked = [i for i, n in enumerate(graph.nodes) if n != "logits"]
    ranked.sort(key=lambda i: -abs(float(graph.totals[i])))
    total = sum(abs(float(graph.totals[i])) for i in ranked) or 1.0
    influence, running = {}, 0.0
    for i in ranked:
        running += abs(float(graph.totals[i]))
        influence[i] = running / total
    top_layer = max((math.floor(x) for n, x in zip(graph.nodes, graph.layers) if n not in ("input", "logits")),
                    default=-1) + 1
    metric = str(graph.metadata.get("metric", "logits"))
    nodes, ids = [], {}
    for i, name in enumerate(graph.nodes):
        kind = node_kind(name)
        layer = "E" if kind == "input" else str(top_layer if kind == "logits" else max(0, math.floor(graph.layers[i])))
        ids[name] = f"{layer}_{i}_{ctx[i]}"
        node = {"node_id": ids[name], "jsNodeId": ids[name], "feature": i, "layer": layer, "ctx_idx": ctx[i],
                "feature_type": CIRCUIT_TRACER_TYPES[kind], "clerp": name, "influence": influence.get(i),
                "activation": None if kind in ("input", "logits") else float(graph.totals[i])}
        if kind == "logits":  # the viewer parses 'Output "<token>" (p=<prob>)' from a logit's clerp
            node.update(is_target_logit=True, token_prob=0.0, clerp=f'Output "{metric}" (p=0.000)')
        nodes.append(node)
    links = [{"source": ids[u], "target": ids[v], "weight": sum(ch.values())}
             for (u, v), ch in _merged_edges(graph).items()]
    meta = {"slug": slug, "scan": str(graph.metadata.get("model", "lightning-llm-inst")), "transcoder_list": [],
            "prompt_tokens": tokens, "prompt": str(graph.metadata.get("prompt", "".join(tokens))),
            "node_threshold": None, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def _short_label(name: str) -> str:
    """``sae.blocks.1.hook_resid_post.f17`` -> ``resid_post.f17``: the hook's last part and the latent."""
    if match := (_SAE_FEATURE.fullmatch(name) or _SAE_ERROR.fullmatch(name)):
        return f"{match.group(1).split('.')[-1].removeprefix('hook_')}.{name.rsplit('.', 1)[1]}"
    return name


def _draw(graph: CausalGraph, top_edges: int, ax: Axes | None) -> Figure:
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows: dict[float, list[int]] = {}
    for i, y in enumerate(graph.layers):
        rows.setdefault(y, []).append(i)
    xy = torch.zeros(len(graph), 2)  # [N, (x, y)]
    for y, members in rows.items():
        for j, i in enumerate(members):
            xy[i] = torch.tensor([j - (len(members) - 1) / 2, y])
    widest = max((len(m) for m in rows.values()), default=1)
    if ax is None:
        fig = Figure(figsize=(min(max(6.0, 0.6 * widest + 2), 24.0), min(max(4.0, 0.35 * len(rows) + 2), 14.0)))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    totals = graph.totals.float().nan_to_num(0.0)  # [N]
    vmax = float(totals.abs().max()) if len(graph) and float(totals.abs().max()) > 0 else 1.0
    norm, cmap = Normalize(-vmax, vmax), "RdBu_r"
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    strongest = graph.top(top_edges, kind="edges")
    if strongest:
        wmax = max(abs(w) for _, w in strongest) or 1.0
        lookup = {name: i for i, name in enumerate(graph.edges.names)}
        src, dst = graph.edges.edge_index
        segments, colors, widths = [], [], []
        for name, w in strongest:
            e = lookup[name]
            target = graph.index[receiver_owner(graph.receivers[int(dst[e])])[0]]
            segments.append([xy[int(src[e])].tolist(), xy[target].tolist()])
            colors.append((*mappable.cmap(0.85 if w >= 0 else 0.15)[:3], 0.2 + 0.8 * abs(w) / wmax))
            widths.append(0.5 + 2.5 * abs(w) / wmax)
        ax.add_collection(LineCollection(segments, colors=colors, linewidths=widths, zorder=1))
    sizes = 30 + 320 * totals.abs() / vmax
    ax.scatter(xy[:, 0], xy[:, 1], c=totals, cmap=cmap, norm=norm, s=sizes, edgecolors="black", linewidths=0.5,
               zorder=2)
    labelled = {name for name, _ in graph.top(12)} | {"input", "logits"}
    for i, name in enumerate(graph.nodes):
        if name in labelled:
            ax.annotate(_short_label(name), (float(xy[i, 0]), float(xy[i, 1])), xytext=(0, 7),
                        textcoords="offset points", ha="center", fontsize=7, zorder=3)
    ticks = sorted({math.floor(y) for y in graph.layers})
    names = {graph.layers[graph.index[n]]: n for n in ("input", "logits") if n in graph.index}
    ax.set_yticks(ticks, [names.get(float(t), f"L{t}") for t in ticks])
    ax.set_xticks([])
    ax.set_xlim(-widest / 2 - 0.5, widest / 2 + 0.5)
    ax.margins(y=0.1)
    ax.set_ylabel("layer")
    title = " / ".join(str(graph.metadata[k]) for k in ("model", "method", "metric") if k in graph.metadata)
    ax.set_title(title or "causal graph", fontsize=9)
    fig.colorbar(mappable, ax=ax, label="score (effect on the metric)", shrink=0.8)
    return fig
