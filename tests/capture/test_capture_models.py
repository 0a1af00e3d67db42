"""End-to-end capture tests on tiny random-init transformers models.

Every test goes through the seed API (``InstrumentationFramework`` + ``capture_activations``),
reads the result back with ``ActivationStore`` and compares it with what plain PyTorch forward
hooks registered by the test itself see on the same modules (bit for bit).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_llm_inst.config import HookGranularity, InstrumentationConfig  # noqa: E402
from lightning_llm_inst.framework import InstrumentationFramework  # noqa: E402
from lightning_llm_inst.store.reader import ActivationStore  # noqa: E402

T = transformers
LAYERS, HIDDEN, VOCAB, BATCH, SEQ = 2, 64, 256, 3, 11
PAD, BOS, EOS = 0, 1, 2
KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")

# architecture -> (block list, attention path in a block, MLP path in a block)
LAYOUT = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "gemma": ("model.layers", "self_attn", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "bert": ("encoder.layer", "attention.output.dense", "output.dense"),
}
MAIN_ARCHS = ("llama", "gpt2", "gpt_neox", "bert")
BRIEF_ARCHS = ("mistral", "qwen2", "gemma")


def _build(arch: str) -> nn.Module:
    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    common = dict(num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128)
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        extra = dict(head_dim=16) if arch == "gemma" else {}
        cfg_cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config,
                   "gemma": T.GemmaConfig}[arch]
        cfg = cfg_cls(hidden_size=HIDDEN, intermediate_size=128, num_key_value_heads=2, **common, **ids, **extra)
        cls = {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM,
               "gemma": T.GemmaForCausalLM}[arch]
    elif arch == "gpt2":
        cfg = T.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=128,
                           **ids)
        cls = T.GPT2LMHeadModel
    elif arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=128, **common, **ids)
        cls = T.GPTNeoXForCausalLM
    else:
        cfg = T.BertConfig(hidden_size=HIDDEN, intermediate_size=128, pad_token_id=PAD, **common)
        cls = T.BertModel
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg)
    assert model.config._attn_implementation == "eager"
    return model.eval()


@functools.cache
def _model(arch: str) -> nn.Module:
    model = _build(arch)
    with torch.no_grad():  # transformers 5 installs its own output-capturing hooks on first use; let it
        model(**_batch(arch), output_hidden_states=True)
    return model


def _batch(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Batch 3 x 11: row 0 unpadded; rows 1 and 2 padded (left for decoders, right for BERT)."""
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    if arch == "bert":
        mask[1, SEQ - 4:] = 0
        mask[2, SEQ - 2:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :5] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def _module_of(arch: str, name: str) -> tuple[str, bool]:
    """(torch module, is a pre-hook) holding the value of a TransformerLens name."""
    blocks, attn, mlp = LAYOUT[arch]
    _, layer, hook = name.split(".")
    kind = hook.removeprefix("hook_")
    rel = {"attn_out": f".{attn}", "mlp_out": f".{mlp}"}.get(kind, "")
    return f"{blocks}.{layer}{rel}", kind == "resid_pre"


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next(v for v in value if isinstance(v, torch.Tensor))
    if isinstance(value, dict):
        return value["last_hidden_state"]
    raise TypeError(type(value))


