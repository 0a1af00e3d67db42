"""The causal graph: which components of a model carry the information that decides an output.

Stage: the result of attribution (``causal.attribution`` builds it) and the input of everything
after it: ranking (``top``), pruning, JSON files (our lossless native format, and circuit-tracer's
graph viewer format), ``networkx`` and a matplotlib figure.

Names follow the MIB benchmark. Nodes: ``input`` (token embeddings), ``a{L}.h{H}`` (query head H of
layer L), ``m{L}`` (MLP of layer L), ``logits`` (the sink), and with SAEs ``sae.{hook}.f{i}`` (latent
i of the SAE at hook point ``hook``) and ``sae.{hook}.err`` (its error term). Edges go from a node to
a *receiver*: ``a{L}.h{H}<q>``, ``<k>``, ``<v>`` (an input of head H, owned by node ``a{L}.h{H}``),
``m{L}`` or ``logits``; an edge is named ``"{source}->{receiver}"``, e.g. ``"a0.h3->a2.h1<q>"``.

Scores are signed (the effect on the metric of patching the node or edge with its corrupt-run value),
``[N]`` or ``[N, P]`` per position; ``score``, ``top`` and ``prune`` use the total over positions.

Choices: ``graph.edges`` is always a :class:`GraphEdges`, empty (falsy, ``len`` 0) when the graph has
no edges. ``to_networkx`` gives a ``DiGraph``: the q/k/v edges from one node into one head become one
edge whose ``weight`` is their sum, with the per-channel scores as attributes ``q``, ``k``, ``v``.
The circuit-tracer export does the same for its links (one link per source and receiving node).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import networkx
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FORMAT", "FORMAT_VERSION", "NODE_KINDS", "CausalGraph", "GraphEdges", "GraphKeyError", "node_kind",
           "receiver_owner"]

FORMAT = "lightning-llm-inst/causal-graph"
FORMAT_VERSION = 1
NODE_KINDS = ("input", "head", "mlp", "logits", "sae_feature", "sae_error", "other")
_TOP_KINDS = {"heads": ("head",), "mlp": ("mlp",), "input": ("input",), "sae": ("sae_feature", "sae_error")}
_HEAD = re.compile(r"a(\d+)\.h(\d+)")
_MLP = re.compile(r"m(\d+)")
_SAE_FEATURE = re.compile(r"sae\.(.+)\.f(\d+)")
_SAE_ERROR = re.compile(r"sae\.(.+)\.err")
_RECEIVER = re.compile(r"(.+)<([qkv])>")
#: the layer inside a hook name: TransformerLens ``blocks.3.``, HF ``layers.3`` / GPT-2 ``h.3``
_HOOK_LAYER = re.compile(r"(?:^|[._])(?:blocks|layers|h)\.(\d+)(?=\.|$)")
#: circuit-tracer's viewer: our kind -> its ``feature_type`` (see ``graph_export._circuit_tracer_payload``)
CIRCUIT_TRACER_TYPES = {"input": "embedding", "logits": "logit", "sae_feature": "cross layer transcoder",
                        "sae_error": "mlp reconstruction error", "head": "attention head", "mlp": "mlp",
                        "other": "other"}


class GraphKeyError(KeyError):
    """An unknown node or edge name; prints as one plain line (``KeyError`` would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def node_kind(name: str) -> str:
    """``"input"``, ``"head"``, ``"mlp"``, ``"logits"``, ``"sae_feature"``, ``"sae_error"`` or ``"other"``."""
    if name in ("input", "logits"):
        return name
    if _HEAD.fullmatch(name):
        return "head"
    if _MLP.fullmatch(name):
        return "mlp"
    if _SAE_FEATURE.fullmatch(name):
        return "sae_feature"
    if _SAE_ERROR.fullmatch(name):
        return "sae_error"
    return "other"


def receiver_owner(receiver: str) -> tuple[str, str]:
    """The node a receiver belongs to, and its channel (``""`` for MLPs and logits).

    ``"a2.h1<q>"`` -> ``("a2.h1", "q")``; ``"m4"`` -> ``("m4", "")``.
    """
    match = _RECEIVER.fullmatch(receiver)
    return (match.group(1), match.group(2)) if match else (receiver, "")


def _default_layer(name: str) -> float | None:
    """Drawing height from a node name; None for ``logits`` (placed above the rest) and unknown names."""
    if name == "input":
        return -1.0
    if match := _HEAD.fullmatch(name):
        return float(match.group(1))
    if match := _MLP.fullmatch(name):
        return float(match.group(1)) + 0.5  # MLP above the heads of its layer
    if match := (_SAE_FEATURE.fullmatch(name) or _SAE_ERROR.fullmatch(name)):
        hook = match.group(1)
        if found := _HOOK_LAYER.search(hook):
            return float(found.group(1)) + (0.25 if "resid_pre" in hook else 0.75)
    return None


def _invalid(arg: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"CausalGraph {arg}={value} is not valid; {allowed}")


def _shape(t: Tensor) -> str:
    return f"<tensor shape {list(t.shape)} dtype {str(t.dtype).removeprefix('torch.')}>"


def _float_tensor(arg: str, value: Any, rows: int, positions: int | None) -> Tensor:
    t = torch.as_tensor(value).detach()
    if t.dtype == torch.bool or t.is_complex():
        raise _invalid(arg, _shape(t), "expected real numbers")
    bad_positions = t.dim() == 2 and (t.shape[1] == 0 or positions not in (None, t.shape[1]))
    if t.dim() not in (1, 2) or t.shape[0] != rows or bad_positions:
        want = f"P={positions}" if positions else "P >= 1"
        raise _invalid(arg, _shape(t), f"expected shape [{rows}] or [{rows}, P] with {want}")
    return t.to(device="cpu", dtype=torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class GraphEdges:
    """The edges of a :class:`CausalGraph`."""

    edge_index: Tensor
    """``[2, E]`` long: row 0 indexes the graph's nodes (source), row 1 its receivers (target)."""
    scores: Tensor
    """``[E]`` or ``[E, P]`` float32 signed edge scores."""
    names: tuple[str, ...]
    """``"{source}->{receiver}"`` per edge, in edge order."""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def totals(self) -> Tensor:
        """``[E]`` float64: the scores summed over positions."""
        return self.scores.double() if self.scores.dim() == 1 else self.scores.double().sum(-1)


class CausalGraph:
    """Nodes and edges with signed scores; see the module docstring for names and conventions.

    Attributes: ``nodes`` (tuple of names), ``index`` (name -> row), ``scores`` (float32 ``[N]`` or
    ``[N, P]``, on the CPU), ``totals`` (float64 ``[N]``, summed over positions), ``n_positions``
    (P, or None), ``receivers``, ``edges`` (:class:`GraphEdges`), ``layers``, ``metadata``.

    ``metadata`` (method, metric, model...) must be JSON-serialisable; it is kept as its JSON round
    trip, so ``graph.metadata`` equals what :meth:`from_json` reads back. ``layers`` is the drawing
    height per node; by default ``input`` -1, ``a{L}.h{H}`` L, ``m{L}`` L+0.5, SAE nodes the hook's
    layer +0.75 (+0.25 at ``resid_pre``), ``logits`` one above the highest layer, others 0.
    """

    node_kind = staticmethod(node_kind)

    def __init__(self, nodes: Sequence[str], scores: Tensor, *, receivers: Sequence[str] = (),
                 edge_index: Tensor | None = None, edge_scores: Tensor | None = None,
                 layers: Sequence[float] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.nodes)}
        if bad := [n for n in self.nodes if not isinstance(n, str) or not n]:
            raise _invalid("nodes", f"[... {bad[0]!r} ...]", "node names are non-empty strings")
        if len(self.index) != len(self.nodes):
            dup = next(n for i, n in enumerate(self.nodes) if self.index[n] != i)
            raise _invalid("nodes", f"[... {dup!r} twice ...]", "node names must be unique")
        n = len(self.nodes)
        self.scores = _float_tensor("scores", scores, n, None)  # [N] or [N, P]
        self.n_positions: int | None = self.scores.shape[1] if self.scores.dim() == 2 else None
        self.receivers: tuple[str, ...] = tuple(receivers)
        self.edges = self._check_edges(edge_index, edge_scores)
        self.layers: tuple[float, ...] = self._check_layers(layers)
        self.metadata: dict[str, Any] = {}
        for key, value in dict(metadata or {}).items():
            try:
                self.metadata[str(key)] = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                raise _invalid(f"metadata[{key!r}]", f"<{type(value).__name__}>",
                               "metadata values must be JSON-serialisable (lists, not tensors)") from None
        self._totals = self.scores.double() if self.scores.dim() == 1 else self.scores.double().sum(-1)  # [N]
        self._edge_lookup: dict[str, int] | None = None

    def _check_edges(self, edge_index: Tensor | None, edge_scores: Tensor | None) -> GraphEdges:
        if len(set(self.receivers)) != len(self.receivers):
            raise _invalid("receivers", "<with duplicates>", "receiver names must be unique")
        for r in self.receivers:
            if not isinstance(r, str) or receiver_owner(r)[0] not in self.index:
                raise _invalid("receivers", f"[... {r!r} ...]", "each receiver must belong to a node: "
                               "'a{L}.h{H}<q|k|v>' for a head in nodes, else a node name ('m{L}', 'logits')")
        if (edge_index is None) != (edge_scores is None):
            raise _invalid("edge_index" if edge_index is None else "edge_scores", None,
                           "give edge_index and edge_scores together, or neither")
        if edge_index is None:
            return GraphEdges(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), ())
        index = torch.as_tensor(edge_index).detach().cpu()
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool or index.dim() != 2 \
                or index.shape[0] != 2:
            raise _invalid("edge_index", _shape(index), "expected an integer tensor of shape [2, E]")
        index = index.long().contiguous()  # [2, E]
        src, dst = index
        for row, name, bound, what in ((src, "edge_index[0]", len(self.nodes), "nodes"),
                                       (dst, "edge_index[1]", len(self.receivers), "receivers")):
            if row.numel() and (int(row.min()) < 0 or int(row.max()) >= bound):
                bad = int(row[(row < 0) | (row >= bound)][0])
                raise _invalid(name, f"<holds {bad}>", f"indexes {what}: expected 0 <= i < {bound}")
        if "logits" in self.index and bool((src == self.index["logits"]).any()):
            raise _invalid("edge_index[0]", "<holds 'logits'>", "'logits' is the sink and cannot be a source")
        if torch.unique(src * max(len(self.receivers), 1) + dst).numel() != src.numel():
            raise _invalid("edge_index", "<with duplicate edges>", "each (source, receiver) pair at most once")
        scores = _float_tensor("edge_scores", edge_scores, src.numel(), self.n_positions)  # [E] or [E, P]
        names = tuple(f"{self.nodes[s]}->{self.receivers[d]}" for s, d in zip(src.tolist(), dst.tolist()))
        return GraphEdges(index, scores, names)

    def _check_layers(self, layers: Sequence[float] | None) -> tuple[float, ...]:
        if layers is not None:
            values = [float(x) for x in layers]
            if len(values) != len(self.nodes) or not all(map(math.isfinite, values)):
                raise _invalid("layers", f"<{len(values)} values>",
                               f"expected one finite number per node ({len(self.nodes)})")
            return tuple(values)
        derived = [_default_layer(name) for name in self.nodes]
        top = max((math.floor(x) for x in derived if x is not None), default=-1) + 1.0
        return tuple(top if name == "logits" else (0.0 if x is None else x) for name, x in zip(self.nodes, derived))

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        pos = f", positions={self.n_positions}" if self.n_positions else ""
        method = self.metadata.get("method")
        method = f", method={method!r}" if method else ""
        return f"CausalGraph(nodes={len(self)}, edges={len(self.edges)}{pos}{method})"

    @property
    def totals(self) -> Tensor:
        """``[N]`` float64: node scores summed over positions."""
        return self._totals

    def _unknown(self, what: str, name: str, known: Sequence[str]) -> GraphKeyError:
        close = difflib.get_close_matches(str(name), known, n=4, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else f"; the graph has {len(known)} {what}s"
        return GraphKeyError(f"unknown {what} {name!r}{hint}")

    def score(self, name: str) -> float:
        """The node's score, summed over positions."""
        if name not in self.index:
            raise self._unknown("node", name, self.nodes)
        return float(self._totals[self.index[name]])

    def edge_score(self, name: str) -> float:
        """The score of edge ``"{source}->{receiver}"``, summed over positions."""
        if self._edge_lookup is None:
            self._edge_lookup = {e: i for i, e in enumerate(self.edges.names)}
        if name not in self._edge_lookup:
            raise self._unknown("edge", name, self.edges.names)
        return float(self.edges.totals[self._edge_lookup[name]])

    def top(self, k: int | None = 10, *, by: str = "abs", kind: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` strongest nodes (``logits`` excluded) or edges (``kind="edges"``) as ``(name, score)``.

        ``by="abs"`` sorts by |score|, ``by="signed"`` by score, descending; ties keep graph order.
        ``kind``: ``"heads"``, ``"mlp"``, ``"input"``, ``"sae"`` (features and error terms), ``"edges"``.
        ``k=None`` returns all.
        """
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise _invalid("top(k)", repr(k), "expected an int >= 0 or None")
        if by not in ("abs", "signed"):
            raise _invalid("top(by)", repr(by), "choose one of 'abs', 'signed'")
        if kind is not None and kind != "edges" and kind not in _TOP_KINDS:
            raise _invalid("top(kind)", repr(kind), f"choose one of None, 'edges', {', '.join(map(repr, _TOP_KINDS))}")
        if kind == "edges":
            names, values = list(self.edges.names), self.edges.totals.tolist()
        else:
            keep = [i for i, n in enumerate(self.nodes)
                    if n != "logits" and (kind is None or node_kind(n) in _TOP_KINDS[kind])]
            names, values = [self.nodes[i] for i in keep], [float(self._totals[i]) for i in keep]
        key = (lambda i: -abs(values[i])) if by == "abs" else (lambda i: -values[i])
        order = sorted(range(len(names)), key=key)
        return [(names[i], values[i]) for i in (order if k is None else order[:k])]

    def summary(self) -> dict[str, Any]:
        """Counts by kind, the ten strongest nodes and edges, and the metadata."""
        kinds: dict[str, int] = {}
        for name in self.nodes:
            kinds[node_kind(name)] = kinds.get(node_kind(name), 0) + 1
        return {"nodes": len(self), "edges": len(self.edges), "positions": self.n_positions, "kinds": kinds,
                "top_nodes": self.top(10), "top_edges": self.top(10, kind="edges"), "metadata": self.metadata}

    # ----------------------------------------------------------------- pruning
    def prune(self, threshold: float | None = None, *, top_k: int | None = None) -> CausalGraph:
        """A new graph with the strong nodes and edges; ``input`` and ``logits`` are always kept.

        ``threshold``: keep nodes and edges with |score| >= threshold (an edge also needs its source
        and its receiver's node kept). ``top_k``: keep the ``top_k`` strongest nodes other than
        ``input`` and ``logits``, and every edge between kept nodes. Edges are re-indexed; the
        metadata gains ``"pruned": {"threshold": ...}`` or ``{"top_k": ...}``.
        """
        if (threshold is None) == (top_k is None):
            raise _invalid("prune", f"(threshold={threshold!r}, top_k={top_k!r})", "give exactly one of them")
        always = torch.tensor([n in ("input", "logits") for n in self.nodes], dtype=torch.bool)  # [N]
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < math.inf:
                raise _invalid("prune(threshold)", repr(threshold), "expected a finite number >= 0")
            keep = always | (self._totals.abs() >= threshold)
            edge_keep = self.edges.totals.abs() >= threshold  # [E]
        else:
            if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
                raise _invalid("prune(top_k)", repr(top_k), "expected an int >= 0")
            keep = always.clone()
            strength = self._totals.abs().nan_to_num(-0.5).masked_fill(always, -1.0)  # NaN ranks last
            order = sorted(range(len(self)), key=lambda i: -float(strength[i]))
            keep[[i for i in order[:int(top_k)] if not always[i]]] = True
            edge_keep = torch.ones(len(self.edges), dtype=torch.bool)
        node_map = torch.cumsum(keep.long(), 0) - 1  # old node index -> new
        recv_keep = torch.tensor([bool(keep[self.index[receiver_owner(r)[0]]]) for r in self.receivers],
                                 dtype=torch.bool)  # [R]
        recv_map = torch.cumsum(recv_keep.long(), 0) - 1
        src, dst = self.edges.edge_index
        edge_keep &= keep[src] & recv_keep[dst]
        kept = keep.nonzero().flatten().tolist()
        how = {"threshold": float(threshold)} if threshold is not None else {"top_k": int(top_k)}
        meta = {**self.metadata, "pruned": how}
        return CausalGraph([self.nodes[i] for i in kept], self.scores[keep],
                           receivers=[r for r, k in zip(self.receivers, recv_keep.tolist()) if k],
                           edge_index=torch.stack([node_map[src[edge_keep]], recv_map[dst[edge_keep]]]),
                           edge_scores=self.edges.scores[edge_keep], layers=[self.layers[i] for i in kept],
                           metadata=meta)

    # ----------------------------------------------------------------- files
    def to_json(self, path: str | os.PathLike, format: str = "native", *, slug: str | None = None,
                prompt_tokens: Sequence[str] | None = None) -> Path:
        """Write the graph as JSON (atomically: a temp file, then a rename) and return the path.

        ``format="native"``: lossless (float32 scores as their exact float values), read back by
        :meth:`from_json`. ``format="circuit-tracer"``: a graph file for circuit-tracer's viewer
        (``graph_data/{slug}.json``); ``slug`` defaults to the file's stem and ``prompt_tokens`` to
        ``metadata["prompt_tokens"]``, else placeholders. Neither applies to the native format.
        """
        path = Path(path)
        if format == "native":
            payload, allow_nan = self._native_payload(), True
        elif format == "circuit-tracer":
            from lightning_llm_inst.causal.graph_export import _circuit_tracer_payload

            payload, allow_nan = _circuit_tracer_payload(self, slug or path.stem, prompt_tokens), False
        else:
            raise _invalid("to_json(format)", repr(format), "choose one of 'native', 'circuit-tracer'")
        try:
            text = json.dumps(payload, allow_nan=allow_nan)
        except ValueError:
            raise ValueError("CausalGraph.to_json(format='circuit-tracer') cannot write non-finite scores; "
                             "the viewer reads strict JSON (prune or fix the NaN/inf scores)") from None
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _native_payload(self) -> dict[str, Any]:
        def tensor(t: Tensor) -> dict[str, Any]:  # exact: every float32 is a float64, whose repr round-trips
            return {"shape": list(t.shape), "values": t.flatten().tolist()}

        return {"format": FORMAT, "version": FORMAT_VERSION, "nodes": list(self.nodes),
                "scores": tensor(self.scores), "layers": list(self.layers), "receivers": list(self.receivers),
                "edges": {"sources": self.edges.edge_index[0].tolist(), "receivers": self.edges.edge_index[1].tolist(),
                          "scores": tensor(self.edges.scores)},
                "metadata": self.metadata}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CausalGraph:
        """Read a graph written by ``to_json(path)`` (native format)."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{os.fspath(path)} is not a causal graph file: not JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{os.fspath(path)} is not a causal graph file: format={found!r}, expected {FORMAT!r}")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"{os.fspath(path)} has causal graph version={obj.get('version')!r}; "
                             f"this release reads version {FORMAT_VERSION}")
        try:
            def tensor(d: dict[str, Any]) -> Tensor:
                return torch.tensor(d["values"], dtype=torch.float32).reshape(d["shape"])

            edges = obj["edges"]
            index = [edges["sources"], edges["receivers"]]
            if not all(isinstance(i, int) for row in index for i in row):
                raise ValueError("edge indices must be integers")
            return cls(obj["nodes"], tensor(obj["scores"]), receivers=obj["receivers"],
                       edge_index=torch.tensor(index, dtype=torch.long).reshape(2, -1),
                       edge_scores=tensor(edges["scores"]), layers=obj["layers"], metadata=obj["metadata"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ValueError(f"{os.fspath(path)} is not a valid causal graph file: {detail}") from None

    # ----------------------------------------------------------------- views
    def to_networkx(self) -> networkx.DiGraph:
        """A ``networkx.DiGraph``: node attributes ``score`` (total), ``layer``, ``kind``; one edge per
        source and receiving node with ``weight`` (the sum over its receivers), ``receiver`` (its
        channels, e.g. ``"q"`` or ``"kv"``; ``""`` into an MLP or the logits) and ``q``/``k``/``v``.
        """
        try:
            import networkx as nx
        except ImportError:
            raise ImportError("CausalGraph.to_networkx needs networkx: pip install networkx") from None
        g = nx.DiGraph(**self.metadata)
        for i, name in enumerate(self.nodes):
            g.add_node(name, score=float(self._totals[i]), layer=self.layers[i], kind=node_kind(name))
        from lightning_llm_inst.causal.graph_export import _merged_edges

        for (u, owner), channels in _merged_edges(self).items():
            attrs = {"weight": sum(channels.values()), "receiver": "".join(c for c in "qkv" if c in channels)}
            attrs.update({c: w for c, w in channels.items() if c})
            g.add_edge(u, owner, **attrs)
        return g

    def figure(self, *, top_edges: int = 50, ax: Axes | None = None) -> Figure:
        """Draw the graph: layers bottom to top, nodes coloured by signed score (``RdBu_r``, centred at
        0) and sized by |score|, the ``top_edges`` strongest edges as lines, labels on the strongest
        nodes and a colorbar. Built without pyplot, so it works headless; draws into ``ax`` if given.
        """
        if not isinstance(top_edges, int) or isinstance(top_edges, bool) or top_edges < 0:
            raise _invalid("figure(top_edges)", repr(top_edges), "expected an int >= 0")
        from lightning_llm_inst.causal.graph_export import _draw

        return _draw(self, top_edges, ax)
