"""SAE quality metrics: reconstruction error, variance explained, sparsity and dead latents.

Stage: training and evaluation of a sparse autoencoder. :class:`~lightning_llm_inst.sae.module.SAEModule`
updates these metrics with raw activations, reconstructions and latents, and logs what they compute;
under DDP every state is a sum (or a minimum) that reduces exactly across ranks, so a metric over a
validation set split between processes equals the single-process value.

Every metric takes tensors of shape ``[..., features]``: all leading dimensions are tokens. Each
class has a functional twin that computes the same value from one set of tensors at once.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "L0",
    "DeadLatentFraction",
    "FeatureDensity",
    "FractionOfVarianceUnexplained",
    "ReconstructionMSE",
    "dead_latent_fraction",
    "feature_density",
    "fraction_of_variance_unexplained",
    "l0",
    "reconstruction_mse",
]

FeatureReduction = Literal["mean", "sum"]
_FEATURE_REDUCTIONS: tuple[str, ...] = get_args(FeatureReduction)
_ACC = torch.float64  # accumulators: sums over millions of tokens must reduce exactly across ranks


def _tokens(t: Tensor, what: str) -> Tensor:
    """``t`` as ``[tokens, features]``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == 0:
        raise ValueError(f"{what} must have a feature dimension, got a scalar")
    return t.reshape(-1, t.shape[-1])


