"""Splicing evaluation: how much of the model's behaviour survives an SAE in its residual stream.

Stage: after SAE training, back on the model. ``evaluate_sae`` runs every batch three times:
clean, with the SAE's reconstruction spliced in at its hook point, and with that hook point
zero-ablated. It hands back plain numbers (a dict of floats):

- ``ce_loss_clean`` / ``ce_loss_spliced`` / ``ce_loss_zero``: next-token cross-entropy (nats,
  mean per predicted token) of the three runs;
- ``ce_loss_recovered`` = ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``: 1 when the splice
  costs nothing, 0 when it is as bad as erasing the hook point (NaN when zero-ablation does not
  change the loss);
- ``kl_div`` (and ``kl_div_zero``): mean per predicted token of KL(clean || spliced) between
  next-token distributions;
- ``mse`` (mean over spliced tokens and features), ``fvu`` (sum of squared errors over the sum
  of squared deviations from the per-feature mean) and ``l0`` (mean active latents per token)
  of the SAE on the activations it replaced;
- ``fvu_all_tokens``: the SAE's FVU over every real token, the unspliced first and special
  tokens included (the SAE is run on them too, its output is not spliced in);
- ``tokens`` (spliced tokens), ``excluded_tokens`` (real tokens left unspliced) and
  ``predicted_tokens`` (tokens the losses average over).

Padding never counts: padded positions are neither spliced nor scored, and a token is scored
only when it and the token it predicts are both real (attention mask 1). By default, as in SAE
training (``ActivationDataModule``), the first real token of every sequence (``exclude_bos``)
and special tokens (``exclude_special_tokens``: the model config's BOS / EOS / PAD ids, or
``special_token_ids``) are left unspliced: their residual streams are outliers, many times the
others' norm, that the SAE was not trained on and that would dominate ``fvu``. They are still
scored, as the context every later prediction depends on.

The splice is a forward hook (a forward pre-hook with keyword arguments for ``resid_pre``)
on the module the capture stage resolves for the hook name; it returns the module output with
only the hidden-state tensor replaced (other tuple items, e.g. attention weights, pass
through). Hooks live inside ``try/finally`` and are always removed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_llm_inst.capture.hooks import HookPoint, normalize_input, normalize_output, resolve_hook_points
from lightning_llm_inst.sae.metrics import L0, FractionOfVarianceUnexplained, ReconstructionMSE
from lightning_llm_inst.sae.rows import as_id_list, special_token_ids_of

if TYPE_CHECKING:
    from lightning_llm_inst.sae.model import SparseAutoencoder

__all__ = ["evaluate_sae"]

logger = logging.getLogger(__name__)

MODES = ("clean", "spliced", "zero")


class _Splice:
    """What the hook does to the hidden states at the masked positions, per run."""

    def __init__(self, sae: SparseAutoencoder, d_in: int) -> None:
        self.sae = sae
        self.d_in = d_in
        self.mode = "clean"
        self.real: torch.Tensor | None = None  # [batch, seq] bool: real tokens (the SAE runs on them)
        self.mask: torch.Tensor | None = None  # [batch, seq] bool: positions to replace (a subset of real)
        device = sae.W_dec.device
        local = {"sync_on_compute": False}  # the tokens this process evaluated (no collective)
        self.mse = ReconstructionMSE(**local).to(device)
        self.fvu = FractionOfVarianceUnexplained(d_in, **local).to(device)
        self.fvu_all = FractionOfVarianceUnexplained(d_in, **local).to(device)
        self.l0 = L0(**local).to(device)

    def replace(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "clean":
            return x
        mask = self.mask
        if x.dim() != 3 or mask is None or tuple(x.shape[:2]) != tuple(mask.shape) or x.shape[-1] != self.d_in:
            raise ValueError(f"sae: the value at the hook point has shape {tuple(x.shape)}; the SAE takes "
                             f"[batch, seq, d_in={self.d_in}] with [batch, seq] = "
                             f"{None if mask is None else tuple(mask.shape)} (the input_ids)")
        mask = mask.to(x.device)
        if self.mode == "zero":
            return x.masked_fill(mask[..., None], 0) if bool(mask.any()) else x
        real = (self.real if self.real is not None else mask).to(x.device)
        if not bool(real.any()):
            return x
        param = self.sae.W_dec
        rows = x[real].to(param.device, param.dtype)  # [real tokens, d_in]
        out = self.sae(rows)
        self.fvu_all.update(rows, out.reconstruction)
        keep = mask[real].to(param.device)  # [real tokens]: the ones spliced
        if not bool(keep.any()):
            return x
        recon = out.reconstruction[keep]  # [spliced tokens, d_in]
        self.mse.update(rows[keep], recon)
        self.fvu.update(rows[keep], recon)
        self.l0.update(out.latents[keep])
        new = x.clone()
        new[mask] = recon.to(x.device, x.dtype)
        return new

    @property
    def tokens(self) -> int:
        return int(self.l0.tokens)

    def metrics(self) -> dict[str, float]:
        all_tokens = int(self.fvu_all.tokens)
        out = {"mse": math.nan, "fvu": math.nan, "l0": math.nan,
               "fvu_all_tokens": float(self.fvu_all.compute()) if all_tokens else math.nan}
        if self.tokens:
            out.update(mse=float(self.mse.compute()), fvu=float(self.fvu.compute()), l0=float(self.l0.compute()))
        return out


def _replace_in_output(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with the tensor ``old`` (as found by ``normalize_output``) swapped for ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        key = next(k for k, v in output.items() if v is old)
        output[key] = new  # a ModelOutput also updates its attribute
        return output
    items = [new if item is old else item for item in output]
    return type(output)(items) if isinstance(output, list) else tuple(items)


def _post_hook(splice: _Splice) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if splice.mode == "clean":
            return None
        x = normalize_output(output)  # [batch, seq, d_in]
        return _replace_in_output(output, x, splice.replace(x))
    return hook


def _pre_hook(splice: _Splice) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        if splice.mode == "clean":
            return None
        x = normalize_input(args, kwargs)  # [batch, seq, d_in]
        new = splice.replace(x)
        if args:
            return (_replace_in_output(args[0], x, new), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _replace_in_output(kwargs["hidden_states"], x, new)}
    return hook


def _iter_batches(batches: Iterable[Any] | None, input_ids: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if (batches is None) == (input_ids is None):
        raise ValueError("evaluate_sae: give exactly one of batches= (an iterable of dicts with 'input_ids' and "
                         "optional 'attention_mask', or of input_ids tensors) and input_ids=")
    if input_ids is not None:
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        batches = ({"input_ids": input_ids[a:a + batch_size],
                    "attention_mask": None if attention_mask is None else attention_mask[a:a + batch_size]}
                   for a in range(0, input_ids.shape[0], batch_size))
    assert batches is not None
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            ids, mask = batch, None
        elif isinstance(batch, Mapping) and "input_ids" in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            raise TypeError(f"batches: item {i} is a {type(batch).__name__}; allowed: a tensor of input_ids "
                            f"or a mapping with 'input_ids' (and optional 'attention_mask')")
        if ids.dim() != 2:
            raise ValueError(f"batches: item {i} has input_ids of shape {tuple(ids.shape)}; expected [batch, seq]")
        yield ids, (torch.ones_like(ids) if mask is None else mask)


def _special_ids(model: nn.Module, special_token_ids: Sequence[int] | None) -> list[int]:
    """``special_token_ids``, or the BOS / EOS / PAD ids of ``model.config``."""
    if special_token_ids is not None:
        ids = as_id_list(special_token_ids, "special_token_ids")
        return ids or []
    config = getattr(model, "config", None)
    return special_token_ids_of({"model": {"config": config.to_dict()}}) if hasattr(config, "to_dict") else []


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the first real token of each row (works for left and right padding)."""
    return mask & (mask.long().cumsum(1) == 1)


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model: its output {type(out).__name__} has no logits; evaluate_sae needs a causal LM")
    return logits


