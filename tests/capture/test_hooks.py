"""Tests of hook-point resolution and hook registration on tiny random-init HF models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_llm_inst.capture.hooks import (  # noqa: E402
    HookHandles,
    HookPoint,
    available_hook_names,
    normalize_input,
    normalize_output,
    register_hooks,
    resolve_hook_points,
    resolve_layout,
)
from lightning_llm_inst.config import HookGranularity  # noqa: E402

VOCAB, HIDDEN, LAYERS, BATCH, SEQ = 100, 32, 3, 2, 7
_DECODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    family: str
    blocks: str  # block list module name
    attn: str  # relative to a block
    mlp: str
    final_norm: str | None  # applied by HF to hidden_states[-1]; None for BERT


T = transformers
CASES = {
    "llama": Case(lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)), "llama", "model.layers", "self_attn",
                  "mlp", "model.norm"),
    "llama_bare": Case(lambda: T.LlamaModel(T.LlamaConfig(**_DECODER)), "llama", "layers", "self_attn", "mlp",
                       "norm"),
    "mistral": Case(lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)), "llama", "model.layers",
                    "self_attn", "mlp", "model.norm"),
    "qwen2": Case(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)), "llama", "model.layers", "self_attn",
                  "mlp", "model.norm"),
    "gemma": Case(lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=8)), "llama", "model.layers",
                  "self_attn", "mlp", "model.norm"),
    "gpt2": Case(lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB,
                                                        n_positions=32, bos_token_id=0, eos_token_id=1)),
                 "gpt2", "transformer.h", "attn", "mlp", "transformer.ln_f"),
    "gpt_neox": Case(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=1)), "gpt_neox", "gpt_neox.layers", "attention", "mlp",
        "gpt_neox.final_layer_norm"),
    "bert": Case(lambda: T.BertModel(T.BertConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                                  num_attention_heads=4, vocab_size=VOCAB)),
                 "bert", "encoder.layer", "attention.output.dense", "output.dense", None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Case, nn.Module]:
    torch.manual_seed(0)
    return CASES[request.param], CASES[request.param].build().eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))  # [B, T]


def _capture(model: nn.Module, points: list[HookPoint]) -> tuple[dict[str, torch.Tensor], object]:
    seen: dict[str, torch.Tensor] = {}

    def callback(point: HookPoint, tensor: torch.Tensor) -> None:
        assert point.name not in seen, f"{point.name} fired twice"
        seen[point.name] = tensor.detach().clone()

    with torch.no_grad():
        model(_ids(), output_hidden_states=True)  # let transformers install its own hooks first
    before = _hooks(model)
    with torch.no_grad(), register_hooks(model, points, callback):
        out = model(_ids(), output_hidden_states=True)
    assert _no_hooks_left(model, before)
    return seen, out


def _hooks(model: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook on the model. transformers 5 installs its own output-capturing hooks
    on blocks and attention the first time output_hidden_states is asked for, and leaves them there."""
    return {(name, table, key) for name, m in model.named_modules()
            for table in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(m, table)}


def _ours(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() for fn in [*m._forward_hooks.values(),
                                                                 *m._forward_pre_hooks.values()]
            if getattr(fn, "__module__", "") == "lightning_llm_inst.capture.hooks"]


def _no_hooks_left(model: nn.Module, before: set[tuple[str, str, int]] | None = None) -> bool:
    return not _ours(model) and (before is None or _hooks(model) == before)


# --- resolution, per architecture -------------------------------------------------------------


def test_layout(case: tuple[Case, nn.Module]) -> None:
    spec, model = case
    layout = resolve_layout(model)
    assert (layout.family, layout.blocks, layout.num_layers, layout.attn, layout.mlp) == (
        spec.family, spec.blocks, LAYERS, spec.attn, spec.mlp)


