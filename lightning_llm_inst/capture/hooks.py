"""Hook points: which modules of a model are captured, under which names.

Stage: hook points. Before a capture starts, ``resolve_hook_points`` turns what the user
asked for (a ``HookGranularity``, TransformerLens-style names such as
``blocks.3.hook_resid_post``, or globs over torch module names) into a list of
``HookPoint`` objects; ``register_hooks`` then attaches forward (pre-)hooks that hand each
captured tensor, normalized to ``[batch, seq, ...]``, to a callback.

Layout of a model (``resolve_layout``): the block list and, inside a block, the attention and
MLP submodules, found by looking at the module tree (``model.named_modules()``):

    family                           blocks (name suffix)   attn_out                  mlp_out
    Llama / Mistral / Qwen2 / Gemma  layers.{i}             self_attn                 mlp
    GPT-2                            h.{i}                  attn                      mlp
    GPT-NeoX                         layers.{i}             attention                 mlp
    BERT                             encoder.layer.{i}      attention.output.dense    output.dense
    generic fallback                 longest ModuleList     child named *attn*        child named *mlp*/*ffn*
                                     of one block class     / *attention*             / *feed_forward*

BERT is post-LayerNorm: ``BertAttention`` returns ``LayerNorm(x + attn)`` and ``BertOutput``
returns ``LayerNorm(h + mlp)``, which *is* the block output. TransformerLens'
``hook_attn_out`` / ``hook_mlp_out`` are the sub-layer outputs before residual and norm, so
here they are the output projections ``attention.output.dense`` and ``output.dense`` (before
dropout; identical in eval mode). Everywhere, ``resid_pre`` of layer i is the input of block i
and ``resid_post`` the output of block i. For decoders, HF's ``hidden_states[-1]`` has the final
norm applied, so it differs from ``resid_post`` of the last layer.
"""

from __future__ import annotations

import fnmatch
import logging
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from lightning_llm_inst.config import HookGranularity

__all__ = ["HookHandles", "HookPoint", "ModelLayout", "available_hook_names", "normalize_input",
           "normalize_output", "register_hooks", "resolve_hook_points", "resolve_layout"]

logger = logging.getLogger(__name__)

KINDS = ("resid_pre", "attn_out", "mlp_out", "module", "resid_post")
"""Kinds of hook point, in the order they are sorted within one layer."""
_KIND_RANK = {kind: rank for rank, kind in enumerate(KINDS)}
_TL_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
_GRANULARITY_KINDS: dict[HookGranularity, tuple[str, ...]] = {
    HookGranularity.ALL: ("attn_out", "mlp_out", "resid_post"),
    HookGranularity.ATTENTION_ONLY: ("attn_out",),
    HookGranularity.FFN_ONLY: ("mlp_out",),
    HookGranularity.RESIDUAL: ("resid_post",),
}
_TL_NAME = re.compile(r"^blocks\.(-?\d+|\*|\{i\})\.hook_([a-z_]+)$")
_LAYER_TOKEN = re.compile(r"^(-?\d+)(?:\s*-\s*(-?\d+))?$")
_MAX_LISTED = 40

Spec = Union[HookGranularity, str, Sequence[Union[HookGranularity, str]]]
Layers = Union[None, int, Sequence[int], range, str]
HookCallback = Callable[["HookPoint", torch.Tensor], None]


@dataclass(frozen=True)
class HookPoint:
    """One captured value: stored under ``name``, taken at the torch module ``module_name``."""

    name: str  # e.g. "blocks.3.hook_resid_post", or the module name for kind "module"
    module_name: str  # e.g. "model.layers.3"
    layer: int | None  # block index, None for modules outside the blocks
    kind: str  # one of KINDS
    pre: bool = False  # True: the module's *input* is captured (forward pre-hook)


@dataclass(frozen=True)
class ModelLayout:
    """Where the blocks of a model are and, relative to a block, its attention and MLP."""

    family: str  # "llama", "gpt2", "gpt_neox", "bert" or "generic"
    blocks: str  # module name of the ModuleList of blocks, e.g. "model.layers"
    num_layers: int
    attn: str | None  # relative to a block; None when no attention submodule was found
    mlp: str | None  # relative to a block; None when no MLP submodule was found

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}" if self.blocks else str(layer)

    def module_for(self, kind: str, layer: int) -> str:
        """Torch module name whose output (input for resid_pre) is the value of ``kind``."""
        if kind in ("resid_pre", "resid_post"):
            return self.block_name(layer)
        rel = self.attn if kind == "attn_out" else self.mlp if kind == "mlp_out" else None
        if rel is None:
            raise ValueError(f"spec: hook kind {kind!r} is not available: no matching submodule in "
                             f"block {self.block_name(layer)!r} of this {self.family} model")
        return f"{self.block_name(layer)}.{rel}"

    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in _TL_KINDS if (k != "attn_out" or self.attn) and (k != "mlp_out" or self.mlp))