def _resolve_point(model: nn.Module, sae: SparseAutoencoder, hook_name: str | None) -> HookPoint:
    name = hook_name if hook_name is not None else getattr(sae.cfg, "hook_name", None)
    if not name:
        raise ValueError("hook_name: got None and the SAE's config has no hook_name; pass the hook point, "
                         "e.g. 'blocks.3.hook_resid_post'")
    points = resolve_hook_points(model, name)
    if len(points) != 1:
        raise ValueError(f"hook_name: {name!r} resolves to {len(points)} hook points "
                         f"({', '.join(p.name for p in points[:5])}); expected exactly one")
    return points[0]


@torch.no_grad()
def evaluate_sae(model: nn.Module, sae: SparseAutoencoder, hook_name: str | None = None,
                 batches: Iterable[Any] | None = None, *, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, batch_size: int = 8, exclude_bos: bool = True,
                 exclude_special_tokens: bool = True, special_token_ids: Sequence[int] | None = None,
                 max_batches: int | None = None) -> dict[str, float]:
    """Splice ``sae`` into ``model`` at ``hook_name`` and measure what the model loses.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            logits (a tensor or an output with ``.logits``); run in eval mode, restored after.
        sae: a :class:`~lightning_llm_inst.sae.model.SparseAutoencoder` taking raw activations.
        hook_name: e.g. ``"blocks.3.hook_resid_post"``; default: ``sae.cfg.hook_name``.
        batches: an iterable of dicts with ``input_ids`` ``[batch, seq]`` and optional
            ``attention_mask``, or of ``input_ids`` tensors; or give ``input_ids`` (and
            ``attention_mask``) instead, split into batches of ``batch_size`` rows.
        exclude_bos: do not splice the first real token of each sequence.
        exclude_special_tokens: do not splice special tokens.
        special_token_ids: those tokens; ``None``: the ``bos_token_id``, ``eos_token_id`` and
            ``pad_token_id`` of ``model.config``.
        max_batches: stop after this many batches.

    Returns the dict described in this module's docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sae, nn.Module) or not hasattr(sae, "cfg"):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches: expected None or a positive integer, got {max_batches!r}")
    for name, value in (("exclude_bos", exclude_bos), ("exclude_special_tokens", exclude_special_tokens)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected True or False, got {value!r}")
    special = torch.tensor(_special_ids(model, special_token_ids) if exclude_special_tokens else [], dtype=torch.long)
    point = _resolve_point(model, sae, hook_name)
    module = model.get_submodule(point.module_name)
    device = next(model.parameters()).device
    splice = _Splice(sae, int(sae.cfg.d_in))
    ce = dict.fromkeys(MODES, 0.0)
    kl = {"spliced": 0.0, "zero": 0.0}
    predicted = 0
    was_training = model.training, sae.training
    model.eval()
    sae.eval()
    if point.pre:
        handle = module.register_forward_pre_hook(_pre_hook(splice), with_kwargs=True)
    else:
        handle = module.register_forward_hook(_post_hook(splice))
    try:
        for index, (ids, mask) in enumerate(_iter_batches(batches, input_ids, attention_mask, batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            ids, mask = ids.to(device), mask.to(device).bool()
            splice.real = mask  # [batch, seq]
            splice.mask = mask & ~_first_real(mask) if exclude_bos else mask  # [batch, seq]
            if special.numel():
                splice.mask = splice.mask & ~torch.isin(ids, special.to(device))
            scored = mask[:, :-1] & mask[:, 1:]  # [batch, seq - 1]: position predicts a real next token
            targets = ids[:, 1:][scored]  # [n]
            predicted += int(targets.numel())
            clean_logp: torch.Tensor | None = None
            for mode in MODES:
                splice.mode = mode
                logits = _logits(model, ids, mask.long())  # [batch, seq, vocab]
                logp = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)  # [n, vocab]
                ce[mode] += float(-logp.gather(1, targets[:, None]).sum())
                if clean_logp is None:
                    clean_logp = logp
                else:
                    kl[mode] += float(F.kl_div(logp, clean_logp, reduction="sum", log_target=True))
    finally:
        handle.remove()
        splice.mode = "clean"
        model.train(was_training[0])
        sae.train(was_training[1])
    if predicted == 0:
        raise ValueError("evaluate_sae: no token to score (every sequence is shorter than 2 real tokens, or no "
                         "batch was given)")
    losses = {mode: ce[mode] / predicted for mode in MODES}
    gap = losses["zero"] - losses["clean"]
    result = {
        "ce_loss_clean": losses["clean"],
        "ce_loss_spliced": losses["spliced"],
        "ce_loss_zero": losses["zero"],
        "ce_loss_recovered": (losses["zero"] - losses["spliced"]) / gap if gap != 0 else math.nan,
        "kl_div": kl["spliced"] / predicted,
        "kl_div_zero": kl["zero"] / predicted,
        **splice.metrics(),
        "tokens": float(splice.tokens),
        "excluded_tokens": float(int(splice.fvu_all.tokens) - splice.tokens),
        "predicted_tokens": float(predicted),
    }
    logger.info("evaluate_sae %s: CE clean %.4f spliced %.4f zero %.4f, recovered %.3f, KL %.4f, FVU %.4f "
                "(%.4f with the first and special tokens), L0 %.1f", point.name, result["ce_loss_clean"],
                result["ce_loss_spliced"], result["ce_loss_zero"], result["ce_loss_recovered"], result["kl_div"],
                result["fvu"], result["fvu_all_tokens"], result["l0"])
    return result
