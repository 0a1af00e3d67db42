"""SparseAutoencoder: feature recovery on planted data, shapes, decoder constraints, scaling, losses, config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_llm_inst.sae.model import SAEConfig, SAEOutput, SparseAutoencoder, geometric_median

D_IN = 32
ARCHS = ("topk", "batchtopk", "relu", "jumprelu")


def planted_sampler(n_features: int = 64, d_in: int = D_IN, seed: int = 1234):
    """Unit feature directions and a sampler of tokens: sparse non-negative mixes of them, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d_in, generator=g)
    features = features / features.norm(dim=1, keepdim=True)  # [n_features, d_in]
    offset = 0.5 * torch.randn(d_in, generator=g)

    def sample(n: int) -> torch.Tensor:
        active = torch.rand(n, n_features, generator=g) < 3 / n_features  # ~3 features per token
        coeff = active * (0.5 + torch.rand(n, n_features, generator=g))  # [n, n_features]
        return coeff @ features + offset + 0.01 * torch.randn(n, d_in, generator=g)  # [n, d_in]

    return features, sample


def train(sae: SparseAutoencoder, sample, steps: int, batch: int = 256, lr: float = 1e-2, dead_after: int = 2048):
    """A plain torch loop, as the Lightning module runs it: parallel-gradient removal, then renormalisation."""
    sae.initialize_from_data(sample(4096))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.cfg.d_sae)
    sae.train()
    for _ in range(steps):
        out = sae.training_loss(sample(batch), dead_mask=since_fired > dead_after)
        since_fired += batch
        since_fired[(out["latents"] > 0).any(dim=0)] = 0
        opt.zero_grad()
        out["loss"].backward()
        sae.remove_parallel_gradients()
        opt.step()
        sae.normalize_decoder()
    return sae.eval()


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box spinning threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RECOVERY = {
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "relu": {"l1_coefficient": 1.0},
    "jumprelu": {"l0_coefficient": 0.5},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_recovers_planted_features(arch, one_thread):
    torch.manual_seed(0)
    features, sample = planted_sampler()
    sae = train(SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=128, architecture=arch, **RECOVERY[arch])), sample, 1000)
    with torch.no_grad():
        best = (features @ sae.W_dec.T).max(dim=1).values  # [n_features] best cosine (decoder rows are unit norm)
        x = sample(2048)
        recon, latents = sae(x)
        fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((latents > 0).float().sum(-1).mean())
    recovered = float((best > 0.9).float().mean())
    print(f"{arch}: {recovered:.1%} of planted features recovered (min cos {best.min():.3f}), FVU {fvu:.3f}, L0 {l0:.2f}")
    assert recovered >= 0.9, f"{arch}: only {recovered:.1%} of features have a decoder row with cosine > 0.9"
    assert fvu < 0.35, f"{arch}: FVU {fvu:.3f}"
    if arch == "batchtopk":  # the learned threshold keeps about k latents per token at inference
        assert 1.5 <= l0 <= 6, l0


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_sparsity(arch):
    sae = SparseAutoencoder(SAEConfig(d_in=24, d_sae=40, architecture=arch, k=5))
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(2, 7, 24)
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.latents.shape == (2, 7, 40) and out.reconstruction.shape == (2, 7, 24)
    assert torch.equal(out.latents, sae.encode(x)) and torch.allclose(out.reconstruction, sae.decode(out.latents))
    assert (out.latents >= 0).all()
    if arch == "topk":
        assert ((out.latents > 0).sum(-1) <= 5).all()
    losses = sae.training_loss(x)
    assert losses["reconstruction"].shape == (2, 7, 24) and losses["latents"].shape == (2, 7, 40)
    assert torch.allclose(losses["loss"], losses["mse_loss"] + losses["sparsity_loss"] + losses["aux_loss"])
    if arch == "batchtopk":  # training keeps k * tokens latents over the whole batch
        assert int((losses["latents"] > 0).sum()) == 5 * 14
    else:
        assert torch.allclose(losses["reconstruction"], out.reconstruction, atol=1e-5)
    with pytest.raises(ValueError, match="d_in=24"):
        sae.encode(torch.randn(3, 25))


def test_decoder_rows_unit_norm():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=48))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) * 5 + 0.1)
    direction = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.allclose(sae.W_dec, direction)


