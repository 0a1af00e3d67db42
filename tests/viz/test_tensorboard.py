"""TensorBoard views of an SAE, read back with TensorBoard's own reader: scalars, histograms, the
top-context text, the figure and the projector files; and the Lightning callback writing them."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder
from lightning_llm_inst.store import ActivationStore, StoreWriter
from lightning_llm_inst.viz.tensorboard import SAETensorBoard, write_sae_views

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE, SEQS, SEQ_LEN = 32, 64, 24, 20
DEAD = D_SAE - 1  # a latent that never fires
TOKENS = D_SAE - 1  # token t is planted along decoder row t


def _directions() -> torch.Tensor:
    d = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(1))
    return d / d.norm(dim=1, keepdim=True)  # [d_sae, d_in]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """Token t (< TOKENS) writes 3 * direction t plus noise: latent t of planted_sae fires most on it."""
    path = tmp_path_factory.mktemp("viz") / "store"
    g = torch.Generator().manual_seed(0)
    dirs = _directions()
    with StoreWriter(path, codec="zstd", chunk_size="4KiB") as w:
        for s in range(SEQS):
            ids = torch.randint(0, TOKENS, (SEQ_LEN,), generator=g)
            x = 3 * dirs[ids] + 0.05 * torch.randn(SEQ_LEN, D_IN, generator=g)  # [seq, d_in]
            w.append({HOOK: x}, tokens={"input_ids": ids, "sequence_id": torch.full((SEQ_LEN,), s),
                                        "position": torch.arange(SEQ_LEN, dtype=torch.int32)})
    return path


def planted_sae() -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=2, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec.copy_(_directions())
        sae.W_enc.copy_(_directions().T)
        sae.b_enc.zero_()
        sae.b_enc[DEAD] = -100.0
        sae.b_dec.zero_()
    return sae


class WordTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{i}" for i in ids)


def _events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0,
                                                       "compressedHistograms": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag)]


def _projector(logdir: Path) -> list[tuple[list[list[float]], list[list[str]]]]:
    config = (logdir / "projector_config.pbtxt").read_text()
    found = []
    for tensor_path, meta_path in zip(re.findall(r'tensor_path: "([^"]+)"', config),
                                      re.findall(r'metadata_path: "([^"]+)"', config)):
        rows = [[float(v) for v in line.split("\t")] for line in (logdir / tensor_path).read_text().splitlines()]
        with open(logdir / meta_path, newline="") as f:
            meta = list(csv.reader(f, delimiter="\t"))
        found.append((rows, meta))
    return found


def test_views_read_back_with_tensorboard(tmp_path, store_path):
    sae = planted_sae()
    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir)) as writer:
        stats = write_sae_views(writer, sae, store_path, step=7, num_features=5, contexts_per_feature=2)
    acc = _events(logdir)
    tags = acc.Tags()
    assert {"sae/fvu", "sae/fvu_all_tokens", "sae/mse", "sae/l0", "sae/dead_fraction"} <= set(tags["scalars"])
    assert acc.Scalars("sae/fvu_all_tokens")[0].value == pytest.approx(stats.fvu_all_tokens, rel=1e-6)
    assert stats.rows == SEQS * (SEQ_LEN - 1) and stats.excluded_rows == SEQS  # position 0 is left out
    assert acc.Scalars("sae/l0")[0].step == 7
    assert acc.Scalars("sae/l0")[0].value == pytest.approx(stats.l0) and 0 < stats.l0 <= 2
    assert acc.Scalars("sae/fvu")[0].value == pytest.approx(stats.fvu, rel=1e-6) and stats.fvu < 0.5
    assert acc.Scalars("sae/dead_fraction")[0].value == pytest.approx(stats.dead_fraction)
    assert stats.dead_fraction >= 1 / D_SAE
    # histograms: log10 density of live latents only (finite), one decoder norm per latent
    density = acc.Histograms("sae/log10_feature_density")[0].histogram_value
    assert density.num == int((stats.density > 0).sum()) < D_SAE
    assert math.isfinite(density.min) and density.max <= 0
    norms = acc.Histograms("sae/decoder_norm")[0].histogram_value
    assert norms.num == D_SAE and norms.min == pytest.approx(1, abs=1e-5) and norms.max == pytest.approx(1, abs=1e-5)
    # text: one table row per context; a planted latent's activating token is its own token id
    (step, text), = _text(acc, "sae/top_contexts/text_summary")
    assert step == 7
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 5
    for line in rows:
        latent = int(line.split("|")[1])
        assert f"**{latent}**" in line
    assert f"| {DEAD} |" not in text  # only live latents are sampled
    # figure
    (image,) = acc.Images("sae/reconstruction_error_by_position")
    assert image.width > 100 and image.height > 100 and image.encoded_image_string[:4] == b"\x89PNG"
    # projector: every decoder direction, labelled with latent, top token and density
    ((vectors, meta),) = _projector(logdir)
    assert meta[0] == ["latent", "top_token", "density"] and len(meta) == D_SAE + 1 and len(vectors) == D_SAE
    for (latent, top_token, _), vec in zip(meta[1:], vectors):
        i = int(latent)
        assert torch.allclose(torch.tensor(vec), sae.W_dec[i].detach(), atol=1e-5)
        assert top_token == ("(never fired)" if i == DEAD else str(i))


def test_tokenizer_text_and_projector_cap(tmp_path, store_path):
    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir)) as writer:
        stats = write_sae_views(writer, planted_sae(), ActivationStore(store_path), HOOK, tokenizer=WordTokenizer(),
                                projector_points=10, num_features=3, views=["contexts", "projector"])
    acc = _events(logdir)
    assert not acc.Tags()["scalars"] and not acc.Tags()["images"]
    (_, text), = _text(acc, "sae/top_contexts/text_summary")
    for line in (line for line in text.splitlines() if re.match(r"\| \d+ \|", line)):
        assert f"**w{int(line.split('|')[1])}**" in line
    ((vectors, meta),) = _projector(logdir)
    assert len(vectors) == 10 == len(meta) - 1
    shown = [float(m[2]) for m in meta[1:]]
    assert shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(float(stats.density.max()), rel=1e-2)
    assert all(m[1] == f"w{m[0]}" for m in meta[1:])


def test_nonfinite_decoder_row_stays_out_of_histogram(tmp_path, store_path):
    sae = planted_sae()
    with torch.no_grad():
        sae.W_dec[DEAD] = float("nan")
    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir)) as writer:
        write_sae_views(writer, sae, store_path, views=["histograms"])
    assert _events(logdir).Histograms("sae/decoder_norm")[0].histogram_value.num == D_SAE - 1


def test_argument_errors(tmp_path, store_path):
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        with pytest.raises(ValueError, match="projector_points"):
            write_sae_views(writer, planted_sae(), store_path, projector_points=10_001)
        with pytest.raises(ValueError, match="views"):
            write_sae_views(writer, planted_sae(), store_path, views=["scalars", "movie"])
        with pytest.raises(ValueError, match="hook"):
            write_sae_views(writer, planted_sae(), store_path, "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="tokenizer"):
        SAETensorBoard(tokenizer="gpt-17")
    with pytest.raises(ValueError, match="every_n_validations"):
        SAETensorBoard(every_n_validations=0)


# ---------------------------------------------------------------------- the callback

lightning = pytest.importorskip("lightning")


class _SAELightning(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.sae = planted_sae()

    def training_step(self, batch, batch_idx):
        return self.sae.training_loss(batch[0])["loss"]

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.sae.training_loss(batch[0])["loss"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.sae.parameters(), lr=1e-3)


class _StoreData(lightning.LightningDataModule):
    def __init__(self, path: Path, expose: bool = True) -> None:
        super().__init__()
        if expose:
            self.store, self.hook = ActivationStore(path), HOOK
        self.rows = ActivationStore(path)[HOOK][:]

    def _loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.rows), batch_size=160)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def _trainer(tmp_path: Path, callback: SAETensorBoard, logger=True) -> lightning.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return lightning.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1, accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="run") if logger else False, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)


def test_callback_writes_at_validation_and_projector_at_fit_end(tmp_path, store_path):
    trainer = _trainer(tmp_path, SAETensorBoard(num_features=4, max_rows=200))
    trainer.fit(_SAELightning(), datamodule=_StoreData(store_path))
    logdir = Path(trainer.logger.log_dir)
    acc = _events(logdir)
    assert [e.step for e in acc.Scalars("sae/fvu")] == [2, 4]  # after each epoch's validation, not the sanity check
    assert [step for step, _ in _text(acc, "sae/top_contexts/text_summary")] == [2, 4]
    assert len(acc.Histograms("sae/log10_feature_density")) == 2
    assert len(acc.Images("sae/reconstruction_error_by_position")) == 2
    ((vectors, _),) = _projector(logdir)  # once, at the end of fit
    assert len(vectors) == D_SAE and (logdir / "00004").is_dir()


def test_callback_store_from_its_arguments_and_without_tensorboard(tmp_path, store_path):
    trainer = _trainer(tmp_path, SAETensorBoard(store=str(store_path), hook=HOOK, max_rows=100))
    trainer.fit(_SAELightning(), datamodule=_StoreData(store_path, expose=False))
    assert [e.step for e in _events(Path(trainer.logger.log_dir)).Scalars("sae/l0")] == [2, 4]
    with pytest.raises(ValueError, match="store"):
        _trainer(tmp_path, SAETensorBoard()).fit(_SAELightning(), datamodule=_StoreData(store_path, expose=False))
    quiet = _trainer(tmp_path / "none", SAETensorBoard(), logger=False)
    with pytest.warns(UserWarning, match="TensorBoardLogger"):
        quiet.fit(_SAELightning(), datamodule=_StoreData(store_path))
    assert not list((tmp_path / "none").rglob("events.out.tfevents*"))


def test_callback_with_the_sae_training_stack(tmp_path, store_path):
    """SAEModule + ActivationDataModule: the callback finds the SAE, the store and the hook by itself."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_llm_inst.sae.data import ActivationDataModule
    from lightning_llm_inst.sae.module import SAEModule

    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="run"),
                                callbacks=[SAETensorBoard(num_features=4, projector_points=20)],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                log_every_n_steps=1)
    module = SAEModule(d_sae=48, k=4)
    trainer.fit(module, datamodule=ActivationDataModule(str(store_path), batch_size=128, num_workers=0,
                                                        val_fraction=0.2, exclude_bos=False))
    logdir = Path(trainer.logger.log_dir)
    acc = _events(logdir)
    steps = [e.step for e in acc.Scalars("sae/fvu")]
    assert len(steps) == 2 and steps[-1] == trainer.global_step
    # the datamodule's choice of rows carries over: with nothing left out both FVUs agree
    fvu, fvu_all = acc.Scalars("sae/fvu")[-1].value, acc.Scalars("sae/fvu_all_tokens")[-1].value
    assert fvu == pytest.approx(fvu_all, rel=1e-6)
    assert {step for step, _ in _text(acc, "sae/top_contexts/text_summary")} == set(steps)
    ((vectors, _),) = _projector(logdir)
    assert len(vectors) == 20 and len(vectors[0]) == D_IN
