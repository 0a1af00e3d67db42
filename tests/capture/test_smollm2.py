"""On real weights (SmolLM2-135M-Instruct, CPU): what the store holds is exactly what the
model computed, for padded batches and for generate() with a KV cache."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst import HookGranularity, InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.store import ActivationStore

models = pytest.importorskip("lightning_llm_inst.models")


def _direct(model, names, run):
    """Record module outputs with plain forward hooks while ``run()`` executes."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: got[n].append(
        (o[0] if isinstance(o, tuple) else o).detach().clone())) for n in names]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return got, out


def test_padded_batch_matches_the_models_own_activations(tmp_path, smollm2):
    model, tok = smollm2
    texts = models.corpus_texts(3)
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=40, padding_side="right")
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch should contain padding"
    fw = InstrumentationFramework(InstrumentationConfig(granularity=HookGranularity.ALL, layers=[0, 7, 28, 29]))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "s"):
        hidden = model(**batch, output_hidden_states=True).hidden_states
    with torch.no_grad():
        direct, _ = _direct(model, ["model.layers.29", "model.layers.7.self_attn", "model.layers.7.mlp"],
                            lambda: model(**batch))
    valid = mask.reshape(-1).bool()
    store = ActivationStore(tmp_path / "s")
    assert store.rows == int(mask.sum())
    for layer in (0, 7, 28):  # hidden_states[i + 1] is block i's output (the last one is normed)
        want = hidden[layer + 1].reshape(-1, 576)[valid]
        assert torch.equal(store[f"blocks.{layer}.hook_resid_post"][:], want), layer
    assert torch.equal(store["blocks.29.hook_resid_post"][:], direct["model.layers.29"][0].reshape(-1, 576)[valid])
    assert torch.equal(store["blocks.7.hook_attn_out"][:], direct["model.layers.7.self_attn"][0].reshape(-1, 576)[valid])
    assert torch.equal(store["blocks.7.hook_mlp_out"][:], direct["model.layers.7.mlp"][0].reshape(-1, 576)[valid])
    assert store["blocks.0.hook_resid_post"].dtype == torch.float32
    assert torch.equal(store.tokens["input_ids"][:], batch["input_ids"].reshape(-1)[valid])
    pos = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])
    assert torch.equal(store.tokens["position"][:], pos)
    assert torch.equal(store.tokens["sequence_id"][:], torch.cat([torch.full((int(n),), i) for i, n in
                                                                   enumerate(mask.sum(1))]))
    assert store.metadata["model"]["config"]["num_hidden_layers"] == 30


def test_generate_with_kv_cache_stores_prefill_and_every_step(tmp_path, smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "Name three colours of the rainbow:"]
    batch = tok(prompts, return_tensors="pt", padding=True)  # left padding
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, use_cache=True)
    fw = InstrumentationFramework(InstrumentationConfig(hooks=["blocks.3.hook_resid_post", "blocks.3.hook_mlp_out"]))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "g"):
        out = model.generate(**batch, **kwargs)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)
    with torch.no_grad():
        direct, out2 = _direct(model, ["model.layers.3", "model.layers.3.mlp"], lambda: model.generate(**batch, **kwargs))
    assert torch.equal(out, out2)
    store = ActivationStore(tmp_path / "g")
    mask = batch["attention_mask"]
    n_prompt = int(mask.sum())
    assert store.rows == n_prompt + 2 * 5  # prefill + 5 decode steps (the 6th token needs no forward)
    steps = store.tokens["step"][:]
    assert torch.equal(steps, torch.cat([torch.zeros(n_prompt, dtype=torch.long),
                                         torch.arange(1, 6).repeat_interleave(2)]))
    # positions continue after each prompt's true length; sequence ids stay with their prompt
    lengths = mask.sum(1)
    dec_pos = store.tokens["position"][:][n_prompt:].reshape(5, 2)
    assert torch.equal(dec_pos, lengths.unsqueeze(0) + torch.arange(5).unsqueeze(1))
    assert torch.equal(store.tokens["sequence_id"][:][n_prompt:].reshape(5, 2), torch.tensor([[0, 1]] * 5))
    assert torch.equal(store.tokens["input_ids"][:][n_prompt:].reshape(5, 2), out[:, -6:-1].T)
    for hook, name in (("blocks.3.hook_resid_post", "model.layers.3"), ("blocks.3.hook_mlp_out", "model.layers.3.mlp")):
        prefill = direct[name][0].reshape(-1, 576)[mask.reshape(-1).bool()]
        decode = torch.cat([d.reshape(-1, 576) for d in direct[name][1:]])
        assert torch.equal(store[hook][:], torch.cat([prefill, decode])), hook