def test_remove_parallel_gradients():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=48, architecture="relu"))
    sae.training_loss(torch.randn(64, 16))["loss"].backward()
    grad = sae.W_dec.grad.clone()
    assert (grad * sae.W_dec).sum(dim=1).abs().max() > 1e-4  # there is something to remove
    sae.remove_parallel_gradients()
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    expected = grad - (grad * unit).sum(dim=1, keepdim=True) * unit
    assert torch.allclose(sae.W_dec.grad, expected, atol=1e-6)
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-5


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, arch: str, k: int):
    """What an SAELens-style SAE computes from raw activations with the exported weights."""
    pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    if arch == "topk":
        values, idx = pre.topk(k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    elif arch == "relu":
        latents = pre.relu()
    else:
        latents = pre.relu() * (pre > state["threshold"])
    return latents @ state["W_dec"] + state["b_dec"], latents


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_state_dict_folds_scaling(arch):
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture=arch, k=4))
    raw = 40.0 * torch.randn(512, 16) + 7.0  # far from mean norm sqrt(d_in)
    sae.initialize_from_data(raw)
    assert math.isclose(float((raw * sae.scaling_factor).norm(dim=-1).mean()), 4.0, rel_tol=1e-4)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(torch.rand_like(sae.threshold))
    state = sae.saelens_state_dict()
    expected_keys = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch in ("jumprelu", "batchtopk") else set())
    assert set(state) == expected_keys
    if "threshold" in state:
        assert state["threshold"].shape == (32,)
    x = 40.0 * torch.randn(64, 16) + 7.0
    ref_recon, ref_latents = _reference_forward(state, x, arch, 4)
    recon, latents = sae(x)
    assert torch.allclose(latents, ref_latents, atol=1e-4)
    assert torch.allclose(recon, ref_recon, rtol=1e-4, atol=1e-3)


def test_geometric_median_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    points = torch.cat([torch.randn(9, 2, generator=g), torch.tensor([[8.0, -6.0], [9.0, 7.0]])])  # two outliers

    def cost(y: torch.Tensor) -> torch.Tensor:  # y [..., 2] -> sum of distances [...]
        return (points - y[..., None, :]).norm(dim=-1).sum(-1)

    axis = torch.linspace(-3, 3, 1201)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)  # [1201, 1201, 2]
    costs = cost(grid)
    best = grid.reshape(-1, 2)[costs.argmin()]
    median = geometric_median(points)
    assert cost(median) <= costs.min() + 1e-6
    assert (median - best).norm() < 2 * (axis[1] - axis[0]) * math.sqrt(2)
    assert (median - points.mean(0)).norm() > 0.5  # the outliers pull the mean, not the median


@pytest.mark.parametrize("init", ["geometric_median", "mean", "zeros"])
def test_initialize_b_dec(init):
    x = torch.cat([torch.randn(500, 8) + 3.0, torch.full((20, 8), 100.0)])
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=4, b_dec_init=init))
    sae.initialize_from_data(x)
    scaled = x * sae.scaling_factor
    expected = {"geometric_median": geometric_median(scaled), "mean": scaled.mean(0), "zeros": torch.zeros(8)}[init]
    assert torch.allclose(sae.b_dec, expected, atol=1e-5)
    unscaled = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=4, normalize_activations=False))
    unscaled.initialize_from_data(x)
    assert float(unscaled.scaling_factor) == 1.0
    with pytest.raises(ValueError, match="d_in=8"):
        sae.initialize_from_data(torch.randn(10, 9))


def _dead_mask(d_sae: int, dead: list[int]) -> torch.Tensor:
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[dead] = True
    return mask


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_aux_loss_only_with_dead_latents(arch):
    torch.manual_seed(2)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4, aux_k=6))
    x = torch.randn(128, 16)
    assert float(sae.training_loss(x)["aux_loss"]) == 0.0
    assert float(sae.training_loss(x, dead_mask=torch.zeros(64, dtype=torch.bool))["aux_loss"]) == 0.0
    dead = list(range(40, 64))
    with_dead = sae.training_loss(x, dead_mask=_dead_mask(64, dead))
    assert float(with_dead["aux_loss"]) > 0.0
    # the auxiliary term trains dead latents only
    aux_only = with_dead["loss"] - sae.training_loss(x)["loss"]
    aux_only.backward()
    per_row = sae.W_dec.grad.abs().sum(dim=1)  # [d_sae]
    assert per_row[dead].max() > 1e-2 and per_row[:40].max() < 1e-5  # live rows: rounding only
    off = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4, aux_coefficient=0.0))
    assert float(off.training_loss(x, dead_mask=_dead_mask(64, dead))["aux_loss"]) == 0.0
    with pytest.raises(ValueError, match="dead_mask"):
        sae.training_loss(x, dead_mask=torch.zeros(63, dtype=torch.bool))


