"""Where a model's graph nodes write and its receivers read: the parts of a Hugging Face causal LM.

Stage: model layout for attribution. :class:`ModelParts` finds, for each block, the modules
whose inputs and outputs are the graph's nodes and receivers (it builds on the capture's
:func:`~lightning_llm_inst.capture.hooks.resolve_layout`):

    node / receiver            Llama family (Llama, Mistral, Qwen2, SmolLM2)   GPT-2
    input                      input of block 0 (the token embeddings)           input of block 0 (wte + wpe)
    a{L}.h{H} (head output)    o_proj input, head H's slice, times W_O[H]        c_proj likewise
    m{L}                       mlp output                                        mlp output
    a{L}.h{H}<q|k|v> (reads)   input_layernorm -> q/k/v_proj, head H's rows      ln_1 -> c_attn thirds
    m{L} (read)                post_attention_layernorm -> mlp                   ln_2 -> mlp
    logits (read)              final norm -> lm_head                             ln_f -> lm_head

Blocks must be pre-norm and sequential (``x + attn(norm(x))``, then ``+ mlp(norm(x))``);
attribution checks that on the first batch. Grouped-query attention is seen per query head:
while :meth:`ModelParts.ungrouped` is active, key and value projections are repeated to one per
query head (the attention then does no grouping), so a key or value read belongs to one query
head, as the node names say.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_llm_inst.capture.hooks import resolve_layout

__all__ = ["BlockParts", "ModelParts"]


@dataclass
class BlockParts:
    """The modules of one block that attribution hooks."""

    block: nn.Module
    attn: nn.Module
    ln_attn: nn.Module  # the norm whose output only the attention reads
    ln_mlp: nn.Module  # the norm whose output only the MLP reads
    o_proj: nn.Module  # its input is [batch, seq, heads * head_dim]
    mlp: nn.Module
    q_proj: nn.Module | None = None  # Llama family
    k_proj: nn.Module | None = None
    v_proj: nn.Module | None = None
    c_attn: nn.Module | None = None  # GPT-2: q, k, v in thirds of one Conv1D


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


class ModelParts:
    """The parts of ``model`` that causal attribution reads and patches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        layout = resolve_layout(model)
        self.layout = layout
        blocks = model.get_submodule(layout.blocks)
        parent_name = layout.blocks.rsplit(".", 1)[0] if "." in layout.blocks else ""
        parent = model.get_submodule(parent_name) if parent_name else model
        config = getattr(model, "config", None)
        self.blocks: list[BlockParts] = []
        if layout.family == "llama":
            for block in blocks:
                attn = block.self_attn
                if _get(block, "pre_feedforward_layernorm") is not None or _get(block, "post_feedforward_layernorm"):
                    raise ValueError(self._unsupported(model, "its blocks normalise the sub-layer outputs "
                                                              "(Gemma 2/3 style), so head outputs do not add into "
                                                              "the residual stream"))
                needed = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if _get(attn, n) is None]
                if needed or _get(block, "input_layernorm") is None or _get(block, "post_attention_layernorm") is None:
                    raise ValueError(self._unsupported(model, "its attention has no q_proj/k_proj/v_proj/o_proj "
                                                              "or its block no input/post-attention norm"))
                self.blocks.append(BlockParts(block, attn, block.input_layernorm, block.post_attention_layernorm,
                                              attn.o_proj, block.mlp, attn.q_proj, attn.k_proj, attn.v_proj))
            self.n_heads = int(config.num_attention_heads)
            self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
            self.head_dim = int(blocks[0].self_attn.head_dim)
            self.final_norm = _get(parent, "norm")
        elif layout.family == "gpt2":
            for block in blocks:
                self.blocks.append(BlockParts(block, block.attn, block.ln_1, block.ln_2, block.attn.c_proj,
                                              block.mlp, c_attn=block.attn.c_attn))
            self.n_heads = int(config.n_head)
            self.n_kv_heads = self.n_heads
            self.head_dim = int(config.n_embd) // self.n_heads
            self.final_norm = _get(parent, "ln_f")
        else:
            raise ValueError(self._unsupported(model, f"its blocks are of the {layout.family!r} family"))
        if self.final_norm is None:
            raise ValueError(self._unsupported(model, "no final norm (norm / ln_f) next to the block list"))
        self.n_layers = len(self.blocks)
        self.d_model = int(self.final_norm.weight.shape[0])
        self.groups = self.n_heads // self.n_kv_heads
        self.lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.lm_head is None:
            raise ValueError(self._unsupported(model, "no output embeddings (it is not a causal LM head model)"))

    @staticmethod
    def _unsupported(model: nn.Module, why: str) -> str:
        return (f"model: causal attribution supports pre-norm Llama-family (Llama, Mistral, Qwen2, SmolLM2) and "
                f"GPT-2 causal LMs; {type(model).__name__} is not supported: {why}")

    # ------------------------------------------------------------------ weights, per query head
    def w_out(self, layer: int) -> Tensor:
        """``[heads, head_dim, d_model]``: head H writes ``z_H @ w_out[H]`` into the residual."""
        p = self.blocks[layer]
        w = p.o_proj.weight
        if p.c_attn is not None:  # Conv1D: weight [in, out]
            return w.view(self.n_heads, self.head_dim, self.d_model)
        return w.view(self.d_model, self.n_heads, self.head_dim).permute(1, 2, 0)  # Linear: [out, in]

    def w_in(self, layer: int, kind: str) -> tuple[Tensor, Tensor | None]:
        """``([heads, head_dim, d_model], bias [heads, head_dim] | None)`` of the ``kind`` ('q', 'k',
        'v') projection per query head: head H's projection is ``h @ w[H].T + b[H]``."""
        p = self.blocks[layer]
        hd, n, d = self.head_dim, self.n_heads, self.d_model
        if p.c_attn is not None:
            third = "qkv".index(kind)
            w = p.c_attn.weight[:, third * d:(third + 1) * d]  # [d_model, d_model]
            b = p.c_attn.bias[third * d:(third + 1) * d]
            return w.reshape(d, n, hd).permute(1, 2, 0), b.view(n, hd)
        proj = {"q": p.q_proj, "k": p.k_proj, "v": p.v_proj}[kind]
        heads = n if kind == "q" else self.n_kv_heads
        w = proj.weight.view(heads, hd, d)
        b = proj.bias.view(heads, hd) if proj.bias is not None else None
        if heads != n:
            w = w.repeat_interleave(self.groups, dim=0)
            b = b.repeat_interleave(self.groups, dim=0) if b is not None else None
        return w, b

    # ------------------------------------------------------------------ grouped-query attention
    @contextlib.contextmanager
    def ungrouped(self) -> Iterator[None]:
        """Key and value projections give one head per query head while active (same outputs)."""
        if self.groups == 1:
            yield
            return
        handles, saved = [], []
        try:
            for p in self.blocks:
                saved.append((p.attn, p.attn.num_key_value_groups))
                p.attn.num_key_value_groups = 1
                for proj in (p.k_proj, p.v_proj):
                    handles.append(proj.register_forward_hook(self._repeat_heads))
            yield
        finally:
            for h in handles:
                h.remove()
            for attn, groups in saved:
                attn.num_key_value_groups = groups

    def _repeat_heads(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        shape = out.shape[:-1]
        heads = out.view(*shape, self.n_kv_heads, self.head_dim)
        return heads.repeat_interleave(self.groups, dim=-2).reshape(*shape, self.n_heads * self.head_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