# (family, suffix of the block list's name, attention path, MLP path), tried in order.
_ARCH_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("llama", "layers", "self_attn", "mlp"),  # Llama, Mistral, Qwen2, Gemma and kin
    ("gpt2", "h", "attn", "mlp"),
    ("gpt_neox", "layers", "attention", "mlp"),
    ("bert", "encoder.layer", "attention.output.dense", "output.dense"),
)
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward")


def _has_all(blocks: nn.ModuleList, rel: str) -> bool:
    """Whether every block has the submodule ``rel`` (a dotted path)."""
    def has(block: nn.Module) -> bool:
        try:
            block.get_submodule(rel)
            return True
        except AttributeError:
            return False
    return all(has(block) for block in blocks)


def _find_layout(model: nn.Module) -> ModelLayout | None:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for family, suffix, attn, mlp in _ARCH_TABLE:
        found = [(n, m) for n, m in lists if (n == suffix or n.endswith("." + suffix))
                 and _has_all(m, attn) and _has_all(m, mlp)]
        if found:
            name, blocks = max(found, key=lambda item: len(item[1]))  # first of the longest
            return ModelLayout(family, name, len(blocks), attn, mlp)
    uniform = [(n, m) for n, m in lists if len({type(b) for b in m}) == 1]
    if not uniform:
        return None
    name, blocks = max(uniform, key=lambda item: len(item[1]))
    children = [child for child, _ in blocks[0].named_children()]
    attn = next((c for c in children if any(w in c.lower() for w in _ATTN_WORDS)), None)
    mlp = next((c for c in children if any(w in c.lower() for w in _MLP_WORDS)), None)
    logger.debug("generic layout: blocks %r (%d), attn %r, mlp %r", name, len(blocks), attn, mlp)
    return ModelLayout("generic", name, len(blocks), attn, mlp)