def test_batchtopk_threshold_running_estimate():
    torch.manual_seed(4)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, architecture="batchtopk", k=4, batchtopk_threshold_decay=0.5))
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    sae.train()
    lat1 = sae.training_loss(x1)["latents"]
    first = lat1[lat1 > 0].min()
    assert torch.isclose(sae.threshold, first)
    lat2 = sae.training_loss(x2)["latents"]
    assert torch.isclose(sae.threshold, 0.5 * first + 0.5 * lat2[lat2 > 0].min())
    before = sae.threshold.clone()
    sae.eval()
    sae.training_loss(torch.randn(32, 16))  # validation does not move the threshold
    assert torch.equal(sae.threshold, before)
    pre = sae._pre_activations(x1 * sae.scaling_factor)
    assert torch.equal(sae.encode(x1) > 0, pre > sae.threshold)  # inference gates on the threshold


def test_jumprelu_losses_and_threshold_gradient():
    torch.manual_seed(5)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture="jumprelu", l0_coefficient=0.25,
                                      jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.5))
    x = torch.randn(256, 16)
    out = sae.training_loss(x)
    l0 = (out["latents"] > 0).float().sum(-1).mean()
    assert torch.isclose(out["sparsity_loss"], 0.25 * l0)
    out["loss"].backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    sae.training_loss(x)
    assert (sae.threshold >= 0).all()  # training keeps thresholds non-negative


def test_relu_l1_weighted_by_decoder_norms():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture="relu", l1_coefficient=2.0))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    out = sae.training_loss(torch.randn(64, 16))
    expected = 2.0 * (out["latents"] * sae.W_dec.norm(dim=1)).sum(-1).mean()
    assert torch.isclose(out["sparsity_loss"], expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_other_dtypes(dtype):
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture="batchtopk", k=4, dtype=dtype))
    sae.initialize_from_data(torch.randn(200, 16) * 3)
    assert sae.W_enc.dtype == sae.scaling_factor.dtype == getattr(torch, dtype)
    out = sae.training_loss(torch.randn(8, 16))  # float32 input into a bf16 / f64 SAE
    out["loss"].backward()
    assert out["latents"].dtype == getattr(torch, dtype) and torch.isfinite(out["loss"])
    assert sae(torch.randn(4, 16, dtype=torch.bfloat16)).reconstruction.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("field, value, allowed", [
    ("d_in", 0, "positive integer"),
    ("d_sae", 2.5, "positive integer"),
    ("architecture", "gated", "'topk', 'batchtopk', 'relu', 'jumprelu'"),
    ("k", 0, "positive integer"),
    ("k", 65, "at most d_sae=64"),
    ("l1_coefficient", -1.0, ">= 0"),
    ("l0_coefficient", float("nan"), ">= 0"),
    ("jumprelu_bandwidth", 0.0, "> 0"),
    ("batchtopk_threshold_decay", 1.0, "0 <= decay < 1"),
    ("aux_k", 0, "positive integer or None"),
    ("aux_coefficient", True, ">= 0"),
    ("normalize_activations", "yes", "True or False"),
    ("b_dec_init", "median", "'geometric_median', 'mean', 'zeros'"),
    ("hook_name", 3, "string or None"),
    ("dtype", "float8", "'float32'"),
])
def test_config_validation(field, value, allowed):
    kwargs = {"d_in": 16, "d_sae": 64, field: value}
    with pytest.raises(ValueError, match=rf"SAEConfig\.{field}=") as info:
        SAEConfig(**kwargs)
    assert allowed in str(info.value)


def test_config_round_trip():
    cfg = SAEConfig(d_in=16, d_sae=8, architecture="relu", k=100, hook_name="blocks.1.hook_resid_post")  # k unused
    d = json.loads(json.dumps(cfg.to_dict()))
    assert SAEConfig.from_dict(d) == cfg
    assert cfg.resolved_aux_k == 8  # d_in // 2, capped at d_sae
    with pytest.raises(ValueError, match="unknown keys \\['expansion'\\]"):
        SAEConfig.from_dict({**d, "expansion": 4})
    with pytest.raises(TypeError, match="SAEConfig"):
        SparseAutoencoder(d)  # type: ignore[arg-type]
