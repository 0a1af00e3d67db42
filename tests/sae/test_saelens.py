"""SAELens export: sae-lens loads what we write with the same outputs; we load ours and theirs back."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder
from lightning_llm_inst.sae.saelens import load_saelens, save_saelens

ARCHS = ("topk", "batchtopk", "relu", "jumprelu")
D_IN, D_SAE = 24, 80


def trained_sae(arch: str, seed: int = 0) -> SparseAutoencoder:
    """A briefly trained SAE whose scaling factor, biases and thresholds are all away from their defaults."""
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=6, hook_name="blocks.2.hook_resid_post",
                    model_name="tiny-llama", jumprelu_init_threshold=0.3)
    sae = SparseAutoencoder(cfg)

    def data(n: int) -> torch.Tensor:  # raw units, far from mean norm sqrt(d_in)
        return 30.0 * torch.randn(n, D_IN) + 5.0

    sae.initialize_from_data(data(1024))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.train()
    for _ in range(15):
        out = sae.training_loss(data(128), dead_mask=torch.arange(D_SAE) >= D_SAE - 10)
        opt.zero_grad()
        out["loss"].backward()
        sae.remove_parallel_gradients()
        opt.step()
        sae.normalize_decoder()
    return sae.eval()


def inputs(n: int = 64) -> torch.Tensor:
    return 30.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(99)) + 5.0


def assert_same_outputs(ours: SparseAutoencoder, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        latents, expected_latents = theirs.encode(x), ours.encode(x)
        assert torch.equal(latents > 0, expected_latents > 0)
        torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(expected_latents), ours.decode(expected_latents), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(theirs(x), ours(x).reconstruction, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_our_export(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_sae(arch)
    assert float(sae.scaling_factor) < 0.5  # the export must fold it
    save_saelens(sae, tmp_path / "sae")
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "sae_weights.safetensors"]
    loaded = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    expected_cls = {"topk": "TopKSAE", "relu": "StandardSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}
    assert type(loaded).__name__ == expected_cls[arch]
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert loaded.cfg.metadata.model_name == "tiny-llama"
    assert_same_outputs(sae, loaded, inputs())


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(arch, tmp_path):
    sae = trained_sae(arch, seed=1)
    back = load_saelens(save_saelens(sae, tmp_path))
    assert back.cfg == sae.cfg
    assert torch.isclose(back.scaling_factor, sae.scaling_factor)
    for name, value in sae.state_dict().items():
        if name == "threshold_updates":  # batchtopk bookkeeping: loading marks the threshold as estimated
            continue
        torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x).reconstruction, sae(x).reconstruction, rtol=1e-5, atol=1e-4)


def _their_sae(sae_lens, cfg: dict, seed: int):
    """A sae-lens SAE with every weight random (their init leaves biases and thresholds at zero)."""
    torch.manual_seed(seed)
    sae = sae_lens.SAE.from_dict(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 if name == "threshold" else torch.randn_like(p) * 0.3)
    return sae


@pytest.mark.parametrize("arch, extra", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": 5}),
    ("jumprelu", {}),
])
def test_load_files_written_by_sae_lens(arch, extra, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "metadata": {"hook_name": "blocks.0.hook_mlp_out", "model_name": "gpt2"}, **extra}
    theirs = _their_sae(sae_lens, cfg, seed=3)
    theirs.save_model(tmp_path)
    ours = load_saelens(tmp_path)
    assert ours.cfg.architecture == {"standard": "relu"}.get(arch, arch)
    assert ours.cfg.hook_name == "blocks.0.hook_mlp_out" and not ours.cfg.normalize_activations
    if arch == "topk":
        assert ours.cfg.k == 5
    assert_same_outputs(ours, theirs, torch.randn(64, D_IN))


def test_load_sae_lens_training_checkpoints(tmp_path):
    """TopK trained with decoder-norm rescaling, and BatchTopK with its running threshold."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(4)
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True))
    batch = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5))
    for sae in (topk, batch):
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    batch.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    x = torch.randn(64, D_IN)

    topk.save_model(tmp_path / "topk")
    ours = load_saelens(tmp_path / "topk")
    assert ours.cfg.architecture == "topk"
    assert_same_outputs(ours, topk.eval(), x)

    batch.save_model(tmp_path / "batchtopk")
    ours = load_saelens(tmp_path / "batchtopk")
    assert ours.cfg.architecture == "batchtopk" and torch.isclose(ours.threshold, torch.tensor(0.4))
    batch.save_inference_model(tmp_path / "batchtopk-inference")  # what sae-lens deploys: a JumpReLU SAE
    deployed = sae_lens.SAE.load_from_disk(tmp_path / "batchtopk-inference")
    assert_same_outputs(ours, deployed, x)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)
    save_saelens(trained_sae("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["lightning_llm_inst"]
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture='gated' is not supported"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match="do not match a jumprelu SAE"):  # no threshold tensor
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        load_saelens(tmp_path)
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        save_saelens({"W_enc": torch.zeros(1)}, tmp_path)  # type: ignore[arg-type]