@pytest.mark.parametrize("granularity, kinds", [
    (HookGranularity.ALL, ("attn_out", "mlp_out", "resid_post")),
    (HookGranularity.ATTENTION_ONLY, ("attn_out",)),
    (HookGranularity.FFN_ONLY, ("mlp_out",)),
    (HookGranularity.RESIDUAL, ("resid_post",)),
])
def test_granularity_resolves_expected_modules(case: tuple[Case, nn.Module], granularity: HookGranularity,
                                               kinds: tuple[str, ...]) -> None:
    spec, model = case
    rel = {"attn_out": f".{spec.attn}", "mlp_out": f".{spec.mlp}", "resid_post": ""}
    expected = [(f"blocks.{i}.hook_{k}", f"{spec.blocks}.{i}{rel[k]}", i, k) for i in range(LAYERS) for k in kinds]
    for form in (granularity, granularity.value, granularity.name):
        points = resolve_hook_points(model, form)
        assert [(p.name, p.module_name, p.layer, p.kind) for p in points] == expected
        assert not any(p.pre for p in points)
        for p in points:  # every module exists
            model.get_submodule(p.module_name)


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_transformer_lens_aliases(case: tuple[Case, nn.Module], kind: str) -> None:
    spec, model = case
    rel = {"attn_out": f".{spec.attn}", "mlp_out": f".{spec.mlp}"}.get(kind, "")
    (point,) = resolve_hook_points(model, f"blocks.1.hook_{kind}")
    assert point == HookPoint(f"blocks.1.hook_{kind}", f"{spec.blocks}.1{rel}", 1, kind, kind == "resid_pre")
    (last,) = resolve_hook_points(model, f"blocks.-1.hook_{kind}")
    assert last.name == f"blocks.{LAYERS - 1}.hook_{kind}"
    for wildcard in ("*", "{i}"):
        points = resolve_hook_points(model, f"blocks.{wildcard}.hook_{kind}")
        assert [p.name for p in points] == [f"blocks.{i}.hook_{kind}" for i in range(LAYERS)]
    assert f"blocks.0.hook_{kind}" in available_hook_names(resolve_layout(model))


@pytest.mark.parametrize("layers, expected", [
    (1, [1]), ([0, 2], [0, 2]), (range(1, 3), [1, 2]), (-1, [2]), ([-1, 0], [0, 2]),
    ("0-1", [0, 1]), ("0,2", [0, 2]), ("1-2, 0", [0, 1, 2]), ("-1", [2]), ("-2--1", [1, 2]), (None, [0, 1, 2]),
])
def test_layers_selection(case: tuple[Case, nn.Module], layers: object, expected: list[int]) -> None:
    _, model = case
    points = resolve_hook_points(model, HookGranularity.RESIDUAL, layers=layers)
    assert [p.layer for p in points] == expected
    points = resolve_hook_points(model, "blocks.*.hook_attn_out", layers=layers)
    assert [p.layer for p in points] == expected


def test_glob(case: tuple[Case, nn.Module]) -> None:
    spec, model = case
    points = resolve_hook_points(model, f"{spec.blocks}.?.{spec.mlp}")
    assert [(p.name, p.kind, p.layer, p.pre) for p in points] == [
        (f"{spec.blocks}.{i}.{spec.mlp}", "module", i, False) for i in range(LAYERS)]
    assert all(p.name == p.module_name for p in points)
    points = resolve_hook_points(model, f"{spec.blocks}.[0-9].{spec.mlp}", layers=[0, -1])
    assert [p.layer for p in points] == [0, LAYERS - 1]
    assert [p.name for p in resolve_hook_points(model, spec.blocks + ".1")] == [f"{spec.blocks}.1"]  # exact name


def test_glob_star_crosses_dots() -> None:
    # fnmatch semantics: '*' also matches '.', so in BERT '*.output.dense' catches attention.output.dense too.
    torch.manual_seed(0)
    model = CASES["bert"].build()
    names = [p.name for p in resolve_hook_points(model, "encoder.layer.*.output.dense", layers=0)]
    assert names == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]


