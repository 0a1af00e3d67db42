"""SAE training under DDP (2 CPU processes, gloo): ranks stay identical, and validation metrics
reduced across ranks equal a single-process computation over the same held-out rows.

Run as a script, this file is the DDP job (Lightning re-launches it for rank 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HOOK = "blocks.4.hook_resid_post"
D_IN = 24
DATA = {"batch_size": 100, "num_workers": 0, "val_fraction": 0.3, "seed": 7}  # ranks: 7 and 6 val batches


def write_store(path: Path) -> None:
    from lightning_llm_inst.store import StoreWriter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, D_IN, generator=g) * torch.linspace(0.5, 2.0, D_IN) + 1.0  # [rows, d_in]
    x[:, :4] = torch.relu(x[:, :4] * 3)  # some sparse-ish directions
    with StoreWriter(path, codec="lz4", chunk_size="4KiB") as w:
        for a in range(0, len(x), 500):
            w.append({HOOK: x[a : a + 500]})


def job(store: str, out: str) -> None:
    """Train a few steps on 2 processes, then validate; every rank saves its SAE, rank 0 the metrics."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_llm_inst.sae.data import ActivationDataModule
    from lightning_llm_inst.sae.module import SAELensExport, SAEModule
    from lightning_llm_inst.viz.tensorboard import SAETensorBoard

    torch.set_num_threads(1)
    dm = ActivationDataModule(store, **{**DATA, "num_workers": 1})  # batches read in a worker process
    module = SAEModule(expansion_factor=2, k=3, lr=1e-2, init_sample_rows=1024, dead_window_tokens=512)
    # the rank-0 callbacks must not deadlock the other rank (no collective inside rank-0-only code)
    callbacks = [SAELensExport(f"{out}/export"), SAETensorBoard(num_features=4, projector_points=50, max_rows=2000)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, num_sanity_val_steps=0,
                        val_check_interval=3, logger=TensorBoardLogger(f"{out}/tb", name="run"), callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    torch.save({k: v.clone() for k, v in module.sae.state_dict().items()}, f"{out}/sae_rank{trainer.global_rank}.pt")
    metrics = trainer.validate(module, dm, verbose=False)[0]
    if trainer.is_global_zero:
        Path(out, "val.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process_reference(tmp_path):
    from lightning_llm_inst.sae import metrics as M
    from lightning_llm_inst.sae.data import ActivationDataModule
    from lightning_llm_inst.sae.model import SparseAutoencoder

    store = tmp_path / "store"
    write_store(store)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(store), str(tmp_path)], check=False, capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"sae_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert (tmp_path / "export" / "sae_weights.safetensors").is_file()  # written by rank 0 at fit end
    assert list((tmp_path / "tb").rglob("projector_config.pbtxt"))  # views written by rank 0
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:  # one broadcast initialisation, identical all-reduced steps
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert float(ranks[0]["scaling_factor"]) != 1.0

    module_state = ranks[0]
    dm = ActivationDataModule(store, **DATA)
    dm.setup("validate")
    from lightning_llm_inst.sae.model import SAEConfig

    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=2 * D_IN, k=3))
    sae.load_state_dict(module_state)
    x = torch.cat(list(dm.val_dataloader()))  # every held-out row, once, in one process  # [rows, d_in]
    assert len(x) == dm.val_rows_held_out
    with torch.no_grad():
        recon, latents = sae(x)
        loss = sae.training_loss(x)["loss"]
    got = json.loads((tmp_path / "val.json").read_text())
    assert got["val/fvu"] == pytest.approx(float(M.fraction_of_variance_unexplained(x, recon)), rel=1e-5)
    assert got["val/mse"] == pytest.approx(float(M.reconstruction_mse(x, recon)), rel=1e-5)
    assert got["val/l0"] == pytest.approx(float(M.l0(latents)), rel=1e-9)
    assert got["val/dead_fraction"] == pytest.approx(float((M.feature_density(latents) == 0).double().mean()))
    assert got["val/loss"] == pytest.approx(float(loss), rel=1e-5)  # batch means, weighted by rows


if __name__ == "__main__":
    job(sys.argv[1], sys.argv[2])