@contextlib.contextmanager
def _recording(model: nn.Module, targets: dict[str, tuple[str, bool]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Plain forward hooks: ``name -> [tensor of each forward]`` for ``name -> (module, pre)``."""
    rec: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for name, (module_name, pre) in targets.items():
        module = model.get_submodule(module_name)
        if pre:
            def pre_hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                rec[name].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                rec[name].append(_first_tensor(out).detach().clone())
            handles.append(module.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _real(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [batch, seq, ...] at ``keep`` [batch, seq], row-major."""
    return x.reshape(keep.numel(), *x.shape[2:])[keep.reshape(-1)]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.cumsum(-1) - 1  # count of real tokens before each position


def _all_hooks(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    tables = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called")
    return {name: {t: sorted(getattr(m, t)) for t in tables} for name, m in model.named_modules()}


def _capture(model: nn.Module, path: Path, config: InstrumentationConfig, batch: dict[str, torch.Tensor],
             forwards: int = 1, **call: Any) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    """Capture ``forwards`` forwards of ``batch`` into ``path``; return what plain hooks saw and the outputs."""
    fw = InstrumentationFramework(config)
    fw.instrument_model(model)
    targets = {hp.name: (hp.module_name, hp.pre) for hp in fw.hook_points}
    outs = []
    with _recording(model, targets) as rec, torch.no_grad(), fw.capture_activations(path):
        for _ in range(forwards):
            outs.append(model(**batch, **call))
    assert fw.pipeline is None
    return rec, outs


SPECS = {
    "ALL": (HookGranularity.ALL, ("attn_out", "mlp_out", "resid_post")),
    "ATTENTION_ONLY": (HookGranularity.ATTENTION_ONLY, ("attn_out",)),
    "FFN_ONLY": (HookGranularity.FFN_ONLY, ("mlp_out",)),
    "RESIDUAL": (HookGranularity.RESIDUAL, ("resid_post",)),
    "TL": ([f"blocks.{{i}}.hook_{k}" for k in KINDS], KINDS),
}
CASES = [(a, s) for a in MAIN_ARCHS for s in SPECS] + [(a, s) for a in BRIEF_ARCHS for s in ("ALL", "TL")]


# ------------------------------------------------------------------ 1. values per architecture and spec

@pytest.mark.parametrize("arch, spec", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_capture_matches_plain_hooks(tmp_path: Path, arch: str, spec: str) -> None:
    model = _model(arch)
    hook_spec, kinds = SPECS[spec]
    config = InstrumentationConfig(hooks=hook_spec) if spec == "TL" else InstrumentationConfig(granularity=hook_spec)
    batch = _batch(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = mask.bool()
    expected = {f"blocks.{i}.hook_{k}" for i in range(LAYERS) for k in kinds}

    fw = InstrumentationFramework(config)
    assert fw.instrument_model(model) is model
    assert {hp.name for hp in fw.hook_points} == expected
    # the references are taken on the modules this test expects, not the ones the library resolved
    with _recording(model, {n: _module_of(arch, n) for n in expected}) as rec, torch.no_grad(), \
            fw.capture_activations(tmp_path / "acts"):
        out = model(**batch, output_hidden_states=True)

    store = ActivationStore(tmp_path / "acts")
    rows = int(mask.sum())
    assert set(store.hooks) == expected
    assert store.rows == len(store) == rows == (27 if arch == "bert" else 25)
    for name in expected:
        (ref,) = rec[name]
        got = store[name][:]
        assert got.shape == (rows, HIDDEN) and got.dtype == torch.float32, name
        assert torch.equal(got, _real(ref, keep)), f"{arch} {name} differs from a plain forward hook"
    # the residual stream also agrees with transformers' own hidden_states (non-final layers)
    if "blocks.0.hook_resid_post" in expected:
        assert torch.equal(store["blocks.0.hook_resid_post"][:], _real(out.hidden_states[1], keep))
    if "blocks.1.hook_resid_pre" in expected:
        assert torch.equal(store["blocks.1.hook_resid_pre"][:], _real(out.hidden_states[1], keep))
        assert torch.equal(store["blocks.1.hook_resid_pre"][:], store["blocks.0.hook_resid_post"][:])

    tokens = {k: store.tokens[k][:].long() for k in ("input_ids", "sequence_id", "position", "step")}
    assert all(v.shape == (rows,) for v in tokens.values())
    assert torch.equal(tokens["input_ids"], ids[keep])
    assert torch.equal(tokens["position"], _positions(mask)[keep])
    assert torch.equal(tokens["step"], torch.zeros(rows, dtype=torch.int64))
    row_of = torch.arange(BATCH).unsqueeze(1).expand(BATCH, SEQ)[keep]
    per_row = [tokens["sequence_id"][row_of == b].unique() for b in range(BATCH)]
    assert all(u.numel() == 1 for u in per_row), per_row  # one id per sequence
    assert len({int(u) for u in per_row}) == BATCH  # and distinct ids for the three sequences


def test_capture_with_autograd_enabled(tmp_path: Path) -> None:
    """A capture in a training-style forward (grad enabled) stores the same values and leaves backward working."""
    model = _build("llama")
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual"))
    fw.instrument_model(model)
    with _recording(model, {n: _module_of("llama", n) for n in ("blocks.0.hook_resid_post",
                                                                "blocks.1.hook_resid_post")}) as rec, \
            fw.capture_activations(tmp_path / "acts"):
        out = model(**batch)
        assert out.logits.requires_grad
        out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())
    store = ActivationStore(tmp_path / "acts")
    for name, (ref,) in rec.items():
        assert torch.equal(store[name][:], _real(ref, keep))


# ------------------------------------------------------------------ 2. compression and storage dtype

def test_compression_variants_store_identical_values(tmp_path: Path) -> None:
    model = _model("llama")
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    stores = {}
    for algo in ("lz4", "zstd", None):
        path = tmp_path / f"acts_{algo}"
        rec, _ = _capture(model, path, InstrumentationConfig(granularity="all", compression_algorithm=algo), batch)
        stores[algo] = store = ActivationStore(path)
        assert store.codec.name == (algo or "none"), store.codec.spec
        for name, (ref,) in rec.items():
            assert torch.equal(store[name][:], _real(ref, keep)), (algo, name)
    for name in stores[None].hooks:
        assert torch.equal(stores["lz4"][name][:], stores[None][name][:])
        assert torch.equal(stores["zstd"][name][:], stores[None][name][:])
    for field in ("input_ids", "sequence_id", "position", "step"):
        assert torch.equal(stores["lz4"].tokens[field][:], stores[None].tokens[field][:])
        assert torch.equal(stores["zstd"].tokens[field][:], stores[None].tokens[field][:])


@pytest.mark.parametrize("storage_dtype, algo", [("bfloat16", "zstd"), ("bfloat16", None), ("float16", "lz4")])
def test_storage_dtype_is_exact_cast(tmp_path: Path, storage_dtype: str, algo: str | None) -> None:
    model = _model("llama")
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    dtype = getattr(torch, storage_dtype)
    rec, _ = _capture(model, tmp_path / "acts", InstrumentationConfig(
        granularity="all", storage_dtype=storage_dtype, compression_algorithm=algo), batch)
    store = ActivationStore(tmp_path / "acts")
    assert set(store.hooks) == set(rec)
    for name, (ref,) in rec.items():
        assert store.hooks[name].dtype == storage_dtype
        assert store[name].dtype == dtype
        got = store[name][:]
        assert got.dtype == dtype
        assert torch.equal(got, _real(ref, keep).to(dtype)), name


def test_bfloat16_model_keeps_its_dtype(tmp_path: Path) -> None:
    model = _build("llama").to(torch.bfloat16)
    batch = _batch("llama")
    rec, _ = _capture(model, tmp_path / "acts", InstrumentationConfig(granularity="residual"), batch)
    store = ActivationStore(tmp_path / "acts")
    for name, (ref,) in rec.items():
        assert ref.dtype == torch.bfloat16 and store[name].dtype == torch.bfloat16
        assert torch.equal(store[name][:], _real(ref, batch["attention_mask"].bool()))


# ------------------------------------------------------------------ 3. generate() with a KV cache

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_kv_cache(tmp_path: Path, arch: str) -> None:
    model = _model(arch)
    batch = _batch(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = 5
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD, use_cache=True)
    name = "blocks.0.hook_resid_post"
    target = {name: _module_of(arch, name)}

    with _recording(model, target) as plain, torch.no_grad():  # a plain generate() with a plain hook
        expected_out = model.generate(**batch, **gen)
    assert len(plain[name]) == new  # prefill + 4 decode steps

    fw = InstrumentationFramework(InstrumentationConfig(hooks=[name, "blocks.1.hook_mlp_out"]))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        out = model.generate(**batch, **gen)
    assert torch.equal(out, expected_out)

    store = ActivationStore(tmp_path / "acts")
    keep = mask.bool()
    prefill = int(mask.sum())
    decode_steps = new - 1
    assert store.rows == prefill + BATCH * decode_steps
    tok = {k: store.tokens[k][:].long() for k in ("input_ids", "sequence_id", "position", "step")}
    step = tok["step"]
    assert torch.equal(step[:prefill], torch.zeros(prefill, dtype=torch.int64))
    assert torch.equal(step[prefill:], torch.arange(1, new).repeat_interleave(BATCH))
    # prefill rows: the real prompt tokens
    assert torch.equal(tok["input_ids"][:prefill], ids[keep])
    assert torch.equal(tok["position"][:prefill], _positions(mask)[keep])
    prompt_seq = [int(tok["sequence_id"][:prefill][torch.arange(BATCH).unsqueeze(1).expand(BATCH, SEQ)[keep] == b]
                      .unique()) for b in range(BATCH)]
    assert len(set(prompt_seq)) == BATCH
    # decode rows: the token fed at step k is generated token k-1, at position true_len + k - 1
    true_len = mask.sum(-1)
    for k in range(1, new):
        sl = slice(prefill + BATCH * (k - 1), prefill + BATCH * k)
        assert torch.equal(tok["input_ids"][sl], out[:, SEQ + k - 1]), k
        assert torch.equal(tok["position"][sl], true_len + k - 1), k
        assert tok["sequence_id"][sl].tolist() == prompt_seq, k
    # values: prefill and every decode step equal what the plain hook recorded in the plain generate()
    got = store[name][:]
    assert torch.equal(got[:prefill], _real(plain[name][0], keep))
    for k in range(1, new):
        assert plain[name][k].shape == (BATCH, 1, HIDDEN)
        assert torch.equal(got[prefill + BATCH * (k - 1): prefill + BATCH * k], plain[name][k][:, 0]), k


# ------------------------------------------------------------------ 4. token selection

@pytest.mark.parametrize("option", ["drop_bos", "drop_token_ids", "position_window", "combined"])
def test_token_selection_options(tmp_path: Path, option: str) -> None:
    model = _model("llama")
    batch = _batch("llama")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = _positions(mask)
    real = mask.bool()
    dropped_ids = [int(ids[0, 4]), int(ids[2, 8])]
    kw: dict[str, Any] = {}
    keep = real.clone()
    if option in ("drop_bos", "combined"):
        kw["drop_bos"] = True
        keep &= pos != 0
    if option in ("drop_token_ids", "combined"):
        kw["drop_token_ids"] = dropped_ids
        keep &= ~torch.isin(ids, torch.tensor(dropped_ids))
    if option in ("position_window", "combined"):
        kw["position_window"] = (2, 6)
        keep &= (pos >= 2) & (pos < 6)
    rec, _ = _capture(model, tmp_path / "acts", InstrumentationConfig(granularity="all", **kw), batch)
    store = ActivationStore(tmp_path / "acts")
    assert 0 < store.rows == int(keep.sum()) < int(real.sum())
    positions = store.tokens["position"][:].long()
    stored_ids = store.tokens["input_ids"][:].long()
    assert torch.equal(stored_ids, ids[keep])
    assert torch.equal(positions, pos[keep])
    if option == "drop_bos":
        assert 0 not in positions.tolist() and store.rows == int(real.sum()) - BATCH
    if option == "drop_token_ids":
        assert not set(stored_ids.tolist()) & set(dropped_ids)
    if option == "position_window":
        assert sorted(set(positions.tolist())) == [2, 3, 4, 5] and store.rows == 4 * BATCH
    for name, (ref,) in rec.items():
        assert torch.equal(store[name][:], _real(ref, keep)), name


# ------------------------------------------------------------------ 5. errors

def test_spec_matching_nothing_lists_real_modules() -> None:
    model = _model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(hooks="model.no_such_module.*"))
    with pytest.raises(ValueError) as info:
        fw.instrument_model(model)
    msg = str(info.value)
    assert "model.no_such_module.*" in msg
    assert "model.layers.0.self_attn" in msg and "model.layers.0.mlp" in msg and "model.norm" in msg
    assert fw.model is None
    with pytest.raises(ValueError, match="out of range"):
        InstrumentationFramework(InstrumentationConfig(hooks="blocks.7.hook_resid_post")).instrument_model(model)


@pytest.mark.parametrize("field, value, allowed", [
    ("compression_algorithm", "gzip", ("'lz4'", "'zstd'", "None")),
    ("granularity", "bogus", ("ALL", "ATTENTION_ONLY", "FFN_ONLY", "RESIDUAL")),
])
def test_config_rejects_bad_values(field: str, value: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:
        InstrumentationConfig(**{field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg
    assert all(a in msg for a in allowed), msg


def test_config_accepts_granularity_names_and_values() -> None:
    for form in ("ffn_only", "FFN_ONLY", HookGranularity.FFN_ONLY):
        assert InstrumentationConfig(granularity=form).granularity is HookGranularity.FFN_ONLY


def test_capture_before_instrument_model(tmp_path: Path) -> None:
    fw = InstrumentationFramework(InstrumentationConfig())
    with pytest.raises(RuntimeError, match=r"instrument_model"):
        with fw.capture_activations(tmp_path / "acts"):
            pass  # pragma: no cover
    assert not (tmp_path / "acts").exists()


def test_existing_store_needs_append(tmp_path: Path) -> None:
    model = _model("llama")
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    path = tmp_path / "acts"
    rec1, _ = _capture(model, path, InstrumentationConfig(granularity="residual"), batch)
    hooks_before = _all_hooks(model)

    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual"))
    fw.instrument_model(model)
    with pytest.raises(OSError, match="already exists"):
        with fw.capture_activations(path):
            pass  # pragma: no cover
    assert _all_hooks(model) == hooks_before and fw.pipeline is None  # nothing attached, nothing left
    assert ActivationStore(path).rows == int(keep.sum())  # untouched

    batch2 = _batch("llama", seed=2)
    keep2 = batch2["attention_mask"].bool()
    targets = {hp.name: (hp.module_name, hp.pre) for hp in fw.hook_points}
    with _recording(model, targets) as rec2, torch.no_grad(), fw.capture_activations(path, mode="append"):
        model(**batch2)
    store = ActivationStore(path)
    assert store.rows == int(keep.sum()) + int(keep2.sum())
    for name in rec1:
        assert torch.equal(store[name][:], torch.cat([_real(rec1[name][0], keep), _real(rec2[name][0], keep2)]))
    assert torch.equal(store.tokens["input_ids"][:].long(), torch.cat([batch["input_ids"][keep],
                                                                        batch2["input_ids"][keep2]]))


def test_append_keeps_sequence_ids_unique(tmp_path: Path) -> None:
    model = _model("llama")
    path = tmp_path / "acts"
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual"))
    fw.instrument_model(model)
    with torch.no_grad():
        with fw.capture_activations(path):
            model(**_batch("llama"))
        with fw.capture_activations(path, mode="append"):
            model(**_batch("llama", seed=2))
    store = ActivationStore(path)
    seq = store.tokens["sequence_id"][:].long()
    first = int(_batch("llama")["attention_mask"].sum())
    assert not set(seq[:first].tolist()) & set(seq[first:].tolist()), seq.tolist()


# ------------------------------------------------------------------ 6. exceptions inside the block

class _Boom(Exception):
    pass


@pytest.mark.parametrize("caught_inside", [False, True], ids=["propagates", "caught_inside_block"])
@pytest.mark.parametrize("where", ["pre", "post"], ids=["layer1_pre_hook", "layer1_post_hook"])
def test_exception_mid_forward_removes_hooks_and_keeps_complete_forwards(tmp_path: Path, where: str,
                                                                         caught_inside: bool) -> None:
    """Forward 3 raises inside layer 1, after the capture's layer-0 hooks (and, for "post", layer 1's
    attention / MLP hooks) already packed rows of it: none of forward 3 may reach the store."""
    model = _model("llama")
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    armed = {"on": False}
    fired_on_layer0: list[int] = []

    def bomb(*_: Any) -> None:
        if armed["on"]:
            raise _Boom("raised inside layer 1")

    layer1 = model.model.layers[1]
    bomb_handle = layer1.register_forward_pre_hook(bomb) if where == "pre" else layer1.register_forward_hook(bomb)
    try:
        fw = InstrumentationFramework(InstrumentationConfig(granularity="all"))
        fw.instrument_model(model)
        before = _all_hooks(model)
        targets = {hp.name: (hp.module_name, hp.pre) for hp in fw.hook_points}
        with _recording(model, targets) as rec, torch.no_grad():
            spy = model.model.layers[0].register_forward_hook(lambda m, a, o: fired_on_layer0.append(1))
            with contextlib.ExitStack() as stack:
                if not caught_inside:
                    stack.enter_context(pytest.raises(_Boom, match="inside layer 1"))
                with fw.capture_activations(tmp_path / "acts"):
                    model(**batch)
                    model(**batch)
                    armed["on"] = True
                    if caught_inside:  # the user catches it and goes on capturing
                        with pytest.raises(_Boom):
                            model(**batch)
                        armed["on"] = False
                        model(**batch)
                    else:
                        model(**batch)
            spy.remove()
        calls = 4 if caught_inside else 3
        assert len(fired_on_layer0) == calls  # layer 0 (and the capture's hooks on it) ran in forward 3
        assert fw.pipeline is None
        assert _all_hooks(model) == before  # no hook of the capture is left on any module
    finally:
        bomb_handle.remove()

    store = ActivationStore(tmp_path / "acts")
    rows = int(keep.sum())
    complete = [0, 1, 3] if caught_inside else [0, 1]
    assert store.rows == len(complete) * rows
    ran_in_forward_3 = {"blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"}
    if where == "post":  # layer 1's sub-layers ran too; the block's own output hook did not
        ran_in_forward_3 |= {"blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"}
    assert set(rec) == {f"blocks.{i}.hook_{k}" for i in range(LAYERS) for k in ("attn_out", "mlp_out", "resid_post")}
    for name, refs in rec.items():
        if name in ran_in_forward_3:
            assert len(refs) == calls, name
            used = complete
        else:
            assert len(refs) == len(complete), name
            used = list(range(len(complete)))
        assert torch.equal(store[name][:], torch.cat([_real(refs[i], keep) for i in used])), name
    seq = store.tokens["sequence_id"][:].long().reshape(len(complete), rows)
    assert len({tuple(s.unique().tolist()) for s in seq}) == len(complete)  # every forward has new sequence ids
    # and the framework works again afterwards
    _capture(model, tmp_path / "again", InstrumentationConfig(granularity="residual"), batch)
    assert ActivationStore(tmp_path / "again").rows == rows


# ------------------------------------------------------------------ 7. analysis

def test_analyze_activations(tmp_path: Path) -> None:
    model = _model("gpt2")
    path = tmp_path / "acts"
    fw = InstrumentationFramework(InstrumentationConfig(granularity="all"))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(path):
        for seed in (1, 2, 3):
            model(**_batch("gpt2", seed=seed))
    report = fw.analyze_activations(path, top_k=5)
    store = ActivationStore(path)
    assert set(report["hooks"]) == set(store.hooks) == {f"blocks.{i}.hook_{k}" for i in range(LAYERS)
                                                        for k in ("attn_out", "mlp_out", "resid_post")}
    assert report["rows"] == store.rows == 75
    for name, h in report["hooks"].items():
        x = store[name][:].double()
        assert h["rows"] == 75 and h["dtype"] == "float32"
        assert math.isclose(h["norm_mean"], float(x.norm(dim=1).mean()), rel_tol=1e-6)
        assert math.isclose(h["mean_norm"], float(x.mean(0).norm()), rel_tol=1e-6)
        assert math.isclose(h["norm_max"], float(x.norm(dim=1).max()), rel_tol=1e-6)
        ratio = h["top_explained_variance_ratio"]
        assert len(ratio) == 5 and all(r >= 0 for r in ratio)
        assert all(a >= b for a, b in zip(ratio, ratio[1:])), ratio
        assert sum(ratio) <= 1 + 1e-9
        eig = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)
        assert math.isclose(ratio[0], float(eig[0] / eig.clamp_min(0).sum()), rel_tol=1e-6)


# ------------------------------------------------------------------ 8. tuple / ModelOutput outputs

class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.lin(x), None


class _ModelOutputOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> Any:
        return T.modeling_outputs.BaseModelOutput(last_hidden_state=self.lin(x).tanh())


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.pair_out = _TupleOut()
        self.model_out = _ModelOutputOut()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self.pair_out(self.embed(input_ids))
        return self.model_out(h).last_hidden_state


def test_tuple_and_model_output_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Wrapper().eval()
    batch = _batch("llama")
    keep = batch["attention_mask"].bool()
    fw = InstrumentationFramework(InstrumentationConfig(hooks="*_out"))
    fw.instrument_model(model)
    assert [hp.name for hp in fw.hook_points] == ["pair_out", "model_out"]
    with _recording(model, {"pair_out": ("pair_out", False), "model_out": ("model_out", False)}) as rec, \
            torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"])  # input_ids positionally
    store = ActivationStore(tmp_path / "acts")
    assert set(store.hooks) == {"pair_out", "model_out"}
    assert store.rows == int(keep.sum())
    for name in ("pair_out", "model_out"):
        (ref,) = rec[name]
        assert store[name].shape == (store.rows, 16)
        assert torch.equal(store[name][:], _real(ref, keep)), name
    assert torch.equal(store.tokens["input_ids"][:].long(), batch["input_ids"][keep])