def resolve_layout(model: nn.Module) -> ModelLayout:
    """The block list, attention and MLP of ``model``; ValueError when there is no block list."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layout = _find_layout(model)
    if layout is None:
        raise ValueError(f"model: no list of transformer blocks (a non-empty nn.ModuleList of one class) "
                         f"found in {type(model).__name__}; use module-name globs instead")
    return layout


def available_hook_names(layout: ModelLayout) -> list[str]:
    """All TransformerLens-style names of a layout, layer by layer."""
    return [f"blocks.{i}.hook_{k}" for i in range(layout.num_layers) for k in layout.kinds()]


def _parse_layers(layers: Layers, num_layers: int) -> list[int]:
    """Selected layer indices, ascending, negatives counted from the end."""
    def norm(value: int) -> int:
        if not -num_layers <= value < num_layers:
            raise ValueError(f"layers: layer {value} is out of range for a model with {num_layers} layers "
                             f"(allowed {-num_layers}..{num_layers - 1})")
        return value % num_layers

    allowed = "None, an int, a list/tuple/range of ints or a string like '0-5,10'"
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, str):
        selected: set[int] = set()
        for token in layers.split(","):
            match = _LAYER_TOKEN.match(token.strip())
            if match is None:
                raise ValueError(f"layers: cannot parse {token.strip()!r} in {layers!r}; allowed: {allowed}")
            start = norm(int(match.group(1)))
            end = norm(int(match.group(2))) if match.group(2) is not None else start
            if end < start:
                raise ValueError(f"layers: empty range {token.strip()!r} in {layers!r} (start after end)")
            selected.update(range(start, end + 1))
        return sorted(selected)
    items = [layers] if not isinstance(layers, (Sequence, range, set, frozenset)) else list(layers)
    if not items:
        raise ValueError(f"layers: got an empty selection {layers!r}; allowed: {allowed}")
    values = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"layers: got {layers!r}; allowed: {allowed}")
        try:
            values.append(operator.index(item))
        except TypeError:
            raise TypeError(f"layers: got {layers!r} ({type(item).__name__} item); allowed: {allowed}") from None
    return sorted({norm(v) for v in values})


def _granularity(item: HookGranularity | str) -> HookGranularity | None:
    if isinstance(item, HookGranularity):
        return item
    for g in HookGranularity:
        if item.lower() in (g.value, g.name.lower()):
            return g
    return None


def _callable_modules(model: nn.Module) -> list[str]:
    """Module names a hook can fire on: not the root, not ModuleList/ModuleDict containers."""
    return [n for n, m in model.named_modules() if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]


def _no_match(item: str, model: nn.Module, layout: ModelLayout | None, why: str = "matches nothing") -> ValueError:
    names = _callable_modules(model)
    if layout is not None and layout.num_layers > 1:  # blocks 1..N-1 repeat block 0's names
        later = tuple(f"{layout.block_name(i)}" for i in range(1, layout.num_layers))
        names = [n for n in names if not any(n == b or n.startswith(b + ".") for b in later)]
    shown = ", ".join(names[:_MAX_LISTED]) + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED
                                              else "")
    msg = f"spec: {item!r} {why} in {type(model).__name__}.\nModule names: {shown}"
    if layout is not None:
        msg += (f"\n(blocks {layout.blocks}.1..{layout.num_layers - 1} repeat the names of block 0)"
                if layout.num_layers > 1 else "")
        kinds = ", ".join(f"hook_{k}" for k in layout.kinds())
        msg += f"\nTransformerLens names: blocks.{{i}}.<{kinds}> for i in 0..{layout.num_layers - 1}"
    msg += f"\nGranularities: {', '.join(g.value for g in HookGranularity)}"
    return ValueError(msg)


def _layer_point(layout: ModelLayout, kind: str, layer: int) -> HookPoint:
    return HookPoint(f"blocks.{layer}.hook_{kind}", layout.module_for(kind, layer), layer, kind, kind == "resid_pre")


def _need_layout(layout: ModelLayout | None, what: str, model: nn.Module) -> ModelLayout:
    if layout is None:
        raise ValueError(f"{what} needs transformer blocks, but no block list was found in "
                         f"{type(model).__name__}; use module-name globs instead")
    return layout


def resolve_hook_points(model: nn.Module, spec: Spec = HookGranularity.ALL, layers: Layers = None) -> list[HookPoint]:
    """Turn ``spec`` into hook points of ``model``, sorted by layer, then kind.

    ``spec``: a ``HookGranularity`` (or its value or name), ``blocks.{i}.hook_<kind>`` with a
    concrete ``i`` (negative allowed), ``*`` or ``{i}``, an ``fnmatch`` glob over module names
    (``*`` also matches dots; ModuleList/ModuleDict containers never run, so never match), or
    a list of these. ``layers`` restricts granularities, wildcard names and globs that fall
    inside blocks; a concrete ``blocks.3...`` name is taken as given. Modules outside the
    blocks sort before (e.g. embeddings) or after (e.g. final norm) them, by module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError("spec: got an empty list; allowed: a HookGranularity, a TransformerLens name or a glob")
    layout = _find_layout(model)
    selected = None if layers is None else _parse_layers(
        layers, _need_layout(layout, f"layers: {layers!r}", model).num_layers)
    points: list[HookPoint] = []
    for item in items:
        if not isinstance(item, (str, HookGranularity)):
            raise TypeError(f"spec: got {item!r} ({type(item).__name__}); allowed: a HookGranularity, "
                            f"a TransformerLens name 'blocks.{{i}}.hook_<kind>', a module-name glob, or a list")
        granularity = _granularity(item)
        tl = _TL_NAME.match(item)
        if granularity is not None or (tl is not None and tl.group(2) in _TL_KINDS):
            lay = _need_layout(layout, f"spec: {item!r}", model)
            every = selected if selected is not None else list(range(lay.num_layers))
            if granularity is not None:
                points += [_layer_point(lay, k, i) for i in every for k in _GRANULARITY_KINDS[granularity]]
                continue
            if tl.group(2) not in lay.kinds():
                raise _no_match(item, model, lay, why="is not available (no such submodule)")
            index = tl.group(1)
            chosen = every if index in ("*", "{i}") else _parse_layers(int(index), lay.num_layers)
            points += [_layer_point(lay, tl.group(2), i) for i in chosen]
            continue
        matched = [n for n in _callable_modules(model) if fnmatch.fnmatchcase(n, item)]
        if not matched:
            raise _no_match(item, model, layout)
        module_points = [HookPoint(n, n, _layer_of(layout, n), "module", False) for n in matched]
        if selected is not None:
            module_points = [p for p in module_points if p.layer is None or p.layer in selected]
            if not module_points:
                raise _no_match(item, model, layout, why=f"matches only modules in layers outside layers={layers!r}")
        points += module_points
    order = {n: idx for idx, (n, _) in enumerate(model.named_modules())}
    seen: set[str] = set()
    unique = [p for p in points if not (p.name in seen or seen.add(p.name))]  # first occurrence wins
    return sorted(unique, key=lambda p: _sort_key(p, layout, order))


