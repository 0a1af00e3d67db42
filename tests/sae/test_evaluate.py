"""Splicing an SAE into a model: a perfect SAE costs nothing, a zero SAE costs what ablation costs,
padding never counts, and the model is left exactly as it was."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch

from lightning_llm_inst import models
from lightning_llm_inst.sae.evaluate import evaluate_sae
from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder

D = 64  # hidden size of models.tiny_model


def identity_sae(d: int, hook_name: str | None = None) -> SparseAutoencoder:
    """A ReLU SAE with latents [relu(x), relu(-x)] and decoder [I; -I]: it reconstructs x exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=hook_name))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d_in, d_sae]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [d_sae, d_in]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int) -> SparseAutoencoder:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def llama():
    return models.tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (5, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[3, :11] = 0
    return ids, mask


def _hooks(model: torch.nn.Module) -> list[tuple[str, list, list]]:
    return [(n, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
            for n, m in model.named_modules()]


def _no_hooks(model: torch.nn.Module, before: list | None = None) -> bool:
    """No hook left behind: none at all, or the same ones as ``before`` (transformers installs
    hooks of its own on a model that ran with ``output_hidden_states``)."""
    if before is not None:
        return _hooks(model) == before
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_resid_pre"])
def test_identity_sae_recovers_everything_and_zero_sae_nothing(llama, batch, hook):
    # resid_post: a plain tensor output; attn_out: a tuple (output, weights); resid_pre: a pre-hook
    ids, mask = batch
    before = llama(input_ids=ids, attention_mask=mask).logits
    ident = evaluate_sae(llama, identity_sae(D), hook, input_ids=ids, attention_mask=mask, batch_size=2)
    assert ident["ce_loss_zero"] != pytest.approx(ident["ce_loss_clean"], abs=1e-4)  # ablation matters
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert ident["ce_loss_spliced"] == pytest.approx(ident["ce_loss_clean"], abs=1e-5)
    assert abs(ident["kl_div"]) < 1e-6 < ident["kl_div_zero"]
    assert ident["fvu"] < 1e-10 and ident["mse"] < 1e-10
    assert ident["l0"] > 0

    zero = evaluate_sae(llama, zero_sae(D), hook, input_ids=ids, attention_mask=mask, batch_size=2)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert zero["ce_loss_spliced"] == pytest.approx(zero["ce_loss_zero"], abs=1e-5)
    assert zero["kl_div"] == pytest.approx(zero["kl_div_zero"], rel=1e-4)
    assert zero["fvu"] >= 1.0
    # the model is untouched: no hooks left, same outputs
    assert _no_hooks(llama)
    assert torch.equal(llama(input_ids=ids, attention_mask=mask).logits, before)


def test_padding_is_neither_spliced_nor_scored(llama, batch):
    ids, mask = batch
    keep_all = {"exclude_bos": False, "exclude_special_tokens": False}
    result = evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post", input_ids=ids, attention_mask=mask,
                          **keep_all)
    assert result["tokens"] == mask.sum()
    assert result["predicted_tokens"] == (mask.sum(1) - 1).sum()
    # the clean loss is the model's own loss on each unpadded sequence, weighted by its predicted tokens
    total = 0.0
    with torch.no_grad():
        for row, m in zip(ids, mask):
            real = row[m.bool()][None]
            total += float(llama(input_ids=real, labels=real).loss) * (real.shape[1] - 1)
    assert result["ce_loss_clean"] == pytest.approx(total / result["predicted_tokens"], rel=1e-5)
    # batches as dicts give the same numbers as input_ids=
    dicts = [{"input_ids": ids[a:a + 2], "attention_mask": mask[a:a + 2]} for a in range(0, 5, 2)]
    again = evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post", dicts, **keep_all)
    assert again == pytest.approx(result, rel=1e-6, abs=1e-9)
    first = evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post", iter(dicts), max_batches=1, **keep_all)
    assert first["tokens"] == mask[:2].sum()


def test_exclude_bos_leaves_first_real_token_unspliced(llama, batch):
    ids, mask = batch
    hook = "blocks.0.hook_resid_post"
    full = evaluate_sae(llama, zero_sae(D), hook, input_ids=ids, attention_mask=mask, exclude_bos=False)
    no_bos = evaluate_sae(llama, zero_sae(D), hook, input_ids=ids, attention_mask=mask)  # the default
    assert no_bos["tokens"] == full["tokens"] - ids.shape[0] and no_bos["excluded_tokens"] == ids.shape[0]
    assert no_bos["predicted_tokens"] == full["predicted_tokens"]
    assert no_bos["ce_loss_clean"] == pytest.approx(full["ce_loss_clean"], rel=1e-6)
    assert no_bos["ce_loss_spliced"] != pytest.approx(full["ce_loss_spliced"], rel=1e-6)


def _noisy_sae(d: int, seed: int = 0) -> SparseAutoencoder:
    """The identity SAE with a perturbed decoder: a reconstruction error that is not zero."""
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.add_(0.2 * torch.randn(sae.W_dec.shape, generator=torch.Generator().manual_seed(seed)))
    return sae


def _naive_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_fvu_leaves_out_first_and_special_tokens_and_fvu_all_tokens_keeps_them(llama, batch):
    ids, mask = batch
    ids = ids.clone()
    ids[1, 5], ids[2, 9] = 2, 1  # eos and bos ids of the tiny config inside the text
    ids[4, 0] = 2  # ... one as a first token (left out once)
    ids[0, 3] = 2  # ... and one under the padding: never counted
    hook = "blocks.0.hook_resid_post"
    sae = _noisy_sae(D)
    result = evaluate_sae(llama, sae, hook, input_ids=ids, attention_mask=mask, batch_size=2)
    # naive reference: the hook point's activations of the clean run, the SAE applied row by row
    with torch.no_grad():
        copy = deepcopy(llama)  # output_hidden_states leaves transformers' own hooks on the model it runs
        h = copy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]  # [b, s, d]
        real = mask.bool()
        first = real & (real.long().cumsum(1) == 1)
        special = torch.isin(ids, torch.tensor([0, 1, 2]))  # pad, bos, eos of the tiny config
        kept = real & ~first & ~special
        recon = sae(h).reconstruction
    assert result["tokens"] == kept.sum() == real.sum() - 5 - 2  # 5 first tokens, 2 special ones after them
    assert result["excluded_tokens"] == 7
    assert result["fvu"] == pytest.approx(_naive_fvu(h[kept], recon[kept]), rel=1e-5)
    assert result["fvu_all_tokens"] == pytest.approx(_naive_fvu(h[real], recon[real]), rel=1e-5)
    assert result["mse"] == pytest.approx(float((recon[kept] - h[kept]).double().pow(2).mean()), rel=1e-5)
    # given ids replace the config's; with nothing left out both numbers agree
    only_bos = evaluate_sae(llama, sae, hook, input_ids=ids, attention_mask=mask, special_token_ids=[])
    assert only_bos["tokens"] == real.sum() - 5
    everything = evaluate_sae(llama, sae, hook, input_ids=ids, attention_mask=mask, exclude_bos=False,
                              exclude_special_tokens=False)
    assert everything["fvu"] == pytest.approx(everything["fvu_all_tokens"], rel=1e-9)
    assert everything["fvu"] == pytest.approx(result["fvu_all_tokens"], rel=1e-6)


