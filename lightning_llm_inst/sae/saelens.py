"""SAELens export and import: ``cfg.json`` + ``sae_weights.safetensors``.

Stage: after training. :func:`save_saelens` writes a :class:`SparseAutoencoder` as a directory that
``sae_lens.SAE.load_from_disk`` loads (sae-lens 6.x layout) and that gives the same latents and
reconstructions on raw activations; :func:`load_saelens` reads such a directory back, ours or one
written by sae-lens itself (``SAE.save_model``). Weights are safetensors only; nothing is unpickled.

Architecture mapping (ours -> sae-lens): topk -> ``"topk"``, relu -> ``"standard"``,
jumprelu -> ``"jumprelu"``, batchtopk -> ``"jumprelu"`` with its learned threshold on every latent.
Our own config travels in ``metadata["lightning_llm_inst"]`` so that a batchtopk SAE and its
``scaling_factor`` come back as they were.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst._version import __version__
from lightning_llm_inst.sae.model import DTYPES, SAEConfig, SparseAutoencoder

__all__ = ["SAELENS_ARCHITECTURES", "load_saelens", "saelens_config", "save_saelens"]

logger = logging.getLogger(__name__)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: sae-lens reads configs older than 6.0 through a legacy path; ours are in the 6.x layout
SAELENS_FORMAT_VERSION = "6.0.0"
#: metadata key holding our own config and scaling factor
METADATA_KEY = "lightning_llm_inst"
SAELENS_ARCHITECTURES = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
#: sae-lens architecture -> ours, for directories that sae-lens wrote
_FROM_SAELENS = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - safetensors ships with the hf extra
        raise ImportError("SAELens export needs safetensors: pip install 'lightning-llm-inst[hf]'") from e
    return safetensors.torch


def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` content for ``sae`` (weights folded to raw units, so no normalization)."""
    cfg = sae.cfg
    out: dict[str, Any] = {
        "architecture": SAELENS_ARCHITECTURES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    out["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        "training_architecture": cfg.architecture,
        METADATA_KEY: {
            "version": __version__,
            "config": cfg.to_dict(),
            "scaling_factor": float(sae.scaling_factor),
        },
    }
    return out


def save_saelens(sae: SparseAutoencoder, directory: str | os.PathLike[str]) -> Path:
    """Write ``sae`` to ``directory`` (created if needed) as ``cfg.json`` + ``sae_weights.safetensors``.

    Each file is written under a temporary name and renamed into place. Returns the directory.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"save_saelens(sae=...) expects a SparseAutoencoder, got {type(sae).__name__}")
    st = _safetensors()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    dtype = sae.cfg.torch_dtype
    tensors = {name: t.to(device="cpu", dtype=dtype).contiguous() for name, t in sae.saelens_state_dict().items()}
    weights_tmp = path / (WEIGHTS_FILENAME + ".tmp")
    st.save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    os.replace(weights_tmp, path / WEIGHTS_FILENAME)
    cfg_tmp = path / (CFG_FILENAME + ".tmp")
    cfg_tmp.write_text(json.dumps(saelens_config(sae), indent=2) + "\n")
    os.replace(cfg_tmp, path / CFG_FILENAME)
    logger.info("saved %s SAE (%d x %d) for SAELens to %s", sae.cfg.architecture, sae.cfg.d_in, sae.cfg.d_sae, path)
    return path


def _dtype_name(value: Any, path: Path) -> str:
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{path / CFG_FILENAME}: dtype={value!r} is not supported; use one of {sorted(DTYPES)}")
    return name


def _config_from_saelens(raw: dict[str, Any], path: Path) -> SAEConfig:
    """Our config for a directory that sae-lens wrote (its weights already take raw activations)."""
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise ValueError(f"{path / CFG_FILENAME}: architecture={arch!r} is not supported; "
                         f"load one of {sorted(_FROM_SAELENS)}")
    norm = raw.get("normalize_activations", "none")
    if norm == "expected_average_only_in":
        logger.warning("%s: normalize_activations='expected_average_only_in' with no folded factor; inputs are "
                       "used as they come, as sae-lens' load_from_disk does", path)
    elif norm not in ("none", None):
        raise ValueError(f"{path / CFG_FILENAME}: normalize_activations={norm!r} is not supported; "
                         "only 'none' and 'expected_average_only_in'")
    if raw.get("reshape_activations", "none") not in ("none", None):
        logger.warning("%s: reshape_activations=%r; pass inputs flattened to [..., d_in]",
                       path, raw["reshape_activations"])
    meta = raw.get("metadata") or {}
    k = raw.get("k", 32)
    if arch in ("topk", "batchtopk") and float(k) != int(k):
        raise ValueError(f"{path / CFG_FILENAME}: k={k!r} must be a whole number to load as {arch}")
    return SAEConfig(
        d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=_FROM_SAELENS[arch],
        k=int(k) if arch in ("topk", "batchtopk") else 32,
        normalize_activations=False, hook_name=meta.get("hook_name", raw.get("hook_name")),
        model_name=meta.get("model_name", raw.get("model_name")), dtype=_dtype_name(raw.get("dtype", "float32"), path),
    )


def _raw_units_state(raw: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Weights in our inference form: b_dec subtracted from the input, no decoder-norm rescaling."""
    t = {name: v.to(torch.float64) for name, v in tensors.items()}
    if "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    if "topk_threshold" in t:  # a batchtopk training SAE saved by sae-lens
        t["threshold"] = t.pop("topk_threshold").reshape(())
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise ValueError(f"{path / WEIGHTS_FILENAME}: a finetuning scaling_factor is not supported")
    if raw.get("rescale_acts_by_decoder_norm", False):
        # sae-lens multiplies pre-activations by the decoder norms and divides latents by them in
        # decode; folding the norms into W_enc, b_enc and W_dec gives the same outputs
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)  # [d_sae]
        t["W_enc"] = t["W_enc"] * norms
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
    if not raw.get("apply_b_dec_to_input", True):
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    return t