def test_unknown_name_lists_modules(case: tuple[Case, nn.Module]) -> None:
    spec, model = case
    with pytest.raises(ValueError) as info:
        resolve_hook_points(model, "no_such_module.*")
    message = str(info.value)
    assert "no_such_module" in message
    assert f"{spec.blocks}.0.{spec.attn}" in message  # a real module name
    if spec.final_norm:
        assert spec.final_norm in message
    assert "blocks.{i}" in message and "hook_resid_post" in message
    with pytest.raises(ValueError, match="'blocks.0.hook_resid_mid' matches nothing"):
        resolve_hook_points(model, "blocks.0.hook_resid_mid")
    with pytest.raises(ValueError, match=f"layer {LAYERS}.*{LAYERS} layers"):
        resolve_hook_points(model, f"blocks.{LAYERS}.hook_resid_post")


# --- captured values, per architecture ----------------------------------------------------------


def test_captured_tensors(case: tuple[Case, nn.Module]) -> None:
    spec, model = case
    points = resolve_hook_points(model, [HookGranularity.ALL, "blocks.*.hook_resid_pre"])
    seen, out = _capture(model, points)
    assert sorted(seen) == sorted(p.name for p in points)
    hs = out.hidden_states  # LAYERS + 1 tensors of [B, T, H]
    assert len(hs) == LAYERS + 1
    for i in range(LAYERS):
        pre, attn, mlp, post = (seen[f"blocks.{i}.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out",
                                                                       "resid_post"))
        for tensor in (pre, attn, mlp, post):
            assert tensor.shape == (BATCH, SEQ, HIDDEN)
        assert torch.equal(pre, hs[i])
        if i < LAYERS - 1 or spec.final_norm is None:
            assert torch.equal(post, hs[i + 1])
        if spec.family == "bert":  # post-LN: attention module returns LN(x + attn), BertOutput is the block output
            block = model.get_submodule(f"{spec.blocks}.{i}")
            mid = block.attention.output.LayerNorm(attn + pre)
            torch.testing.assert_close(block.output.LayerNorm(mlp + mid), post)
        else:  # pre-LN (and GPT-NeoX's parallel) residual: post = pre + attn + mlp
            torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
    if spec.final_norm is not None:  # HF applies the final norm to hidden_states[-1]
        last = seen[f"blocks.{LAYERS - 1}.hook_resid_post"]
        assert not torch.allclose(last, hs[-1])
        with torch.no_grad():
            torch.testing.assert_close(model.get_submodule(spec.final_norm)(last), hs[-1])
    assert _no_hooks_left(model)


def test_hooks_do_not_change_outputs(case: tuple[Case, nn.Module]) -> None:
    _, model = case
    with torch.no_grad():
        reference = normalize_output(model(_ids()))
    seen, out = _capture(model, resolve_hook_points(model, [HookGranularity.ALL, "blocks.*.hook_resid_pre"]))
    assert len(seen) == 4 * LAYERS
    assert torch.equal(normalize_output(out), reference)


def test_handles_removed_when_body_raises(case: tuple[Case, nn.Module]) -> None:
    spec, model = case
    points = resolve_hook_points(model, [HookGranularity.ALL, "blocks.*.hook_resid_pre"])
    mlp = model.get_submodule(f"{spec.blocks}.0.{spec.mlp}")  # transformers hooks no MLP of its own
    before = _hooks(model)
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with register_hooks(model, points, lambda p, t: calls.append(p.name)) as handles:
            assert isinstance(handles, HookHandles) and len(handles) == len(points)
            assert len(_ours(model)) == len(points) and len(mlp._forward_hooks) == 1
            with torch.no_grad():
                model(_ids())
            raise RuntimeError("boom")
    assert len(calls) == len(points)
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks
    assert _no_hooks_left(model, before)
    handles.remove()  # idempotent
    with torch.no_grad():
        model(_ids())
    assert len(calls) == len(points)


# --- architecture-independent behaviour ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return CASES["llama"].build().eval()


