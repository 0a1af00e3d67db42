"""SAE metrics equal naive references on random data, updated in one piece or several."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_llm_inst.sae import metrics as M


def _data(tokens: int = 203, d_in: int = 24, d_sae: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) * torch.linspace(0.5, 3.0, d_in) + 2.0
    x_hat = x + 0.3 * torch.randn(tokens, d_in, generator=g)
    latents = torch.rand(tokens, d_sae, generator=g) * (torch.rand(tokens, d_sae, generator=g) < 0.1)
    latents[:, 7] = 0  # never fires
    latents[:-50, 11] = 0  # fires only in the last 50 tokens
    latents[50:, 13] = 0  # fires only in the first 50 tokens
    return x.double(), x_hat.double(), latents


def _pieces(tokens: int) -> list[slice]:
    cuts = [0, 1, 37, 38, 120, tokens]
    return [slice(a, b) for a, b in itertools.pairwise(cuts)]


def naive_fvu(x, x_hat):
    mean = [sum(x[i, j] for i in range(len(x))) / len(x) for j in range(x.shape[1])]
    sse = sum(float((x_hat[i, j] - x[i, j]) ** 2) for i in range(len(x)) for j in range(x.shape[1]))
    sst = sum(float((x[i, j] - mean[j]) ** 2) for i in range(len(x)) for j in range(x.shape[1]))
    return sse / sst


def naive_tokens_since_fired(latents):
    since = []
    for j in range(latents.shape[1]):
        fired = [i for i in range(len(latents)) if latents[i, j] != 0]
        since.append(len(latents) - 1 - fired[-1] if fired else len(latents))
    return since


def test_reconstruction_mse_mean_and_sum_over_features():
    x, x_hat, _ = _data()
    for reduction, want in (("mean", ((x_hat - x) ** 2).mean()), ("sum", ((x_hat - x) ** 2).sum(1).mean())):
        metric = M.ReconstructionMSE(feature_reduction=reduction)
        for s in _pieces(len(x)):
            metric.update(x[s], x_hat[s])
        assert torch.allclose(metric.compute(), want, rtol=1e-12)
        assert torch.allclose(M.reconstruction_mse(x, x_hat, reduction), want, rtol=1e-12)
    assert torch.allclose(M.reconstruction_mse(x.float(), x_hat.float()).float(),
                          torch.nn.functional.mse_loss(x_hat.float(), x.float()), rtol=1e-5)
    with pytest.raises(ValueError, match="feature_reduction='max' is not valid; choose one of: mean, sum"):
        M.ReconstructionMSE(feature_reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        M.reconstruction_mse(x, x_hat[:, :3])


def test_fvu_matches_a_naive_double_loop_in_one_or_several_updates():
    x, x_hat, _ = _data(tokens=61, d_in=7)
    want = naive_fvu(x, x_hat)
    metric = M.FractionOfVarianceUnexplained(num_features=7)
    for s in _pieces(61):
        metric.update(x[s], x_hat[s])
    assert float(metric.compute()) == pytest.approx(want, rel=1e-10)
    assert float(M.fraction_of_variance_unexplained(x, x_hat)) == pytest.approx(want, rel=1e-10)
    # the per-feature mean over all tokens, not per piece: a shift between pieces is explained variance
    shifted = torch.cat([x[:30] + 5, x[30:] - 5])
    assert float(M.fraction_of_variance_unexplained(shifted, shifted + (x_hat - x))) < want
    # perfect reconstruction and predicting the mean
    assert float(M.fraction_of_variance_unexplained(x, x)) == 0.0
    assert float(M.fraction_of_variance_unexplained(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_features=7"):
        metric.update(torch.zeros(3, 5), torch.zeros(3, 5))


def test_fvu_of_float32_inputs_accumulates_in_double():
    x, x_hat, _ = _data(tokens=4000, d_in=16)
    x32, xh32 = (x * 1000 + 1e4).float(), (x_hat * 1000 + 1e4).float()  # a large mean
    metric = M.FractionOfVarianceUnexplained(16)
    for a in range(0, 4000, 100):
        metric.update(x32[a : a + 100], xh32[a : a + 100])
    want = M.fraction_of_variance_unexplained(x32.double(), xh32.double())
    assert float(metric.compute()) == pytest.approx(float(want), rel=1e-9)


def test_l0_and_feature_density():
    _, _, z = _data()
    want_l0 = sum(int((z[i] != 0).sum()) for i in range(len(z))) / len(z)
    want_density = torch.tensor([float((z[:, j] != 0).sum()) / len(z) for j in range(z.shape[1])], dtype=torch.float64)
    l0, density = M.L0(), M.FeatureDensity(num_latents=z.shape[1])
    for s in _pieces(len(z)):
        l0.update(z[s])
        density.update(z[s])
    assert float(l0.compute()) == pytest.approx(want_l0, rel=1e-12)
    assert float(M.l0(z)) == pytest.approx(want_l0, rel=1e-12)
    assert torch.allclose(density.compute(), want_density) and torch.allclose(M.feature_density(z), want_density)
    assert density.compute()[7] == 0 and density.compute().shape == (z.shape[1],)
    # leading dimensions are tokens
    assert float(M.l0(z.reshape(7, 29, -1))) == pytest.approx(want_l0)


@pytest.mark.parametrize("window", [1, 50, 51, 150, 203, 500])
def test_dead_latents_counts_tokens_since_last_firing_exactly(window):
    _, _, z = _data()
    since = naive_tokens_since_fired(z)
    want_mask = torch.tensor([s >= window for s in since])
    metric = M.DeadLatentFraction(num_latents=z.shape[1], window_tokens=window)
    for s in _pieces(len(z)):
        metric.update(z[s])
    assert metric.tokens_since_fired.tolist() == since
    assert torch.equal(metric.dead_mask(), want_mask)
    assert float(metric.compute()) == pytest.approx(float(want_mask.double().mean()))
    assert float(M.dead_latent_fraction(z, window)) == pytest.approx(float(want_mask.double().mean()))
    if 50 <= window <= 150:
        assert metric.dead_mask()[7] and metric.dead_mask()[13] and not metric.dead_mask()[11]


def test_dead_latents_none_dead_before_a_window_of_tokens_and_reset():
    _, _, z = _data()
    metric = M.DeadLatentFraction(z.shape[1], window_tokens=1000)
    metric.update(z)
    assert not metric.dead_mask().any() and float(metric.compute()) == 0.0
    for _ in range(4):
        metric.update(z)
    assert metric.dead_mask()[7] and int(metric.tokens_since_fired[7]) == 5 * len(z)
    metric.reset()
    assert int(metric.tokens_since_fired.sum()) == 0
    assert "tokens_since_fired" in metric.state_dict()  # persistent: a checkpoint keeps the history
    with pytest.raises(ValueError, match="window_tokens must be a positive integer, got 0"):
        M.DeadLatentFraction(4, window_tokens=0)


def test_states_reduce_exactly_like_one_process():
    """Two 'ranks' merged with the declared reductions give the single-process values."""
    x, x_hat, z = _data()
    halves = [slice(0, 90), slice(90, None)]

    def merged(make, *tensors):
        parts = []
        for h in halves:
            m = make()
            m.update(*(t[h] for t in tensors))
            parts.append(m)
        parts[0].merge_state(parts[1])
        return parts[0].compute()

    assert torch.allclose(merged(lambda: M.FractionOfVarianceUnexplained(24), x, x_hat),
                          M.fraction_of_variance_unexplained(x, x_hat), rtol=1e-12)
    assert torch.allclose(merged(M.ReconstructionMSE, x, x_hat), M.reconstruction_mse(x, x_hat), rtol=1e-12)
    assert torch.allclose(merged(M.L0, z), M.l0(z))
    assert torch.allclose(merged(lambda: M.FeatureDensity(40), z), M.feature_density(z))
    # the dead-latent state reduces with a minimum: dead only if silent on every rank
    a, b = M.DeadLatentFraction(40, 60), M.DeadLatentFraction(40, 60)
    a.update(z[:90])
    b.update(z[90:])
    both = torch.minimum(a.tokens_since_fired, b.tokens_since_fired)
    a.merge_state(b)
    assert torch.equal(a.tokens_since_fired, both)
    assert a.dead_mask()[7] and not a.dead_mask()[13]  # 13 fired within rank a's last 60 tokens