def _layer_of(layout: ModelLayout | None, module_name: str) -> int | None:
    if layout is None or not module_name.startswith(layout.blocks + "." if layout.blocks else ""):
        return None
    head = module_name[len(layout.blocks) + 1 if layout.blocks else 0:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _sort_key(point: HookPoint, layout: ModelLayout | None, order: Mapping[str, int]) -> tuple[int, int, int]:
    position = order.get(point.module_name, len(order))
    if point.layer is not None:
        layer = point.layer
    elif layout is None:
        layer = 0
    else:  # outside the blocks: before them or after them, by module order
        layer = -1 if position < order.get(layout.blocks, 0) else layout.num_layers
    return layer, _KIND_RANK[point.kind], position


def _first_tensor(values: Iterable[Any]) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def normalize_output(output: Any) -> torch.Tensor:
    """The main tensor of a module output: a Tensor, the first tensor of a tuple/list (HF
    attention: ``(attn_output, attn_weights)``), or ``last_hidden_state`` / the first tensor
    field of a ``ModelOutput`` or dict. Shape ``[batch, seq, ...]`` for blocks and sub-layers."""
    if isinstance(output, torch.Tensor):
        return output
    found: torch.Tensor | None = None
    if isinstance(output, Mapping):  # ModelOutput is an OrderedDict of its non-None fields
        hidden = output.get("last_hidden_state")
        found = hidden if isinstance(hidden, torch.Tensor) else _first_tensor(output.values())
    elif isinstance(output, (tuple, list)):
        found = _first_tensor(output)
    if found is None:
        raise TypeError(f"output: cannot find a tensor in a {type(output).__name__}; allowed: a Tensor, "
                        f"a tuple/list holding one, or a ModelOutput/dict with a tensor field")
    return found


def normalize_input(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The hidden states a forward pre-hook sees: ``args[0]`` or ``kwargs['hidden_states']``."""
    if args:
        return normalize_output(args[0])
    if kwargs and kwargs.get("hidden_states") is not None:
        return normalize_output(kwargs["hidden_states"])
    raise TypeError(f"input: no positional argument and no 'hidden_states' keyword "
                    f"(keywords: {sorted(kwargs or {})})")


class HookHandles:
    """Handles of registered hooks; ``remove()`` is idempotent; a context manager removes them."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle], hook_points: Sequence[HookPoint]) -> None:
        self._handles = handles
        self.hook_points: tuple[HookPoint, ...] = tuple(hook_points)

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        error: BaseException | None = None
        for handle in handles:
            try:
                handle.remove()
            except Exception as exc:  # remove the rest regardless, report the first failure
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _post_hook(point: HookPoint, callback: HookCallback) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        callback(point, normalize_output(output))  # [batch, seq, ...]; output left untouched
    return hook


def _pre_hook(point: HookPoint, callback: HookCallback) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        callback(point, normalize_input(args, kwargs))  # [batch, seq, hidden]; input left untouched
    return hook


def register_hooks(model: nn.Module, hook_points: Iterable[HookPoint], callback: HookCallback) -> HookHandles:
    """Attach a hook per point calling ``callback(point, tensor)``; the tensor is the live value
    (not a copy): the callback must not modify it in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(callback):
        raise TypeError(f"callback: expected a callable (hook_point, tensor), got {type(callback).__name__}")
    points = [hook_points] if isinstance(hook_points, HookPoint) else list(hook_points)
    targets: list[tuple[HookPoint, nn.Module]] = []
    for point in points:
        if not isinstance(point, HookPoint):
            raise TypeError(f"hook_points: expected HookPoint items, got {point!r} ({type(point).__name__})")
        try:
            targets.append((point, model.get_submodule(point.module_name)))
        except AttributeError:
            raise ValueError(f"hook_points: {point.name!r} names module {point.module_name!r}, "
                             f"which {type(model).__name__} does not have") from None
    handles: list[torch.utils.hooks.RemovableHandle] = []
    registered = HookHandles(handles, points)
    try:
        for point, module in targets:
            if point.pre:
                handles.append(module.register_forward_pre_hook(_pre_hook(point, callback), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(point, callback)))
    except BaseException:
        registered.remove()
        raise
    logger.debug("registered %d hooks on %s", len(handles), type(model).__name__)
    return registered
