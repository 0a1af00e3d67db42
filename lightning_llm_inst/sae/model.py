"""The sparse autoencoder: configuration, parameters, encode/decode and training losses.

Stage: analysis of a store. :class:`SparseAutoencoder` is a plain ``nn.Module`` (no trainer needed)
that ``sae.module.SAEModule`` trains on rows of an activation store and ``sae.saelens`` exports.
It takes raw activations and returns raw reconstructions; inside, inputs are scaled to a mean
norm of ``sqrt(d_in)`` by the ``scaling_factor`` buffer, which the export folds into the weights.

Architectures: ``"topk"`` (k largest latents per token), ``"batchtopk"`` (k * tokens largest over the
batch while training, a learned threshold at inference), ``"relu"`` (L1 penalty weighted by decoder
row norms) and ``"jumprelu"`` (per-latent threshold trained with a straight-through estimator and
an L0 penalty).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "Architecture", "BDecInit", "DType", "SAEConfig", "SAEOutput", "SparseAutoencoder",
           "geometric_median"]

logger = logging.getLogger(__name__)

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
BDecInit = Literal["geometric_median", "mean", "zeros"]
DType = Literal["float32", "float64", "float16", "bfloat16"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
B_DEC_INITS: tuple[str, ...] = get_args(BDecInit)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert tuple(DTYPES) == get_args(DType)
_EPS = 1e-8


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SAEConfig.{name}={value!r} is not valid; {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SAEConfig:
    """Shape, architecture and loss weights of a :class:`SparseAutoencoder`."""

    d_in: int
    """Width of the activations (the hook point's feature size)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: Architecture = "topk"
    """``"topk"``, ``"batchtopk"``, ``"relu"`` or ``"jumprelu"``."""
    k: int = 32
    """Active latents per token (topk), or on average per token over a batch (batchtopk)."""
    l1_coefficient: float = 1.0
    """relu: weight of the L1 penalty on latents times decoder row norms."""
    l0_coefficient: float = 0.5
    """jumprelu: weight of the L0 penalty (number of active latents per token)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through estimator (normalized units)."""
    jumprelu_init_threshold: float = 0.1
    """jumprelu: initial threshold of every latent (normalized units)."""
    batchtopk_threshold_decay: float = 0.99
    """batchtopk: the inference threshold is a running mean of the smallest kept activation of each
    training batch, ``t <- decay * t + (1 - decay) * min`` (the first batch sets it)."""
    aux_k: int | None = None
    """AuxK: dead latents used to reconstruct the residual error; ``None`` means ``d_in // 2``."""
    aux_coefficient: float = 1 / 32
    """AuxK: weight of the auxiliary loss (0 turns it off)."""
    normalize_activations: bool = True
    """Scale inputs to mean norm ``sqrt(d_in)`` with a factor measured by ``initialize_from_data``."""
    b_dec_init: BDecInit = "geometric_median"
    """``"geometric_median"``, ``"mean"`` or ``"zeros"``: how ``initialize_from_data`` sets ``b_dec``."""
    hook_name: str | None = None
    """Hook point the SAE reads (e.g. ``blocks.3.hook_resid_post``); exported as metadata."""
    model_name: str | None = None
    """Model the activations come from (a Hugging Face Hub id where known); exported as metadata."""
    dtype: DType = "float32"
    """Parameter dtype: ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``."""
    context_size: int | None = None
    """Tokens per sequence of the text the activations come from; exported as metadata."""
    prepend_bos: bool | None = None
    """Whether those sequences start with the BOS token (``None``: not known); exported as metadata."""
    dataset_path: str | None = None
    """Where the training activations come from (the store's path); exported as metadata."""
    seqpos_slice: list[int | None] | None = None
    """Token positions trained on, as ``slice(*seqpos_slice)`` (``[1, None]``: every position but the
    first); ``None``: all. Exported as metadata."""
    excluded_token_ids: list[int] | None = None
    """Token ids whose rows were left out of training; exported as ``exclude_special_tokens``."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, v, "use a positive integer")
        if self.architecture not in ARCHITECTURES:
            _fail("architecture", self.architecture, f"choose one of: {', '.join(map(repr, ARCHITECTURES))}")
        if not _is_int(self.k) or self.k < 1:
            _fail("k", self.k, "use a positive integer")
        if self.architecture in ("topk", "batchtopk") and self.k > self.d_sae:
            _fail("k", self.k, f"use at most d_sae={self.d_sae} for architecture={self.architecture!r}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient", "jumprelu_init_threshold"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                _fail(name, v, "use a finite number >= 0")
        if not _is_number(self.jumprelu_bandwidth) or self.jumprelu_bandwidth <= 0:
            _fail("jumprelu_bandwidth", self.jumprelu_bandwidth, "use a finite number > 0")
        if not _is_number(self.batchtopk_threshold_decay) or not 0 <= self.batchtopk_threshold_decay < 1:
            _fail("batchtopk_threshold_decay", self.batchtopk_threshold_decay, "use a number with 0 <= decay < 1")
        if self.aux_k is not None and (not _is_int(self.aux_k) or self.aux_k < 1):
            _fail("aux_k", self.aux_k, "use a positive integer or None")
        if not isinstance(self.normalize_activations, bool):
            _fail("normalize_activations", self.normalize_activations, "use True or False")
        if self.b_dec_init not in B_DEC_INITS:
            _fail("b_dec_init", self.b_dec_init, f"choose one of: {', '.join(map(repr, B_DEC_INITS))}")
        for name in ("hook_name", "model_name"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                _fail(name, v, "use a string or None")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"choose one of: {', '.join(map(repr, DTYPES))}")
        if self.context_size is not None and (not _is_int(self.context_size) or self.context_size < 1):
            _fail("context_size", self.context_size, "use a positive integer or None")
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            _fail("prepend_bos", self.prepend_bos, "use True, False or None")
        if self.dataset_path is not None and not isinstance(self.dataset_path, str):
            _fail("dataset_path", self.dataset_path, "use a string or None")
        if self.seqpos_slice is not None:
            if isinstance(self.seqpos_slice, tuple):
                self.seqpos_slice = list(self.seqpos_slice)
            if (not isinstance(self.seqpos_slice, list) or not 1 <= len(self.seqpos_slice) <= 3
                    or not all(v is None or _is_int(v) for v in self.seqpos_slice)):
                _fail("seqpos_slice", self.seqpos_slice, "use a list of 1 to 3 integers or None (slice arguments)")
        if self.excluded_token_ids is not None:
            if isinstance(self.excluded_token_ids, tuple):
                self.excluded_token_ids = list(self.excluded_token_ids)
            if not isinstance(self.excluded_token_ids, list) or not all(
                    _is_int(v) and v >= 0 for v in self.excluded_token_ids):
                _fail("excluded_token_ids", self.excluded_token_ids, "use a list of non-negative integers or None")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    @property
    def resolved_aux_k(self) -> int:
        """AuxK latents actually used: ``aux_k``, or ``d_in // 2``, at most ``d_sae``."""
        aux_k = self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)
        return min(aux_k, self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``SAEConfig.from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build a config from ``to_dict`` output; unknown keys are an error that lists them."""
        if not isinstance(d, dict):
            raise TypeError(f"SAEConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SAEConfig.from_dict got unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    reconstruction: Tensor
    """``[..., d_in]`` in the caller's units."""
    latents: Tensor
    """``[..., d_sae]`` non-negative latent activations."""


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Point minimising the sum of Euclidean distances to ``points [n, d]`` (Weiszfeld iterations).

    Computed in float64 from the mean; stops when a step moves less than ``tol`` (relative).
    Returns ``[d]`` in the dtype of ``points``.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs points of shape [n >= 1, d], got {tuple(points.shape)}")
    x = points.to(torch.float64)  # [n, d]
    y = x.mean(dim=0)  # [d]
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(_EPS)  # [n]
        y_next = (w[:, None] * x).sum(dim=0) / w.sum()  # [d]
        step = (y_next - y).norm()
        y = y_next
        if step <= tol * max(1.0, float(y.norm())):
            break
    return y.to(points.dtype)


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold gets the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors  # [tokens, d_sae], [d_sae]
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        kernel = _rectangle((pre - threshold) / bw)  # [tokens, d_sae]
        grad_threshold = (-(threshold / bw) * kernel * grad).sum(dim=0)  # [d_sae]
        return grad_pre, grad_threshold.to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """Heaviside ``pre > threshold``; gradient only to the threshold, via the rectangle kernel."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = (-(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad).sum(dim=0)  # [d_sae]
        return None, grad_threshold.to(threshold.dtype), None


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over one hook point's activations.

    Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]`` (unit-norm rows),
    ``b_dec [d_in]``; jumprelu adds the parameter ``threshold [d_sae]``, batchtopk the buffers
    ``threshold`` (scalar) and ``threshold_updates``. The buffer ``scaling_factor`` (scalar, 1.0 until
    ``initialize_from_data``) multiplies raw inputs; ``b_dec`` lives in those scaled units.
    """

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SparseAutoencoder(cfg=...) expects an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        factory = {"dtype": cfg.torch_dtype, "device": device}
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, device=device, dtype=torch.float32)  # [d_sae, d_in]
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(_EPS)
        self.W_dec = nn.Parameter(w_dec.to(cfg.torch_dtype))
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous().to(cfg.torch_dtype))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **factory))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold), **factory))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), **factory))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("scaling_factor", torch.ones((), **factory))

    @staticmethod
    def parameter_names(architecture: str) -> tuple[str, ...]:
        """Names of the parameters an SAE of ``architecture`` has, in registration order."""
        return ("W_dec", "W_enc", "b_enc", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.architecture in ("topk", "batchtopk") else ""
        return f"architecture={c.architecture!r}, d_in={c.d_in}, d_sae={c.d_sae}{k}"

    # ------------------------------------------------------------------ inference
    def _pre_activations(self, x_scaled: Tensor) -> Tensor:
        return (x_scaled - self.b_dec) @ self.W_enc + self.b_enc  # [..., d_sae]

    def _scale_in(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SparseAutoencoder expects inputs of shape [..., d_in={self.cfg.d_in}], "
                             f"got {tuple(x.shape)}")
        return x.to(self.W_enc.dtype) * self.scaling_factor  # [..., d_in]

    def _activate(self, pre: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)  # [..., k]
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if arch == "relu":
            return pre.relu()
        # jumprelu and batchtopk at inference: keep a latent when its pre-activation passes the threshold
        return pre.relu() * (pre > self.threshold.to(pre.dtype)).to(pre.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations ``[..., d_in]`` -> latents ``[..., d_sae]`` (batchtopk uses its threshold)."""
        return self._activate(self._pre_activations(self._scale_in(x)))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[..., d_sae]`` -> reconstruction ``[..., d_in]`` in raw units."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.scaling_factor

    def forward(self, x: Tensor) -> SAEOutput:
        latents = self.encode(x)
        return SAEOutput(self.decode(latents), latents)

    # ------------------------------------------------------------------ training
    def _train_activate(self, pre: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "batchtopk":
            acts = pre.relu()  # [tokens, d_sae]
            values, indices = acts.flatten().topk(self.cfg.k * acts.shape[0], sorted=False)
            return torch.zeros_like(acts.flatten()).scatter(0, indices, values).view_as(acts)
        if arch == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.cfg.jumprelu_bandwidth)
        return self._activate(pre)

    def _sparsity_loss(self, pre: Tensor, latents: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            weighted = latents * self.W_dec.norm(dim=1)  # [tokens, d_sae]
            return self.cfg.l1_coefficient * weighted.sum(dim=-1).mean()
        if arch == "jumprelu":
            l0 = _Step.apply(pre, self.threshold.to(pre.dtype), self.cfg.jumprelu_bandwidth).sum(dim=-1)  # [tokens]
            return self.cfg.l0_coefficient * l0.mean()
        return pre.new_zeros(())

    def _aux_loss(self, pre: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top ``aux_k`` dead latents reconstruct the (detached) residual error."""
        if dead_mask is None or self.cfg.aux_coefficient == 0:
            return pre.new_zeros(())
        if dead_mask.shape != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape [d_sae={self.cfg.d_sae}], "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = dead_mask.to(pre.device)
        aux_k = self.cfg.resolved_aux_k
        # no host sync: with fewer than aux_k dead latents the rest of the top-k are zeros, and
        # with none the scale is 0
        scale = (dead.sum().float() / aux_k).clamp(max=1.0)  # fewer dead latents than aux_k: a smaller loss
        candidates = pre.relu().masked_fill(~dead, 0.0)  # [tokens, d_sae]
        values, indices = candidates.topk(aux_k, dim=-1, sorted=False)
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, values)
        aux_recon = aux_latents @ self.W_dec  # [tokens, d_in]
        return self.cfg.aux_coefficient * scale * (aux_recon - residual).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def _update_threshold(self, latents: Tensor) -> None:
        with torch.autocast(latents.device.type, enabled=False):
            kept = latents.float()
            smallest = torch.where(kept > 0, kept, torch.full_like(kept, math.inf)).min()
            decay = self.cfg.batchtopk_threshold_decay
            current = self.threshold.float()
            blended = torch.where(self.threshold_updates > 0, decay * current + (1 - decay) * smallest, smallest)
            found = torch.isfinite(smallest)
            self.threshold.copy_(torch.where(found, blended, current))
            self.threshold_updates.add_(found.long())

    def training_loss(self, x: Tensor, dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Loss of one batch of raw activations ``x [..., d_in]``.

        Returns ``loss`` (to backprop) ``= mse_loss + sparsity_loss + aux_loss``; the three terms are
        detached scalars in the normalized units (squared error summed over ``d_in``, averaged over
        tokens). ``reconstruction [..., d_in]`` (raw units) and ``latents [..., d_sae]`` come detached.
        ``dead_mask`` (bool ``[d_sae]``) marks dead latents for AuxK. In training mode a batchtopk SAE
        also updates its inference threshold.
        """
        lead = x.shape[:-1]
        x_scaled = self._scale_in(x).reshape(-1, self.cfg.d_in)  # [tokens, d_in]
        if self.cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.threshold.clamp_(min=0.0)  # a negative threshold would let negative pre-activations through
        pre = self._pre_activations(x_scaled)  # [tokens, d_sae]
        latents = self._train_activate(pre)  # [tokens, d_sae]
        recon = latents @ self.W_dec + self.b_dec  # [tokens, d_in]
        mse = (recon - x_scaled).pow(2).sum(dim=-1).mean()
        sparsity = self._sparsity_loss(pre, latents)
        aux = self._aux_loss(pre, (x_scaled - recon).detach(), dead_mask)
        if self.cfg.architecture == "batchtopk" and self.training:
            self._update_threshold(latents.detach())
        return {
            "loss": mse + sparsity + aux,
            "mse_loss": mse.detach(),
            "sparsity_loss": sparsity.detach(),
            "aux_loss": aux.detach(),
            "reconstruction": (recon.detach() / self.scaling_factor).reshape(*lead, self.cfg.d_in),
            "latents": latents.detach().reshape(*lead, self.cfg.d_sae),
        }

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def initialize_from_data(self, x_sample: Tensor) -> None:
        """Set ``scaling_factor`` (when ``normalize_activations``) and ``b_dec`` from raw activations ``[n, d_in]``."""
        if not isinstance(x_sample, Tensor) or x_sample.ndim < 2 or x_sample.shape[-1] != self.cfg.d_in:
            shape = tuple(x_sample.shape) if isinstance(x_sample, Tensor) else type(x_sample).__name__
            raise ValueError(f"initialize_from_data expects x_sample of shape [n, d_in={self.cfg.d_in}], got {shape}")
        x = x_sample.reshape(-1, self.cfg.d_in).to(device=self.W_enc.device, dtype=torch.float32)  # [n, d_in]
        if x.shape[0] == 0 or not torch.isfinite(x).all():
            raise ValueError("initialize_from_data needs a non-empty sample of finite activations")
        if self.cfg.normalize_activations:
            mean_norm = float(x.norm(dim=-1).mean())
            if mean_norm <= 0:
                raise ValueError("initialize_from_data: the sample's mean norm is 0; cannot scale it")
            self.scaling_factor.fill_(math.sqrt(self.cfg.d_in) / mean_norm)
        x = x * self.scaling_factor.float()
        if self.cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(x)
        elif self.cfg.b_dec_init == "mean":
            b_dec = x.mean(dim=0)
        else:
            b_dec = torch.zeros_like(x[0])
        self.b_dec.copy_(b_dec)
        logger.info("SAE initialised from %d rows: scaling_factor=%.4g, |b_dec|=%.4g (%s)",
                    x.shape[0], float(self.scaling_factor), float(b_dec.norm()), self.cfg.b_dec_init)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale the rows of ``W_dec`` to unit norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def remove_parallel_gradients(self) -> None:
        """Drop the component of ``W_dec.grad`` parallel to each decoder row (keeps rows on the sphere)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS)  # [d_sae, d_in]
        grad.sub_((grad * unit).sum(dim=1, keepdim=True) * unit)

    @torch.no_grad()
    def saelens_state_dict(self) -> dict[str, Tensor]:
        """Weights that take raw activations: ``scaling_factor`` folded into ``W_enc``, ``W_dec``, ``b_dec``.

        Keys ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, plus ``threshold [d_sae]`` for jumprelu and
        batchtopk. The folded SAE gives the same latents and, in raw units, the same reconstructions.
        """
        s = self.scaling_factor
        out = {
            "W_enc": self.W_enc * s,
            "W_dec": self.W_dec / s,
            "b_enc": self.b_enc.clone(),
            "b_dec": self.b_dec / s,
        }
        if self.cfg.architecture in ("jumprelu", "batchtopk"):
            out["threshold"] = self.threshold.to(self.b_enc.dtype).expand(self.cfg.d_sae).clone()
        return {name: t.detach().contiguous() for name, t in out.items()}