def test_hook_name_comes_from_the_sae_config(llama, batch):
    ids, mask = batch
    named = evaluate_sae(llama, identity_sae(D, hook_name="blocks.1.hook_resid_post"), input_ids=ids,
                         attention_mask=mask)
    assert named["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="hook_name"):
        evaluate_sae(llama, identity_sae(D), input_ids=ids, attention_mask=mask)


def test_errors_leave_no_hook_behind(llama, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="d_in"):  # the SAE is too narrow for the residual stream
        evaluate_sae(llama, identity_sae(D // 2), "blocks.0.hook_resid_post", input_ids=ids, attention_mask=mask)
    assert _no_hooks(llama)
    assert not llama.training
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_sae(llama, identity_sae(D), "blocks.*.hook_resid_post", input_ids=ids)
    with pytest.raises(ValueError, match="batches"):
        evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post", input_ids=ids, batch_size=0)
    with pytest.raises(TypeError, match="batches"):
        evaluate_sae(llama, identity_sae(D), "blocks.0.hook_resid_post", [[1, 2, 3]])


@pytest.mark.slow
def test_smollm2_identity_and_zero_splice():
    try:
        models.smollm2_path()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    model, tok = models.load_smollm2(dtype=torch.float32)
    texts = models.corpus_texts(2)
    enc = tok([texts[0][:300], texts[1][:60]], return_tensors="pt", padding=True, truncation=True, max_length=24)
    hook = "blocks.5.hook_resid_post"
    d = model.config.hidden_size
    before = _hooks(model)  # the model is shared with other tests
    ident = evaluate_sae(model, identity_sae(d), hook, input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"], batch_size=4)
    zero = evaluate_sae(model, zero_sae(d), hook, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        batch_size=4)
    assert ident["ce_loss_zero"] > ident["ce_loss_clean"] + 1.0  # erasing the residual stream wrecks the model
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert ident["kl_div"] < 1e-4
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(zero["kl_div"]) and zero["kl_div"] > 1.0
    assert _no_hooks(model, before)