def _pair(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    x2, xh2 = _tokens(x, "x"), _tokens(x_hat, "reconstruction")
    if x2.shape != xh2.shape:
        raise ValueError(f"x and reconstruction must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    return x2, xh2


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- functional
def reconstruction_mse(x: Tensor, x_hat: Tensor, feature_reduction: FeatureReduction = "mean") -> Tensor:
    """Mean over tokens of the squared error, averaged (``"mean"``) or summed (``"sum"``) over features."""
    if feature_reduction not in _FEATURE_REDUCTIONS:
        raise ValueError(f"feature_reduction={feature_reduction!r} is not valid; choose one of: "
                         f"{', '.join(_FEATURE_REDUCTIONS)}")
    x2, xh2 = _pair(x, x_hat)
    per_token = (xh2.to(_ACC) - x2.to(_ACC)).pow(2).sum(-1)  # [tokens]
    if feature_reduction == "mean":
        per_token = per_token / x2.shape[-1]
    return per_token.mean()


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """Sum of squared errors over the sum of squared deviations of ``x`` from its per-feature mean.

    0 is a perfect reconstruction; 1 is no better than predicting the mean activation.
    """
    x2, xh2 = _pair(x, x_hat)
    x64 = x2.to(_ACC)  # [tokens, d_in]
    sse = (xh2.to(_ACC) - x64).pow(2).sum()
    total = (x64 - x64.mean(0)).pow(2).sum()
    return sse / total


def l0(latents: Tensor) -> Tensor:
    """Mean number of non-zero latents per token."""
    z = _tokens(latents, "latents")
    return (z != 0).sum(-1).to(_ACC).mean()


def feature_density(latents: Tensor) -> Tensor:
    """Per-latent firing frequency over the tokens: ``[d_sae]`` values in ``[0, 1]``."""
    z = _tokens(latents, "latents")
    return (z != 0).sum(0).to(_ACC) / z.shape[0]


def dead_latent_fraction(latents: Tensor, window_tokens: int | None = None) -> Tensor:
    """Fraction of latents that did not fire in the last ``window_tokens`` tokens (default: in any token).

    With fewer tokens than ``window_tokens`` no latent counts as dead, as in :class:`DeadLatentFraction`.
    """
    z = _tokens(latents, "latents")
    window = z.shape[0] if window_tokens is None else _check_positive_int(window_tokens, "window_tokens")
    since = _tokens_since_fired(z, torch.zeros(z.shape[-1], dtype=torch.long, device=z.device))
    return (since >= max(window, 1)).to(_ACC).mean()


def _tokens_since_fired(z: Tensor, before: Tensor) -> Tensor:
    """Per latent, tokens since its last firing at the end of ``z [tokens, d_sae]``, given the counts
    ``before [d_sae]`` at its start."""
    n = z.shape[0]
    if n == 0:
        return before
    active = z.detach() != 0  # [tokens, d_sae]
    since_last = active.flip(0).to(torch.uint8).argmax(0)  # tokens after the last firing (0: on the last token)
    return torch.where(active.any(0), since_last, before + n)

# ---------------------------------------------------------------------------------------------- metrics
class ReconstructionMSE(Metric):
    """Mean over tokens of the squared reconstruction error, in the activations' own units.

    Args:
        feature_reduction: ``"mean"`` (default): the error of a token is averaged over its features,
            so the value equals ``F.mse_loss(x_hat, x)``; ``"sum"``: summed over features (the squared
            L2 distance per token).

    ``update(x, x_hat)`` with ``x`` and ``x_hat`` of shape ``[..., d_in]``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, feature_reduction: FeatureReduction = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if feature_reduction not in _FEATURE_REDUCTIONS:
            raise ValueError(f"feature_reduction={feature_reduction!r} is not valid; choose one of: "
                             f"{', '.join(_FEATURE_REDUCTIONS)}")
        self.feature_reduction = feature_reduction
        self.add_state("sum_squared_error", torch.zeros((), dtype=_ACC), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x2, xh2 = _pair(x, x_hat)
        err = (xh2.detach().to(_ACC) - x2.detach().to(_ACC)).pow(2).sum()
        if self.feature_reduction == "mean":
            err = err / x2.shape[-1]
        self.sum_squared_error += err
        self.tokens += x2.shape[0]

    def compute(self) -> Tensor:
        return self.sum_squared_error / self.tokens


class FractionOfVarianceUnexplained(Metric):
    """Fraction of the variance of ``x`` that the reconstruction leaves unexplained, over all tokens seen.

    ``sum((x_hat - x)^2) / sum((x - mean(x))^2)``, the mean taken per feature over every token
    given to ``update`` (on every rank). The states are the sums of squared errors, of ``x`` and of
    ``x^2`` per feature, and the token count, so the value is exact however the tokens are split.

    Args:
        num_features: ``d_in``, the width of ``x``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = _check_positive_int(num_features, "num_features")
        self.add_state("sum_squared_error", torch.zeros((), dtype=_ACC), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(num_features, dtype=_ACC), dist_reduce_fx="sum")
        self.add_state("sum_x_squared", torch.zeros(num_features, dtype=_ACC), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x2, xh2 = _pair(x, x_hat)
        if x2.shape[-1] != self.num_features:
            raise ValueError(f"x has {x2.shape[-1]} features, this metric was built for num_features="
                             f"{self.num_features}")
        x64 = x2.detach().to(_ACC)  # [tokens, d_in]
        self.sum_squared_error += (xh2.detach().to(_ACC) - x64).pow(2).sum()
        self.sum_x += x64.sum(0)
        self.sum_x_squared += x64.pow(2).sum(0)
        self.tokens += x2.shape[0]

    def compute(self) -> Tensor:
        n = self.tokens.to(_ACC)
        total = (self.sum_x_squared - self.sum_x.pow(2) / n).sum()  # sum of squared deviations from the mean
        return self.sum_squared_error / total


class L0(Metric):
    """Mean number of non-zero latents per token. ``update(latents)`` with ``latents [..., d_sae]``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("active", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, latents: Tensor) -> None:
        z = _tokens(latents, "latents")
        self.active += (z != 0).sum()
        self.tokens += z.shape[0]

    def compute(self) -> Tensor:
        return self.active.to(_ACC) / self.tokens


class FeatureDensity(Metric):
    """Per-latent firing frequency over the tokens seen: ``compute()`` returns a ``[d_sae]`` vector.

    Args:
        num_latents: ``d_sae``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_latents: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_latents = _check_positive_int(num_latents, "num_latents")
        self.add_state("fired", torch.zeros(num_latents, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, latents: Tensor) -> None:
        z = _tokens(latents, "latents")
        if z.shape[-1] != self.num_latents:
            raise ValueError(f"latents have {z.shape[-1]} columns, this metric was built for num_latents="
                             f"{self.num_latents}")
        self.fired += (z != 0).sum(0)
        self.tokens += z.shape[0]

    def compute(self) -> Tensor:
        return self.fired.to(_ACC) / self.tokens


class DeadLatentFraction(Metric):
    """Fraction of latents that have not fired in the last ``window_tokens`` tokens.

    The state is, per latent, the number of tokens since it last fired (exact to the token, however
    the tokens are split into updates). A latent that never fired counts from the metric's start
    (or last reset), so no latent is dead before ``window_tokens`` tokens were seen. Under DDP each
    rank counts its own tokens and the states reduce with a minimum: a latent is dead when it has
    fired on no rank within the window.

    :meth:`dead_mask` gives the ``[d_sae]`` boolean mask that AuxK losses use. The counts are
    persistent (saved in a LightningModule's checkpoint), so a resumed run keeps its history.

    Args:
        num_latents: ``d_sae``.
        window_tokens: how many tokens without firing make a latent dead.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_latents: int, window_tokens: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_latents = _check_positive_int(num_latents, "num_latents")
        self.window_tokens = _check_positive_int(window_tokens, "window_tokens")
        self.add_state("tokens_since_fired", torch.zeros(num_latents, dtype=torch.long), dist_reduce_fx="min",
                       persistent=True)

    def update(self, latents: Tensor) -> None:
        z = _tokens(latents, "latents")
        if z.shape[-1] != self.num_latents:
            raise ValueError(f"latents have {z.shape[-1]} columns, this metric was built for num_latents="
                             f"{self.num_latents}")
        self.tokens_since_fired = _tokens_since_fired(z, self.tokens_since_fired)

    def dead_mask(self) -> Tensor:
        """``[d_sae]`` bool: latents silent for at least ``window_tokens`` tokens (this rank's state)."""
        return self.tokens_since_fired >= self.window_tokens

    def compute(self) -> Tensor:
        return self.dead_mask().to(_ACC).mean()
