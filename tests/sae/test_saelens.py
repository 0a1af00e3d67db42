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
    with pytest.raises(ValueError, match="architecture='gated' is not valid; expected one of batchtopk, jumprelu"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match=r"tensors=.*missing \['threshold'\]"):  # no threshold tensor
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        load_saelens(tmp_path)
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        save_saelens({"W_enc": torch.zeros(1)}, tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- untrusted files
def _directory(tmp_path, ours: bool, arch: str = "topk"):
    """An exported SAE, as ours (our metadata) or as sae-lens alone would describe it."""
    path = save_saelens(trained_sae(arch), tmp_path / ("ours" if ours else "theirs"))
    cfg = json.loads((path / "cfg.json").read_text())
    if not ours:
        del cfg["metadata"]["lightning_llm_inst"]
    return path, cfg


def _write(path, cfg=None, tensors=None):
    from safetensors.torch import save_file

    if cfg is not None:
        (path / "cfg.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(path / "sae_weights.safetensors"))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "sae_weights.safetensors"))


@pytest.fixture
def no_allocation(monkeypatch):
    """``no_allocation()`` makes building an SAE fail the test: a bad file must be refused before its
    parameters exist (call it once the directory is written)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("an SAE was allocated before the file was checked")
    return lambda: monkeypatch.setattr(SparseAutoencoder, "__init__", refuse)


@pytest.mark.parametrize("ours", [False, True])
def test_a_huge_d_sae_with_small_weights_fails_before_anything_is_allocated(ours, tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours)
    no_allocation()
    cfg["d_sae"] = 100_000_000  # W_enc alone would be 24 x 1e8 float32 = 9.6 GB
    if ours:
        cfg["metadata"]["lightning_llm_inst"]["config"]["d_sae"] = 100_000_000
    _write(path, cfg)
    with pytest.raises(ValueError) as info:
        load_saelens(path)
    message = str(info.value)
    assert "\n" not in message and str(path / "sae_weights.safetensors") in message
    assert f"W_enc.shape=[{D_IN}, {D_SAE}] is not valid; expected [{D_IN}, 100000000]" in message
    assert "d_sae=100000000 (cfg.json)" in message


@pytest.mark.parametrize("value, shown", [(0, "0"), (-2.0, "-2.0"), (float("nan"), "nan"), (float("inf"), "inf"),
                                          (True, "True"), ("1", "'1'")])
def test_a_scaling_factor_that_is_not_a_positive_finite_number_is_refused(value, shown, tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours=True)
    no_allocation()
    cfg["metadata"]["lightning_llm_inst"]["scaling_factor"] = value
    _write(path, cfg)
    with pytest.raises(ValueError, match=rf"cfg.json: metadata.lightning_llm_inst.scaling_factor={shown} is not "
                                         r"valid; expected a finite number > 0$"):
        load_saelens(path)


@pytest.mark.parametrize("field, value, expected", [
    ("k", 2.5, "an integer in [1, d_sae=80] for architecture='topk'"),
    ("k", "6", "an integer in [1, d_sae=80]"),
    ("k", True, "an integer in [1, d_sae=80]"),
    ("k", 0, "an integer in [1, d_sae=80]"),
    ("k", 81, "an integer in [1, d_sae=80]"),
    ("k", float("nan"), "an integer in [1, d_sae=80]"),
    ("d_in", 24.0, "a positive integer"),
    ("d_in", -24, "a positive integer"),
    ("d_sae", None, "a positive integer"),
    ("dtype", "int8", "one of float32, float64, float16, bfloat16"),
    ("architecture", "gated", "one of batchtopk, jumprelu, standard, topk"),
    ("apply_b_dec_to_input", "yes", "true or false"),
])
def test_bad_config_fields_are_refused_with_one_line(field, value, expected, tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours=False)
    no_allocation()
    cfg[field] = value
    _write(path, cfg)
    with pytest.raises(ValueError) as info:
        load_saelens(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path / 'cfg.json'}: {field}=")
    assert message.endswith(f"is not valid; expected {expected}") or f"expected {expected}" in message


def test_a_missing_field_is_named(tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours=False)
    no_allocation()
    del cfg["k"]
    _write(path, cfg)
    with pytest.raises(ValueError, match=r"cfg.json: k=None is not valid; expected a positive integer for "
                                         r"architecture='topk' \(the field is missing\)"):
        load_saelens(path)


@pytest.mark.parametrize("ours", [False, True])
def test_missing_extra_or_misshapen_tensors_are_refused(ours, tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours)
    no_allocation()
    good = _tensors(path)
    weights = str(path / "sae_weights.safetensors")
    _write(path, tensors={k: v for k, v in good.items() if k != "b_dec"})
    with pytest.raises(ValueError, match=r"tensors=\['W_dec', 'W_enc', 'b_enc'\] is not valid; expected a topk "
                                         r"SAE's tensors \['W_dec', 'W_enc', 'b_dec', 'b_enc'\]; missing \['b_dec'\]"):
        load_saelens(path)
    _write(path, tensors={**good, "W_gate": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \['W_gate'\]"):
        load_saelens(path)
    _write(path, tensors={**good, "W_dec": good["W_dec"].T.contiguous()})
    with pytest.raises(ValueError) as info:
        load_saelens(path)
    assert str(info.value) == (f"{weights}: W_dec.shape=[{D_IN}, {D_SAE}] is not valid; expected [{D_SAE}, {D_IN}] "
                               f"for d_in={D_IN}, d_sae={D_SAE} (cfg.json)")
    _write(path, tensors={**good, "b_enc": good["b_enc"].to(torch.int32)})
    with pytest.raises(ValueError, match=r"b_enc.dtype='I32' is not valid; expected a floating-point dtype"):
        load_saelens(path)
    nan = good["W_enc"].clone()
    nan[3, 5] = float("nan")
    _write(path, tensors={**good, "W_enc": nan})
    with pytest.raises(ValueError, match=r"W_enc='NaN or inf values' is not valid; expected finite values"):
        load_saelens(path)


def test_our_metadata_must_agree_with_the_fields_sae_lens_reads(tmp_path, no_allocation):
    path, cfg = _directory(tmp_path, ours=True)
    no_allocation()
    _write(path, {**cfg, "d_in": D_IN + 1})
    with pytest.raises(ValueError, match=rf"cfg.json: d_in={D_IN + 1} is not valid; expected {D_IN}, as in "
                                         r"metadata.lightning_llm_inst.config"):
        load_saelens(path)
    _write(path, {**cfg, "architecture": "standard"})
    with pytest.raises(ValueError, match=r"architecture='standard' is not valid; expected 'topk' for our 'topk'"):
        load_saelens(path)
    bad = json.loads(json.dumps(cfg))
    bad["metadata"]["lightning_llm_inst"]["config"]["k"] = 2.5
    _write(path, bad)
    with pytest.raises(ValueError, match=r"cfg.json: metadata.lightning_llm_inst.config: SAEConfig.k=2.5 is not valid"):
        load_saelens(path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path, no_allocation):
    path, _ = _directory(tmp_path, ours=True)
    no_allocation()
    torch.save({"W_enc": torch.zeros(2)}, path / "sae_weights.safetensors")  # a pickle under the expected name
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: not a safetensors file"):
        load_saelens(path)
    (path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg.json: not valid JSON"):
        load_saelens(path)