def test_order_and_duplicates(llama: nn.Module) -> None:
    spec = ["lm_head", "blocks.*.hook_resid_post", HookGranularity.ALL, "model.embed_tokens",
            "blocks.1.hook_resid_pre", "blocks.*.hook_resid_post", "model.layers.1.mlp.down_proj"]
    names = [p.name for p in resolve_hook_points(llama, spec)]
    assert names == [
        "model.embed_tokens",
        "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
        "model.layers.1.mlp.down_proj", "blocks.1.hook_resid_post",
        "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post",
        "lm_head",
    ]


def test_layers_filters_globs_but_not_explicit_indices(llama: nn.Module) -> None:
    points = resolve_hook_points(llama, ["model.layers.*.mlp", "blocks.2.hook_resid_post", "model.norm"], layers=0)
    assert [p.name for p in points] == ["model.layers.0.mlp", "blocks.2.hook_resid_post", "model.norm"]
    with pytest.raises(ValueError, match="layers outside"):
        resolve_hook_points(llama, "model.layers.2.mlp", layers=[0, 1])


@pytest.mark.parametrize("layers, error, words", [
    (3, ValueError, ["layers", "layer 3", "3 layers"]),
    ([-4], ValueError, ["layer -4", "3 layers"]),
    ("0-3", ValueError, ["layer 3", "3 layers"]),
    ("2-1", ValueError, ["layers", "'2-1'"]),
    ("a-b", ValueError, ["layers", "'a-b'", "0-5,10"]),
    ("", ValueError, ["layers"]),
    ([], ValueError, ["layers", "empty"]),
    (1.5, TypeError, ["layers", "1.5", "list"]),
    (True, TypeError, ["layers", "True"]),
    (["0"], TypeError, ["layers", "str"]),
])
def test_bad_layers(llama: nn.Module, layers: object, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        resolve_hook_points(llama, HookGranularity.RESIDUAL, layers=layers)
    for word in words:
        assert word in str(info.value)


def test_bad_specs(llama: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"spec: got 5 \(int\).*HookGranularity"):
        resolve_hook_points(llama, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="spec: got None"):
        resolve_hook_points(llama, ["residual", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="spec: got an empty list"):
        resolve_hook_points(llama, [])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        resolve_hook_points("llama", "all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matches nothing"):  # a ModuleList never runs forward: not a hook point
        resolve_hook_points(llama, "model.layers")


def test_listing_is_truncated() -> None:
    model = nn.Module()
    for i in range(100):
        model.add_module(f"part{i}", nn.Linear(2, 2) if i % 2 else nn.ReLU())
    with pytest.raises(ValueError) as info:
        resolve_hook_points(model, "nothing")
    message = str(info.value)
    assert "part0, part1" in message and "part39" in message and "part40" not in message
    assert "(60 more)" in message


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attention_layer = nn.Linear(8, 8)
        self.feed_forward = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 8] -> [B, T, 8]
        x = x + self.attention_layer(self.norm(x))
        return x + self.feed_forward(x)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])  # mixed classes: not a block list
        self.stack = nn.ModuleList([_Block() for _ in range(4)])
        self.short = nn.ModuleList([_Block() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.stack:
            x = block(x)
        return x


def test_generic_fallback() -> None:
    torch.manual_seed(0)
    model = _Toy().eval()
    layout = resolve_layout(model)
    assert (layout.family, layout.blocks, layout.num_layers, layout.attn, layout.mlp) == (
        "generic", "stack", 4, "attention_layer", "feed_forward")
    points = resolve_hook_points(model, HookGranularity.ALL, layers="1,3")
    assert [p.module_name for p in points] == [
        "stack.1.attention_layer", "stack.1.feed_forward", "stack.1",
        "stack.3.attention_layer", "stack.3.feed_forward", "stack.3"]
    seen: dict[str, torch.Tensor] = {}
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), register_hooks(model, resolve_hook_points(model, ["residual", "blocks.*.hook_resid_pre"]),
                                         lambda p, t: seen.__setitem__(p.name, t)):
        y = model(x)
    assert torch.equal(seen["blocks.0.hook_resid_pre"], x)
    assert torch.equal(seen["blocks.3.hook_resid_post"], y)
    assert torch.equal(seen["blocks.1.hook_resid_post"], seen["blocks.2.hook_resid_pre"])


def test_model_without_blocks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert [p.name for p in resolve_hook_points(model, "0")] == ["0"]
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        resolve_layout(model)
    with pytest.raises(ValueError, match="needs transformer blocks"):
        resolve_hook_points(model, HookGranularity.ALL)
    with pytest.raises(ValueError, match="layers: 0 needs transformer blocks"):
        resolve_hook_points(model, "0", layers=0)


def test_missing_attention_in_generic_layout() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
    assert resolve_layout(model).attn is None
    assert [p.name for p in resolve_hook_points(model, "residual")] == ["blocks.0.hook_resid_post",
                                                                       "blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match="attn_out"):
        resolve_hook_points(model, "attention_only")
    with pytest.raises(ValueError, match="'blocks.0.hook_mlp_out' is not available"):
        resolve_hook_points(model, "blocks.0.hook_mlp_out")
    # the block list is itself named 'blocks': module globs under it still work
    assert [p.name for p in resolve_hook_points(model, "blocks.1.0")] == ["blocks.1.0"]


# --- normalization --------------------------------------------------------------------------------


def test_normalize_output() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    assert normalize_output(a) is a
    assert normalize_output((a, None)) is a  # HF attention: (attn_output, attn_weights)
    assert normalize_output((None, b, a)) is b
    assert normalize_output([a, b]) is a
    assert normalize_output(BaseModelOutputWithPast(last_hidden_state=a, hidden_states=(b,))) is a
    assert normalize_output(CausalLMOutputWithPast(loss=None, logits=b)) is b  # no last_hidden_state
    assert normalize_output({"attentions": b, "last_hidden_state": a}) is a
    assert normalize_output({"x": None, "y": b}) is b
    for bad in (None, (None, None), {"a": 1}, "text"):
        with pytest.raises(TypeError, match="output: cannot find a tensor"):
            normalize_output(bad)


def test_normalize_input() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert normalize_input((a, b), {}) is a
    assert normalize_input((), {"hidden_states": a, "attention_mask": b}) is a
    assert normalize_input(((a, None),), {}) is a
    with pytest.raises(TypeError, match="attention_mask"):
        normalize_input((), {"attention_mask": b})


def test_pre_hook_sees_keyword_hidden_states(llama: nn.Module) -> None:
    # LlamaAttention is called with hidden_states=... as a keyword: a pre-hook on it must still work.
    point = HookPoint("attn_in", "model.layers.0.self_attn", 0, "module", pre=True)
    seen: list[torch.Tensor] = []
    with torch.no_grad(), register_hooks(llama, [point], lambda p, t: seen.append(t)):
        hs = llama(_ids(), output_hidden_states=True).hidden_states
    layer = llama.model.layers[0]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], layer.input_layernorm(hs[0]))


def test_register_hooks_validates(llama: nn.Module) -> None:
    good = resolve_hook_points(llama, "residual")
    bad = HookPoint("x", "model.layers.9", 9, "resid_post", False)
    before = _hooks(llama)
    with pytest.raises(ValueError, match=r"'model.layers.9'"):
        register_hooks(llama, [*good, bad], lambda p, t: None)
    assert _no_hooks_left(llama, before)  # nothing registered when one point is bad
    with pytest.raises(TypeError, match="callback"):
        register_hooks(llama, good, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hook_points"):
        register_hooks(llama, ["blocks.0.hook_resid_post"], lambda p, t: None)  # type: ignore[list-item]
    handles = register_hooks(llama, good[0], lambda p, t: None)  # a single point is accepted
    assert len(handles) == 1 and handles.active
    handles.remove()
    handles.remove()
    assert not handles.active and _no_hooks_left(llama, before)
