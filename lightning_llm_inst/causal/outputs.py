"""Each node's output for given token ids: what the graph's nodes write into the residual stream.

Stage: inspection, beside attribution. :func:`node_outputs` runs the model once and returns,
per node name, the ``[batch, seq, d_model]`` tensor that node adds: ``input`` (the input of
block 0), ``a{L}.h{H}`` (head H's slice of the output projection's input times its columns of
the projection weight), ``m{L}`` (the MLP output), and with SAEs ``sae.{hook}.f{i}`` (latent
i's activation times its decoder row, in raw units) and ``sae.{hook}.err`` (the activation
minus all latents' contributions; it holds the decoder bias, which never changes a score).
So a layer's head outputs plus the projection bias are the attention block's output, and an
SAE's latents plus its error are the hooked activation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.scores import build_space
from lightning_llm_inst.causal.engine import record, sae_parts, training_off

__all__ = ["node_outputs"]


def node_outputs(model: torch.nn.Module, input_ids: Tensor, *, nodes: Sequence[str] = ("heads", "mlp"),
                 saes: Mapping[str, Any] | None = None, latents: Sequence[int] | None = None) -> dict[str, Tensor]:
    """``{node name: [batch, seq, d_model]}`` for one forward pass over ``input_ids [batch, seq]``.

    SAE latents: all of them, or only ``latents`` (indices) when given (one tensor each)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [batch, seq] tensor of token ids, got "
                         f"{type(input_ids).__name__}{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else ''}")
    space = build_space(model, nodes, saes)
    parts = space.parts
    with training_off(model), torch.no_grad():
        v = record(space, input_ids.to(parts.device))
        out: dict[str, Tensor] = {"input": v.x0}
        for layer in range(parts.n_layers):
            if "heads" in space.nodes:
                heads = torch.einsum("bphe,hed->hbpd", v.z[layer], parts.w_out(layer))
                for h in range(parts.n_heads):
                    out[f"a{layer}.h{h}"] = heads[h]
            if "mlp" in space.nodes:
                out[f"m{layer}"] = v.m[layer]
        for hook, sae in space.saes.items():
            rows, encode = sae_parts(sae)
            x = v.sae_x[hook]
            f = encode(x).float()  # [batch, seq, d_sae]
            rows = rows.float()
            for i in (range(f.shape[-1]) if latents is None else latents):
                out[f"sae.{hook}.f{i}"] = f[..., i, None] * rows[i]
            out[f"sae.{hook}.err"] = x.float() - f @ rows
    return out
