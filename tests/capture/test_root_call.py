"""What the capture reads from the root call of the model: decode steps of a KV-cached
generation (whatever name the cache goes by) and the attention mask (by keyword or position)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_llm_inst import ActivationStore, InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.models import tiny_model

B, T, VOCAB = 3, 6, 50


class Toy(nn.Module):
    """A root module whose forward takes what transformers' models take, under the names
    different releases have used; one hook point (``block``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.block = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, cache_position: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.block(self.embed(input_ids))


class Cache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    return ids, mask


def _decode_call(signal: str, k: int, mask: torch.Tensor, true_len: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments of decode step ``k`` (1-based) carrying only ``signal``."""
    cached = T + k - 1
    if signal == "mask":
        return {"attention_mask": torch.cat([mask, torch.ones(B, k, dtype=torch.long)], dim=1)}
    if signal == "cache_object":
        return {"past_key_values": Cache(cached)}
    if signal == "cache_object_new_name":
        return {"cache": Cache(cached)}
    if signal == "legacy_tuple":
        kv = torch.zeros(B, 2, cached, 4)
        return {"past_key_values": ((kv, kv), (kv, kv))}
    if signal == "cache_position":
        return {"cache_position": torch.tensor([cached])}
    if signal == "position_ids":
        return {"position_ids": (true_len + k - 1).unsqueeze(1)}
    raise AssertionError(signal)


def _prefill_call(signal: str) -> dict[str, Any]:
    if signal == "cache_object":
        return {"past_key_values": Cache(0)}
    if signal == "cache_object_new_name":
        return {"cache": Cache(0)}
    if signal == "legacy_tuple":
        return {"past_key_values": ()}
    if signal == "cache_position":
        return {"cache_position": torch.arange(T)}
    if signal == "position_ids":
        return {"position_ids": torch.arange(T).expand(B, T)}
    return {}


SIGNALS = ["mask", "cache_object", "cache_object_new_name", "legacy_tuple", "cache_position", "position_ids"]


@pytest.mark.parametrize("signal", SIGNALS)
def test_decode_steps_are_found_from_any_one_signal(tmp_path: Path, signal: str) -> None:
    """Prefill then 3 decode steps; each step tells it continues the prefill by one signal only.
    Every decode row keeps its prompt's sequence id, counts up ``step`` and has its true
    position (real prompt tokens + tokens generated before it)."""
    model = Toy().eval()
    ids, mask = _prompt()
    true_len = mask.sum(-1)
    fw = InstrumentationFramework(InstrumentationConfig(hooks="block"))
    fw.instrument_model(model)
    steps = 3
    fed = []
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        model(ids, mask, **_prefill_call(signal))  # ids and mask positionally
        for k in range(1, steps + 1):
            tok = torch.randint(3, VOCAB, (B, 1), generator=torch.Generator().manual_seed(10 + k))
            fed.append(tok[:, 0])
            model(input_ids=tok, **_decode_call(signal, k, mask, true_len))
        model(ids, attention_mask=mask)  # a new prompt: new sequences, step 0
    store = ActivationStore(tmp_path / "acts")
    prefill = int(mask.sum())
    assert store.rows == 2 * prefill + B * steps
    tok = {k: store.tokens[k][:].long() for k in ("input_ids", "sequence_id", "position", "step")}
    keep = mask.bool()
    row_of = torch.arange(B).unsqueeze(1).expand(B, T)[keep]
    prompt_seq = torch.stack([tok["sequence_id"][:prefill][row_of == b].unique() for b in range(B)]).reshape(-1)
    assert prompt_seq.unique().numel() == B
    assert torch.equal(tok["position"][:prefill], (mask.cumsum(-1) - 1)[keep])
    for k in range(1, steps + 1):
        sl = slice(prefill + B * (k - 1), prefill + B * k)
        assert tok["step"][sl].tolist() == [k] * B, (signal, k)
        assert torch.equal(tok["sequence_id"][sl], prompt_seq), (signal, k)
        assert torch.equal(tok["position"][sl], true_len + k - 1), (signal, k)
        assert torch.equal(tok["input_ids"][sl], fed[k - 1]), (signal, k)
    again = slice(prefill + B * steps, None)
    assert tok["step"][again].eq(0).all()
    assert not set(tok["sequence_id"][again].tolist()) & set(prompt_seq.tolist())


def test_manual_decode_loop_with_the_models_own_cache(tmp_path: Path) -> None:
    """A hand-written greedy loop over a transformers model, feeding the cache back without a
    mask, under whatever keyword this transformers release names it: decode rows are stored with
    their step, sequence id and true position, and the values the model computed."""
    model = tiny_model("llama")
    ids, mask = _prompt()
    mask[:] = 1  # the loop passes no mask later, so the prompt has no padding
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    name = "blocks.1.hook_resid_post"
    seen: list[torch.Tensor] = []
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    fw = InstrumentationFramework(InstrumentationConfig(hooks=name))
    fw.instrument_model(model)
    steps = 3
    try:
        with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
            out = model(input_ids=ids, use_cache=True)
            cache = out[cache_kw] if cache_kw in out else out.past_key_values
            fed = []
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
                fed.append(nxt[:, 0])
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
                cache = out[cache_kw] if cache_kw in out else out.past_key_values
    finally:
        handle.remove()
    store = ActivationStore(tmp_path / "acts")
    assert store.rows == B * T + B * steps
    tok = {k: store.tokens[k][:].long() for k in ("input_ids", "sequence_id", "position", "step")}
    got = store[name][:]
    assert torch.equal(got[: B * T], seen[0].reshape(B * T, -1))
    prompt_seq = tok["sequence_id"][: B * T : T]
    for k in range(1, steps + 1):
        sl = slice(B * T + B * (k - 1), B * T + B * k)
        assert tok["step"][sl].tolist() == [k] * B
        assert torch.equal(tok["sequence_id"][sl], prompt_seq)
        assert tok["position"][sl].tolist() == [T + k - 1] * B
        assert torch.equal(tok["input_ids"][sl], fed[k - 1])
        assert torch.equal(got[sl], seen[k][:, 0])


# ------------------------------------------------------------------ the attention mask

PAD = 0  # models.tiny_model's pad_token_id (bos 1, eos 2)


def _padded(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 3 x 9, rows 1 and 2 left-padded with PAD."""
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


class Caller(nn.Module):
    """A wrapper that calls the model with the mask positionally (as some pipelines do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        return self.inner(ids, mask)


def _reference(model: nn.Module, run: Any) -> torch.Tensor:
    """The output of the last block while ``run()`` executes, by a plain forward hook."""
    seen: list[torch.Tensor] = []
    h = model.model.layers[1].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        run()
    finally:
        h.remove()
    (out,) = seen
    return out


@pytest.mark.parametrize("how", ["positional", "wrapper_calls_model", "wrapper_instrumented"])
def test_mask_passed_positionally_or_through_a_wrapper_keeps_padding_out(tmp_path: Path, how: str) -> None:
    model = tiny_model("llama")
    wrapper = Caller(model).eval()
    ids, mask = _padded()
    keep = mask.bool()
    name = "blocks.1.hook_resid_post"
    target = wrapper if how == "wrapper_instrumented" else model
    hook = f"inner.model.layers.1" if how == "wrapper_instrumented" else name
    fw = InstrumentationFramework(InstrumentationConfig(hooks=hook))
    fw.instrument_model(target)

    def run() -> None:
        with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
            if how == "positional":
                model(ids, mask)
            else:
                wrapper(ids, mask)

    ref = _reference(model, run)
    store = ActivationStore(tmp_path / "acts")
    assert store.rows == int(mask.sum())
    (stored,) = store.hooks
    assert torch.equal(store[stored][:], ref[keep])
    assert torch.equal(store.tokens["input_ids"][:].long(), ids[keep])
    assert torch.equal(store.tokens["position"][:].long(), (mask.cumsum(-1) - 1)[keep])


def test_padded_batch_without_a_mask_is_refused_and_include_padding_stores_every_position(tmp_path: Path) -> None:
    model = tiny_model("llama")
    ids, mask = _padded()
    fw = InstrumentationFramework(InstrumentationConfig(hooks="blocks.1.hook_resid_post"))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        with pytest.raises(ValueError) as err:
            model(ids)
        model(ids, mask)  # the capture goes on
    msg = str(err.value)
    assert "\n" not in msg
    assert "attention_mask" in msg and "include_padding=True" in msg and "pad token id 0" in msg
    assert ActivationStore(tmp_path / "acts").rows == int(mask.sum())  # the refused forward stored nothing

    fw = InstrumentationFramework(InstrumentationConfig(hooks="blocks.1.hook_resid_post", include_padding=True))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "all"):
        model(ids)
    store = ActivationStore(tmp_path / "all")
    assert store.rows == ids.numel()
    assert torch.equal(store.tokens["input_ids"][:].long(), ids.reshape(-1))


@pytest.mark.parametrize("case", ["pad_is_bos_at_start", "pad_is_eos_inside", "user_pad_id", "no_pad_in_config"])
def test_unpadded_batches_without_a_mask_are_not_refused(tmp_path: Path, case: str) -> None:
    """Pad ids that are also BOS / EOS are padding only where padding sits (twice at a row's
    start, or at its end); a model with no pad id configured is never refused."""
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(4))
    cfg: dict[str, Any] = {}
    if case == "pad_is_bos_at_start":
        model = tiny_model("llama", pad_token_id=1)
        ids[:, 0] = 1  # every row starts with its BOS
    elif case == "pad_is_eos_inside":
        model = tiny_model("llama", pad_token_id=2)
        ids[:, 4] = 2  # an EOS between two documents
    elif case == "user_pad_id":
        model = tiny_model("llama")
        ids[:, 0] = PAD  # the config's pad id, but the user says the inputs are padded with 7
        cfg["pad_token_id"] = 7
    else:
        model = tiny_model("llama", pad_token_id=None)
        model.generation_config.pad_token_id = None
        ids[:, 0] = PAD
    fw = InstrumentationFramework(InstrumentationConfig(hooks="blocks.1.hook_resid_post", **cfg))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        model(ids)
    assert ActivationStore(tmp_path / "acts").rows == ids.numel()
    if case == "user_pad_id":
        fw = InstrumentationFramework(InstrumentationConfig(hooks="blocks.1.hook_resid_post", pad_token_id=7))
        fw.instrument_model(model)
        with torch.no_grad(), fw.capture_activations(tmp_path / "seven"), pytest.raises(ValueError, match="token id 7"):
            model(ids.masked_fill(torch.arange(9) < 2, 7))
