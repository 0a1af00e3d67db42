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
import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from lightning_llm_inst._version import __version__
from lightning_llm_inst.sae.model import DTYPES, SAEConfig, SparseAutoencoder

__all__ = ["SAELENS_ARCHITECTURES", "SAEFileError", "load_saelens", "saelens_config", "save_saelens"]

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
_MISSING = object()


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - safetensors ships with the hf extra
        raise ImportError("SAELens export needs safetensors: pip install 'lightning-llm-inst[hf]'") from e
    return safetensors.torch


#: hook names in TransformerLens' naming (ours are), which sae-lens resolves on a HookedTransformer
_TL_HOOK = re.compile(r"^(blocks\.\d+\.hook_\w+|hook_embed|hook_pos_embed|ln_final\.hook_\w+)$")


def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` content for ``sae`` (weights folded to raw units, so no normalization).

    ``metadata`` holds every field sae-lens' ``SAEMetadata`` uses for a language-model SAE:
    ``model_name`` (a Hub id where known), ``model_class_name`` (``"HookedTransformer"`` for
    TransformerLens-style hook names), ``model_from_pretrained_kwargs``, ``hook_name``,
    ``hook_head_index``, ``context_size``, ``prepend_bos``, ``dataset_path``, ``seqpos_slice`` and
    ``exclude_special_tokens`` (the token ids left out of training, or ``false``), from the SAE's
    config (``None`` where it does not know).
    """
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
        "model_class_name": "HookedTransformer" if cfg.hook_name and _TL_HOOK.match(cfg.hook_name) else None,
        "model_from_pretrained_kwargs": {},
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "dataset_path": cfg.dataset_path,
        "seqpos_slice": cfg.seqpos_slice,
        "exclude_special_tokens": cfg.excluded_token_ids or False,
        "neuronpedia_id": None,
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


class SAEFileError(ValueError):
    """A SAELens directory that cannot be loaded: one line naming the file, the field, the value and
    what was expected."""


_TENSOR_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_MAX_CFG_BYTES = 16 << 20  # a cfg.json is a few kB


def _fail(file: Path, field: str, value: Any, expected: str) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise SAEFileError(f"{file}: {field}={shown} is not valid; expected {expected}")


def _positive_int(raw: dict[str, Any], key: str, file: Path, default: Any = _MISSING) -> int:
    value = raw.get(key, default)
    if value is _MISSING:
        _fail(file, key, None, "a positive integer (the field is missing)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(file, key, value, "a positive integer")
    return value


def _dtype_name(value: Any, file: Path) -> str:
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPES:
        _fail(file, "dtype", value, f"one of {', '.join(DTYPES)}")
    return name


def _read_cfg(file: Path) -> dict[str, Any]:
    size = file.stat().st_size
    if size > _MAX_CFG_BYTES:
        _fail(file, "size", size, f"a JSON file of at most {_MAX_CFG_BYTES} bytes")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFileError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        _fail(file, "content", type(raw).__name__, "a JSON object")
    meta = raw.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        _fail(file, "metadata", meta, "a JSON object")
    for key in ("hook_name", "model_name"):
        value = (meta or {}).get(key, raw.get(key))
        if value is not None and not isinstance(value, str):
            _fail(file, f"metadata.{key}", value, "a string")
    return raw


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, dtype)}`` from the safetensors header; no tensor data is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any bad file
        raise SAEFileError(f"{file}: not a safetensors file ({' '.join(str(e).split())})") from None


def _int_k(raw: dict[str, Any], file: Path, d_sae: int, arch: str) -> int:
    k = raw.get("k", _MISSING)
    if k is _MISSING:
        _fail(file, "k", None, f"a positive integer for architecture={arch!r} (the field is missing)")
    if isinstance(k, float) and math.isfinite(k) and k == int(k):
        k = int(k)  # 5.0: a whole number written as a float
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        _fail(file, "k", k, f"an integer in [1, d_sae={d_sae}] for architecture={arch!r}")
    return k


def _config_from_saelens(raw: dict[str, Any], file: Path) -> SAEConfig:
    """Our config for a directory that sae-lens wrote (its weights already take raw activations)."""
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        _fail(file, "architecture", arch, f"one of {', '.join(sorted(_FROM_SAELENS))}")
    d_in, d_sae = _positive_int(raw, "d_in", file), _positive_int(raw, "d_sae", file)
    norm = raw.get("normalize_activations", "none")
    if norm == "expected_average_only_in":
        logger.warning("%s: normalize_activations='expected_average_only_in' with no folded factor; inputs are "
                       "used as they come, as sae-lens' load_from_disk does", file)
    elif norm not in ("none", None):
        _fail(file, "normalize_activations", norm, "'none' or 'expected_average_only_in' (run-time normalisations "
              "are not supported)")
    if raw.get("reshape_activations", "none") not in ("none", None):
        logger.warning("%s: reshape_activations=%r; pass inputs flattened to [..., d_in]",
                       file, raw["reshape_activations"])
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if key in raw and not isinstance(raw[key], bool):
            _fail(file, key, raw[key], "true or false")
    meta = raw.get("metadata") or {}
    k = _int_k(raw, file, d_sae, arch) if arch in ("topk", "batchtopk") else 32
    return SAEConfig(d_in=d_in, d_sae=d_sae, architecture=_FROM_SAELENS[arch], k=k, normalize_activations=False,
                     hook_name=meta.get("hook_name", raw.get("hook_name")),
                     model_name=meta.get("model_name", raw.get("model_name")),
                     dtype=_dtype_name(raw.get("dtype", "float32"), file))


def _our_config(raw: dict[str, Any], ours: Any, file: Path) -> tuple[SAEConfig, float]:
    """Our exact config and scaling factor from ``metadata["lightning_llm_inst"]``, checked against
    the top-level fields sae-lens reads."""
    if not isinstance(ours, dict) or not isinstance(ours.get("config"), dict):
        _fail(file, f"metadata.{METADATA_KEY}", ours, "an object with a 'config' object")
    try:
        cfg = SAEConfig.from_dict(ours["config"])
    except (TypeError, ValueError) as e:
        raise SAEFileError(f"{file}: metadata.{METADATA_KEY}.config: {' '.join(str(e).split())}") from None
    scaling = ours.get("scaling_factor", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
            or scaling <= 0:
        _fail(file, f"metadata.{METADATA_KEY}.scaling_factor", scaling, "a finite number > 0")
    for key, want in (("d_in", cfg.d_in), ("d_sae", cfg.d_sae)):
        if _positive_int(raw, key, file) != want:
            _fail(file, key, raw[key], f"{want}, as in metadata.{METADATA_KEY}.config")
    if raw.get("architecture") != SAELENS_ARCHITECTURES[cfg.architecture]:
        _fail(file, "architecture", raw.get("architecture"),
              f"{SAELENS_ARCHITECTURES[cfg.architecture]!r} for our {cfg.architecture!r} config")
    if cfg.architecture == "topk" and _int_k(raw, file, cfg.d_sae, "topk") != cfg.k:
        _fail(file, "k", raw["k"], f"{cfg.k}, as in metadata.{METADATA_KEY}.config")
    _dtype_name(raw.get("dtype", cfg.dtype), file)
    return cfg, float(scaling)


def _expected_tensors(cfg: SAEConfig, ours: bool, header: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Tensor name -> the shapes it may have, for every tensor the file must (or may) hold."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    want: dict[str, tuple[tuple[int, ...], ...]] = {"W_enc": ((d_in, d_sae),), "W_dec": ((d_sae, d_in),),
                                                    "b_enc": ((d_sae,),), "b_dec": ((d_in,),)}
    scalar = ((), (1,))
    if ours:
        if cfg.architecture in ("jumprelu", "batchtopk"):
            want["threshold"] = ((d_sae,),)
        return want
    if cfg.architecture == "jumprelu":  # newer files hold threshold, older ones log_threshold
        want["log_threshold" if "log_threshold" in header and "threshold" not in header else "threshold"] = ((d_sae,),)
    if cfg.architecture == "batchtopk":
        want["topk_threshold"] = scalar
    if "scaling_factor" in header:  # optional: a finetuning scaling factor, which must be 1
        want["scaling_factor"] = (*scalar, (d_sae,))
    return want


def _check_header(header: dict[str, tuple[tuple[int, ...], str]], want: dict[str, tuple[tuple[int, ...], ...]],
                  cfg: SAEConfig, file: Path) -> None:
    missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing:
        _fail(file, "tensors", sorted(header), f"a {cfg.architecture} SAE's tensors {sorted(want)}; missing {missing}")
    if extra:
        _fail(file, "tensors", sorted(header), f"a {cfg.architecture} SAE's tensors {sorted(want)}; unexpected {extra}")
    for name, shapes in want.items():
        shape, dtype = header[name]
        if shape not in shapes:
            allowed = " or ".join(str(list(s)) for s in shapes)
            _fail(file, f"{name}.shape", list(shape), f"{allowed} for d_in={cfg.d_in}, d_sae={cfg.d_sae} (cfg.json)")
        if dtype not in _TENSOR_DTYPES:
            _fail(file, f"{name}.dtype", dtype, f"a floating-point dtype: {', '.join(_TENSOR_DTYPES)}")


def _raw_units_state(raw: dict[str, Any], tensors: dict[str, Tensor], file: Path) -> dict[str, Tensor]:
    """Weights in our inference form: b_dec subtracted from the input, no decoder-norm rescaling."""
    t = {name: v.to(torch.float64) for name, v in tensors.items()}
    if "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    if "topk_threshold" in t:  # a batchtopk training SAE saved by sae-lens
        t["threshold"] = t.pop("topk_threshold").reshape(())
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        _fail(file, "scaling_factor", "values other than 1", "1 (a finetuning scaling factor is not supported)")
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

    The files are untrusted input: ``cfg.json`` is checked (architecture, ``d_in``, ``d_sae``,
    ``k``, ``dtype``, our scaling factor) against the shapes and dtypes in the safetensors header
    before any tensor is read or any parameter allocated, and every tensor must be finite. A
    problem raises :class:`SAEFileError` (a ``ValueError``), one line naming the file, the field,
    the value and what was expected. Nothing is unpickled.
    """
    path = Path(directory)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_saelens: {p} does not exist (expected {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    raw = _read_cfg(cfg_path)
    header = _read_header(weights_path)
    ours = (raw.get("metadata") or {}).get(METADATA_KEY)
    if ours is not None:
        cfg, scaling = _our_config(raw, ours, cfg_path)
    else:
        cfg, scaling = _config_from_saelens(raw, cfg_path), 1.0
    _check_header(header, _expected_tensors(cfg, ours is not None, header), cfg, weights_path)
    tensors = _safetensors().load_file(str(weights_path), device="cpu")  # sizes now match cfg.json
    for name, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            _fail(weights_path, name, "NaN or inf values", "finite values")
    state = _raw_units_state(raw, tensors, weights_path)
    # unfold the scaling factor: our parameters live in the normalized units
    state["W_enc"] = state["W_enc"] / scaling
    state["W_dec"] = state["W_dec"] * scaling
    state["b_dec"] = state["b_dec"] * scaling
    if cfg.architecture == "batchtopk":
        threshold = state["threshold"].reshape(-1)
        if not torch.all(threshold == threshold[0]):
            _fail(weights_path, "threshold", "different values per latent", "one threshold for every latent (batchtopk)")
        state["threshold"] = threshold[0]
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name, value in state.items():
            target = getattr(sae, name)
            target.copy_(value.reshape(target.shape).to(target.dtype))
        sae.scaling_factor.fill_(scaling)
        if cfg.architecture == "batchtopk":
            sae.threshold_updates.fill_(1)
    return sae.to(device)
