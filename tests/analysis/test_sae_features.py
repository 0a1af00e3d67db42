"""SAE features in a store summary: densities, top contexts and reconstruction quality equal what a
naive pass over the rows at once computes (without each sequence's first token and special tokens,
by default), whatever the block size; the summary's other keys stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_llm_inst import InstrumentationFramework
from lightning_llm_inst.analysis.summary import sae_feature_stats, summarize_sae_features, token_contexts
from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder
from lightning_llm_inst.store import ActivationStore, StoreWriter

HOOK = "blocks.2.hook_resid_post"
D_IN, D_SAE, SEQS, SEQ_LEN = 16, 40, 12, 25
TOKENS = 30  # token t writes 2 * decoder row t; latents TOKENS.. get no planted token


def _directions() -> torch.Tensor:
    d = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(3))
    return d / d.norm(dim=1, keepdim=True)  # [d_sae, d_in]


def _write_store(path: Path, extra_hook: bool = False, nan_row: int | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    dirs = _directions()
    with StoreWriter(path, codec="lz4", chunk_size="2KiB") as w:
        for s in range(SEQS):
            ids = torch.randint(0, TOKENS, (SEQ_LEN,), generator=g)
            x = 2 * dirs[ids] + 0.1 * torch.randn(SEQ_LEN, D_IN, generator=g)  # [seq, d_in]
            if nan_row is not None and s == 0:
                x[nan_row] = float("nan")
            acts = {HOOK: x, "blocks.3.hook_mlp_out": x[:, :8]} if extra_hook else {HOOK: x}
            w.append(acts, tokens={"input_ids": ids + 100, "sequence_id": torch.full((SEQ_LEN,), 7 * s),
                                   "position": torch.arange(SEQ_LEN, dtype=torch.int32)})
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return _write_store(tmp_path_factory.mktemp("sae_features") / "store")


def planted_sae(hook_name: str | None = HOOK, k: int = 3) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, hook_name=hook_name))
    with torch.no_grad():
        sae.W_dec.copy_(_directions())
        sae.W_enc.copy_(_directions().T)
        sae.b_enc.zero_()
        sae.b_enc[-1] = -50.0  # never fires
        sae.b_dec.zero_()
    return sae


class WordTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{i}" for i in ids)


def test_summary_gains_sae_features_equal_to_a_naive_pass(store_path):
    sae = planted_sae()
    report = InstrumentationFramework().analyze_activations(store_path, top_k=3, sae=sae, contexts_per_feature=4,
                                                           context_window=3)
    assert {"path", "rows", "shards", "codec", "hooks", "compression_ratio"} <= set(report)
    assert len(report["hooks"][HOOK]["top_explained_variance_ratio"]) == 3
    feats = report["sae_features"]
    store = ActivationStore(store_path)
    everything = store[HOOK][:]  # [rows, d_in]
    kept = store.tokens["position"][:] != 0  # the first token of each sequence is left out by default
    with torch.no_grad():
        recon_all = sae(everything).reconstruction
        recon, latents = sae(everything[kept])
    x = everything[kept]
    x64, err = x.double(), (recon.double() - x.double())
    assert feats["hook"] == HOOK and feats["d_sae"] == D_SAE and store.rows == SEQS * SEQ_LEN
    assert feats["rows"] == SEQS * (SEQ_LEN - 1) and feats["excluded_rows"] == SEQS
    assert feats["mse"] == pytest.approx(float(err.pow(2).mean()), rel=1e-6)
    all64 = everything.double()
    assert feats["fvu_all_tokens"] == pytest.approx(
        float((recon_all.double() - all64).pow(2).sum() / (all64 - all64.mean(0)).pow(2).sum()), rel=1e-6)
    assert feats["fvu"] == pytest.approx(float(err.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()), rel=1e-6)
    assert feats["l0"] == pytest.approx(float((latents != 0).sum(1).double().mean()))
    density = (latents != 0).double().mean(0)
    assert feats["density"] == pytest.approx(density.tolist())
    assert feats["dead_fraction"] == pytest.approx(float((density == 0).double().mean())) and feats["dead_fraction"] > 0
    ids = store.tokens["input_ids"][:]
    kept_rows = torch.nonzero(kept)[:, 0]  # row ids of x's rows
    for f in feats["features"]:
        i = f["index"]
        fired = torch.nonzero(latents[:, i] != 0)[:, 0]
        want = latents[fired, i].sort(descending=True).values[:4]
        got = f["top_contexts"]
        assert f["density"] == pytest.approx(float(density[i]))
        assert [c["activation"] for c in got] == pytest.approx(want.tolist())
        for c in got:
            assert c["position"] != 0
            assert float(latents[int(torch.searchsorted(kept_rows, c["row"])), i]) == pytest.approx(c["activation"])
            assert c["token_id"] == int(ids[c["row"]]) == c["context_ids"][c["context_index"]]
            if i < TOKENS:
                assert c["token_id"] == 100 + i  # a planted latent fires most on its own token
        if not len(fired):
            assert got == [] and f["max_activation"] == 0


def test_blocks_and_row_limit_do_not_change_the_result(store_path):
    store = ActivationStore(store_path)
    whole = sae_feature_stats(planted_sae(), store, contexts=3)
    small = sae_feature_stats(planted_sae(), store, contexts=3, block_rows=7)
    assert torch.equal(whole.top_rows, small.top_rows) and torch.allclose(whole.top_values, small.top_values)
    assert torch.equal(whole.density, small.density)
    assert small.fvu == pytest.approx(whole.fvu, rel=1e-9) and small.l0 == pytest.approx(whole.l0)
    assert torch.equal(whole.position_rows, torch.full((SEQ_LEN,), SEQS))
    head = sae_feature_stats(planted_sae(), store, contexts=3, max_rows=50, block_rows=16)
    assert head.rows == 48 and head.excluded_rows == 2 and int(head.position_rows.sum()) == 50  # rows 0 and 25
    assert int(head.top_rows.max()) < 50


def test_contexts_stay_inside_their_sequence(store_path):
    store = ActivationStore(store_path)
    first, last = token_contexts(store, [SEQ_LEN, SEQ_LEN - 1], window=4)  # position 0 of seq 1, end of seq 0
    ids = store.tokens["input_ids"][:].tolist()
    assert first["position"] == 0 and first["context_index"] == 0
    assert first["context_ids"] == ids[SEQ_LEN:SEQ_LEN + 5] and first["sequence_id"] == 7
    assert last["position"] == SEQ_LEN - 1 and last["context_index"] == 4
    assert last["context_ids"] == ids[SEQ_LEN - 5:SEQ_LEN]
    with pytest.raises(ValueError, match="rows"):
        token_contexts(store, [store.rows])


def test_text_with_a_tokenizer_and_chosen_features(store_path):
    feats = summarize_sae_features(store_path, planted_sae(), tokenizer=WordTokenizer(), features=[0, 5],
                                   contexts_per_feature=2, context_window=2)
    assert [f["index"] for f in feats["features"]] == [0, 5] and len(feats["density"]) == D_SAE
    for f in feats["features"]:
        for c in f["top_contexts"]:
            assert c["token"] == f" w{100 + f['index']}"
            assert f"[[ w{100 + f['index']}]]" in c["text"]


def test_sae_from_a_saelens_directory(tmp_path, store_path):
    saelens = pytest.importorskip("lightning_llm_inst.sae.saelens")
    sae = planted_sae()
    saelens.save_saelens(sae, tmp_path / "sae")
    from_dir = summarize_sae_features(store_path, tmp_path / "sae", contexts_per_feature=2)
    direct = summarize_sae_features(store_path, sae, contexts_per_feature=2)
    assert from_dir["fvu"] == pytest.approx(direct["fvu"], rel=1e-5)
    assert from_dir["density"] == pytest.approx(direct["density"])


def test_hook_choice_and_errors(tmp_path):
    path = _write_store(tmp_path / "two_hooks", extra_hook=True)
    assert summarize_sae_features(path, planted_sae())["hook"] == HOOK  # from the SAE's config
    with pytest.raises(ValueError, match="hook: got None"):
        summarize_sae_features(path, planted_sae(hook_name=None))
    with pytest.raises(ValueError, match="d_in=16"):
        summarize_sae_features(path, planted_sae(), "blocks.3.hook_mlp_out")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        summarize_sae_features(path, planted_sae(), "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="features"):
        summarize_sae_features(path, planted_sae(), features=[D_SAE])
    with pytest.raises(TypeError, match="sae"):
        summarize_sae_features(path, object())


def test_nonfinite_rows_are_left_out(tmp_path, store_path):
    path = _write_store(tmp_path / "nan", nan_row=3)
    stats = sae_feature_stats(planted_sae(), ActivationStore(path), contexts=2)
    clean = sae_feature_stats(planted_sae(), ActivationStore(store_path), contexts=2)
    assert stats.rows == SEQS * (SEQ_LEN - 1) - 1 and int(stats.position_rows[3]) == SEQS - 1
    assert 0 < stats.fvu == pytest.approx(clean.fvu, rel=0.05)
    assert 3 not in stats.top_rows.tolist()[0]


def test_huge_first_rows_and_special_tokens_are_left_out_of_fvu(tmp_path):
    """Position-0 rows 100x the others' norm (attention sinks) and special tokens from the store's model config:
    ``fvu`` is the naive FVU without them; ``fvu_all_tokens`` with them, which they make look far better."""
    g = torch.Generator().manual_seed(5)
    dirs = _directions()
    path = tmp_path / "sinks"
    meta = {"model": {"name": "m", "config": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}}}
    with StoreWriter(path, codec="lz4", chunk_size="2KiB", metadata=meta) as w:
        for s in range(SEQS):
            ids = torch.randint(3, TOKENS, (SEQ_LEN,), generator=g)
            ids[7 + s % 5] = 2  # an eos inside the text
            x = 2 * dirs[ids] + 0.3 * torch.randn(SEQ_LEN, D_IN, generator=g)
            x[0] = 100 * dirs[-2] + torch.randn(D_IN, generator=g)  # the sink: huge, and off the planted latents
            w.append({HOOK: x}, tokens={"input_ids": ids, "sequence_id": torch.full((SEQ_LEN,), s),
                                        "position": torch.arange(SEQ_LEN, dtype=torch.int32)})
    store = ActivationStore(path)
    sae = planted_sae(k=1)  # one latent per row: the sinks too are reconstructed well, as trained SAEs do
    stats = sae_feature_stats(sae, store, contexts=2, block_rows=11)
    x = store[HOOK][:].double()
    special = (store.tokens["position"][:] == 0) | (store.tokens["input_ids"][:] == 2)
    with torch.no_grad():
        recon = sae(store[HOOK][:]).reconstruction.double()

    def naive(rows: torch.Tensor) -> float:
        return float((recon[rows] - x[rows]).pow(2).sum() / (x[rows] - x[rows].mean(0)).pow(2).sum())

    assert stats.rows == int((~special).sum()) == SEQS * (SEQ_LEN - 2) and stats.excluded_rows == 2 * SEQS
    assert stats.fvu == pytest.approx(naive(~special), rel=1e-6)
    assert stats.fvu_all_tokens == pytest.approx(naive(torch.ones_like(special)), rel=1e-6)
    assert stats.fvu_all_tokens < stats.fvu / 3  # the sinks' variance hides the error on every other row
    kept = sae_feature_stats(sae, store, contexts=2, exclude_bos=False, exclude_special_tokens=False)
    assert kept.rows == store.rows and kept.fvu == pytest.approx(stats.fvu_all_tokens, rel=1e-6)
    only_bos = sae_feature_stats(sae, store, contexts=2, special_token_ids=[])
    assert only_bos.rows == SEQS * (SEQ_LEN - 1)


@pytest.mark.slow
def test_smollm2_tokenizer_by_name(store_path):
    models = pytest.importorskip("lightning_llm_inst.models")
    try:
        models.smollm2_path()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    tok = models.load_smollm2_tokenizer()
    feats = summarize_sae_features(store_path, planted_sae(), tokenizer="smollm2", features=[1], context_window=2)
    (context, *_) = feats["features"][0]["top_contexts"]
    assert context["token"] == tok.decode([context["token_id"]])
    assert f"[[{context['token']}]]" in context["text"]
