"""The node space of a graph: senders (what writes into the residual stream) and receivers
(what reads it), in the order the residual stream sees them.

Stage: bookkeeping between the hook sites and :class:`~lightning_llm_inst.causal.graph.CausalGraph`.
Every sender has a *write* position and every receiver a *read* position on one axis; an edge
``u -> v`` exists when ``write(u) < read(v)``. With ``N`` layers:

    input                        write 0
    a{L}.h{H}<q|k|v>             read  4L + 1
    a{L}.h{H}                    write 4L + 2
    SAE at attn_out L            write 4L + 2.5
    m{L} (its read)              read  4L + 3
    m{L}                         write 4L + 4
    SAE at mlp_out / resid_post L, or resid_pre L+1      write 4L + 4.5
    logits (its read)            read  4N + 1

Senders are grouped in *segments* (the input, one layer's heads, one MLP, one SAE's latents,
one SAE's error); each has a range of global sender indices, so scores accumulate in one flat
vector and edges in one ``[senders, receivers]`` matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_llm_inst.causal.parts import ModelParts

__all__ = ["NODE_KINDS", "NodeSpace", "Segment"]

NODE_KINDS = ("heads", "mlp")
_SAE_KINDS = {"resid_pre": 0.5, "attn_out": 2.5, "mlp_out": 4.5, "resid_post": 4.5}


@dataclass(frozen=True)
class Segment:
    """A run of senders of one kind at one place of the residual stream."""

    kind: str  # "input", "heads", "mlp", "sae", "sae_err"
    layer: int  # -1 for the input
    start: int  # first global sender index
    size: int
    write: float
    hook: str | None = None  # SAE hook name

    def names(self, n_heads: int) -> list[str]:
        if self.kind == "input":
            return ["input"]
        if self.kind == "heads":
            return [f"a{self.layer}.h{h}" for h in range(self.size)]
        if self.kind == "mlp":
            return [f"m{self.layer}"]
        if self.kind == "sae":
            return [f"sae.{self.hook}.f{i}" for i in range(self.size)]
        return [f"sae.{self.hook}.err"]


def normalize_nodes(nodes: str | Sequence[str]) -> tuple[str, ...]:
    items = (nodes,) if isinstance(nodes, str) else tuple(nodes)
    bad = [n for n in items if n not in NODE_KINDS]
    if bad or not items:
        raise ValueError(f"nodes: got {nodes!r}; allowed: a non-empty subset of {NODE_KINDS} "
                         f"('input' and 'logits' are always nodes)")
    return tuple(k for k in NODE_KINDS if k in items)


class NodeSpace:
    """Senders and receivers of one model, node selection and set of SAEs."""

    def __init__(self, parts: ModelParts, nodes: Sequence[str] = NODE_KINDS,
                 saes: Mapping[str, Any] | None = None, sae_points: Mapping[str, Any] | None = None) -> None:
        self.parts = parts
        self.nodes = normalize_nodes(nodes)
        self.saes = dict(saes or {})
        self.sae_points = dict(sae_points or {})
        n, nh = parts.n_layers, parts.n_heads
        pending: list[tuple[float, str, int, int, str | None]] = [(0.0, "input", -1, 1, None)]
        for layer in range(n):
            if "heads" in self.nodes:
                pending.append((4 * layer + 2, "heads", layer, nh, None))
            if "mlp" in self.nodes:
                pending.append((4 * layer + 4, "mlp", layer, 1, None))
        for hook, sae in self.saes.items():
            point = self.sae_points[hook]
            if point.kind not in _SAE_KINDS or point.layer is None:
                raise ValueError(f"saes: hook {hook!r} is a {point.kind!r} hook point; allowed: a residual "
                                 f"(resid_pre / resid_post), attention-output or MLP-output hook point")
            write = 4 * point.layer + _SAE_KINDS[point.kind]
            pending.append((write, "sae", point.layer, int(sae.cfg.d_sae), hook))
            pending.append((write + 0.01, "sae_err", point.layer, 1, hook))
        pending.sort(key=lambda item: item[0])
        self.segments: list[Segment] = []
        start = 0
        for write, kind, layer, size, hook in pending:
            self.segments.append(Segment(kind, layer, start, size, write, hook))
            start += size
        self.num_senders = start
        # receivers: per layer its heads' q, k, v reads (when heads are nodes) and its MLP read
        self.receiver_names: list[str] = []
        self.receiver_reads: list[float] = []
        for layer in range(n):
            if "heads" in self.nodes:
                for h in range(nh):
                    for t in "qkv":
                        self.receiver_names.append(f"a{layer}.h{h}<{t}>")
                        self.receiver_reads.append(4 * layer + 1)
            if "mlp" in self.nodes:
                self.receiver_names.append(f"m{layer}")
                self.receiver_reads.append(4 * layer + 3)
        self.receiver_names.append("logits")
        self.receiver_reads.append(4 * n + 1)

    def segment(self, kind: str, layer: int | None = None, hook: str | None = None) -> Segment | None:
        for seg in self.segments:
            if seg.kind == kind and (layer is None or seg.layer == layer) and (hook is None or seg.hook == hook):
                return seg
        return None

    def sender_names(self) -> list[str]:
        return [name for seg in self.segments for name in seg.names(self.parts.n_heads)]

    def sender_writes(self) -> list[float]:
        return [seg.write for seg in self.segments for _ in range(seg.size)]

    def draw_layers(self) -> list[float]:
        """Drawing height of each sender: its layer, heads below the MLP, SAEs between."""
        out = []
        for seg in self.segments:
            level = -1.0 if seg.kind == "input" else (seg.write - 2) / 4.0
            out += [level] * seg.size
        return out

    def describe(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "n_layers": self.parts.n_layers, "n_heads": self.parts.n_heads,
                "saes": {hook: int(sae.cfg.d_sae) for hook, sae in self.saes.items()}}