def load_saelens(directory: str | os.PathLike[str], device: torch.device | str = "cpu") -> SparseAutoencoder:
    """Read a SAELens directory (ours, or written by sae-lens) into a :class:`SparseAutoencoder`.

    Our own directories come back with their config (architecture, k, coefficients) and
    ``scaling_factor``; sae-lens ones map ``standard`` -> relu, ``topk``, ``jumprelu`` and
    ``batchtopk`` (training checkpoints) to ours with ``normalize_activations=False``.
    """
    path = Path(directory)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_saelens: {p} does not exist (expected {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    raw = json.loads(cfg_path.read_text())
    tensors = _safetensors().load_file(str(weights_path), device="cpu")
    ours = (raw.get("metadata") or {}).get(METADATA_KEY)
    if ours is not None:
        cfg = SAEConfig.from_dict(ours["config"])
        scaling = float(ours.get("scaling_factor", 1.0))
    else:
        cfg = _config_from_saelens(raw, path)
        scaling = 1.0
    state = _raw_units_state(raw, tensors, path)
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if cfg.architecture in ("jumprelu", "batchtopk")
                                                       else set())
    if set(state) != expected:
        raise ValueError(f"{weights_path}: tensors {sorted(state)} do not match a {cfg.architecture} SAE, "
                         f"which has {sorted(expected)}")
    # unfold the scaling factor: our parameters live in the normalized units
    state["W_enc"] = state["W_enc"] / scaling
    state["W_dec"] = state["W_dec"] * scaling
    state["b_dec"] = state["b_dec"] * scaling
    if cfg.architecture == "batchtopk":
        threshold = state["threshold"].reshape(-1)
        if not torch.all(threshold == threshold[0]):
            raise ValueError(f"{weights_path}: a batchtopk SAE needs one threshold for every latent")
        state["threshold"] = threshold[0]
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name, value in state.items():
            target = getattr(sae, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{weights_path}: {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}")
            target.copy_(value.to(target.dtype))
        sae.scaling_factor.fill_(scaling)
        if cfg.architecture == "batchtopk":
            sae.threshold_updates.fill_(1)
    return sae.to(device)
