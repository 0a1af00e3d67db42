"""SAE training benchmark: our Lightning trainer against SAELens' own trainer, on the same
activations, the same initial weights and the same batches in the same order.

What it measures (one process, one run):

Activations. SmolLM2-135M-Instruct (``load_smollm2``, float32) or, with ``--random-init``, the same
architecture randomly initialised (LlamaForCausalLM: 30 layers, hidden 576, 9 / 3 heads, MLP 1536,
vocabulary 49152, tied embeddings) fed uniform random token ids. Text for the real model: the
example corpus (``corpus_texts()``), then ``pydoc_data.topics`` (sorted by key), then the docstrings
of the standard library's modules, classes and functions, then those of the installed ``transformers``
package (files sorted by path, parsed with ``ast``, ``test``/``idlelib``/``site-packages`` skipped,
80 characters or more), each text followed by ``<|im_end|>``, concatenated and cut into ``--seq-len``
token sequences (no padding). The first two sources hold about 124k tokens and the stdlib docstrings
about 380k more, short of 500k training + held-out tokens, hence the last source. A seeded permutation holds out ``--eval-tokens`` worth of whole
sequences; the rest (at least ``--tokens`` stored rows) is captured with our capture API,
``InstrumentationFramework(InstrumentationConfig(hooks=[HOOK], compression_algorithm="zstd",
drop_bos=True))``, into a training store, and the held-out sequences into an evaluation store.
During the capture the model runs its first ``L + 1`` decoder layers only (``blocks.L`` does not
depend on later layers) and computes logits for the last position only (``logits_to_keep=1``); the
full model is used for the CE evaluation. ``--store DIR`` keeps both stores (and the held-out ids)
and reuses them when the settings match.

Training (both trainers, ``--steps`` steps of ``--batch`` rows, float32, no autocast):

- SAE: TopK, k = 32, d_sae = 16 x 576 = 9216, AuxK with k_aux = d_in / 2 = 288 and coefficient
  1/32, Adam (0.9, 0.999) at a constant ``--lr`` (default: our default 2e-4 / sqrt(d_sae / 16384)),
  gradient norm clipped to 1.0 (SAELens always clips; ours gets ``Trainer(gradient_clip_val=1.0)``),
  inputs scaled by one factor to a mean norm of sqrt(d_in).
- Same start: ours is built first (``torch.manual_seed(--seed)``); its initial W_dec (unit-norm rows),
  W_enc = W_dec^T, b_enc = 0, and the b_dec (geometric median) and scaling factor that
  ``initialize_from_data`` computes from ``ActivationDataModule.sample(16384)`` are copied into the
  SAELens SAE (``--saelens-init copy``, default) and its ``ActivationScaler``. ``--saelens-init native``
  keeps SAELens' own init instead (kaiming-uniform directions, decoder norm 0.1, b_dec = 0); the
  scaling factor is preset from the same sample either way (SAELens would otherwise estimate it by
  consuming batches from the data provider).
- Same data: the batches are the row lists of our ``StoreBatchSampler`` (chunk-shuffled, seed
  ``--seed``, epochs 0, 1, ...). Ours reads them from the store through ``ActivationDataModule``
  (``--num-workers`` DataLoader processes decode zstd chunks). SAELens gets an iterator that gathers
  the same rows from the whole training store held in memory on the training device. Both sides
  record a checksum of every batch (sum, and column 0 weighted by row position); the result says
  whether all of them agree.
- Dead latents during training (AuxK's input): a latent is dead after ``--dead-window-steps`` W
  batches without firing. SAELens: ``dead_feature_window=W`` (counts steps, dead when > W); ours:
  ``dead_window_tokens=(W + 1) x batch`` (counts tokens, dead when >= the window), which marks the
  same latents for full batches.

Differences that remain (the two codebases allow no closer match):

1. decoder norm: ours keeps W_dec rows at unit norm (gradient component parallel to each row removed
   before the step, rows renormalised after it); SAELens' TopK leaves W_dec free and divides it out
   (``rescale_acts_by_decoder_norm=True``: pre-activations times ||W_dec||, latents divided by it);
2. AuxK candidates: ours takes the top k_aux of ReLU(pre-activation) over dead latents, SAELens of
   the raw pre-activations;
3. clipping order: ours clips after removing the parallel gradient component;
4. per-step work: ours computes and logs loss, MSE, FVU, L0 and dead fraction of every batch
   (``self.log``, no logger attached); SAELens (wandb off) only updates its firing counters.

Timing. Each trainer's training loop alone: ours from Lightning's ``on_train_start`` (after the
data-based init) to ``on_train_end``, so it includes starting the DataLoader workers and reading every
batch from the store; SAELens ``SAETrainer.fit()`` with the scaling factor preset, including the
in-memory gather of each batch and the final folding of the scaling factor. Synchronised on CUDA.
train tokens/s = rows trained / loop seconds; "steady" leaves out the first ``--skip-steps`` steps.
Model loading, capture, the init computation and evaluation are outside. The process CPU time and
the load average around each loop are recorded (other processes on the machine slow both).

Evaluation, the same for both SAEs (SAELens' is saved with ``save_inference_model`` and read back with
``load_saelens``; the largest reconstruction difference between the two forms is reported):

- FVU, L0 and dead % on every row of the evaluation store (held-out tokens, BOS dropped as in
  training): FVU = sum of squared errors / sum of squared deviations from the per-feature mean over
  those rows; L0 = mean active latents per token; dead % = latents that fire on none of those rows;
- CE loss clean / spliced / zero-ablated, CE loss recovered and KL(clean || spliced) per predicted
  token from ``evaluate_sae(model, sae, HOOK, input_ids=..., exclude_bos=True)`` on the first
  ``--ce-seqs`` held-out sequences, with the full model.

Run it (results go to ``benchmarks/results/sae_train-<tag>.json`` / ``.md`` and under ``$OUT`` when
set)::

    python benchmarks/sae_train.py --store /tmp/sae_bench_store          # CPU, SmolLM2
    python benchmarks/sae_train.py --device cuda --random-init --tag h100
    python benchmarks/sae_train.py --quick                              # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from lightning_llm_inst.config import InstrumentationConfig  # noqa: E402
from lightning_llm_inst.framework import InstrumentationFramework  # noqa: E402
from lightning_llm_inst.sae import metrics as M  # noqa: E402
from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder  # noqa: E402
from lightning_llm_inst.store import ActivationStore  # noqa: E402

T_START = time.perf_counter()
MODEL_NAME = "SmolLM2-135M-Instruct"
#: SmolLM2-135M's architecture, for --random-init where the GGUF file cannot be loaded
SMOLLM2_CONFIG = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
EOS_ID = 2
STORE_FORMAT = 1  # bump when the cached stores' meaning changes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- model and text
def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode on ``device``, tokenizer or None, description)."""
    t0 = time.perf_counter()
    if args.random_init:
        import transformers

        cfg = transformers.LlamaConfig(**SMOLLM2_CONFIG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = transformers.LlamaForCausalLM(cfg)
        model, tokenizer, name = model.to(device).eval(), None, f"{MODEL_NAME} architecture, random init"
    else:
        from lightning_llm_inst.models import load_smollm2

        model, tokenizer = load_smollm2(torch.float32, device)
        name = MODEL_NAME
    c = model.config
    info = {"name": name, "random_init": args.random_init, "layers": c.num_hidden_layers, "d_model": c.hidden_size,
            "vocab": c.vocab_size, "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype), "load_s": time.perf_counter() - t0}
    return model, tokenizer, info


def docstrings(root: Path) -> Iterator[str]:
    """Docstrings (80 characters or more) of the modules, classes and functions of the Python files
    under ``root``, in file-path order."""
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    yield doc


def text_stream(tokenizer: Any, need: int) -> tuple[list[int], dict[str, int]]:
    """At least ``need`` token ids of text (each text + EOS), and the tokens taken from each source."""
    import pydoc_data.topics
    import transformers

    from lightning_llm_inst.models import corpus_texts

    topics = pydoc_data.topics.topics
    sources = [("corpus_texts", iter(corpus_texts())),
               ("pydoc_data.topics", (topics[k] for k in sorted(topics))),
               ("stdlib docstrings", docstrings(Path(sysconfig.get_paths()["stdlib"]))),
               ("transformers docstrings", docstrings(Path(transformers.__file__).parent))]
    ids: list[int] = []
    used: dict[str, int] = {}
    for name, texts in sources:
        for text in texts:
            if len(ids) >= need:
                return ids, used
            tok = tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
            ids.extend(tok)
            used[name] = used.get(name, 0) + len(tok)
    if len(ids) < need:
        raise RuntimeError(f"the text sources hold {len(ids)} tokens, fewer than the {need} needed; lower --tokens")
    return ids, used


def make_sequences(args: argparse.Namespace, tokenizer: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   dict[str, Any]]:
    """(training sequences, held-out sequences), ``[n, seq_len]`` int64 each, and where they came from."""
    per_seq = args.seq_len - 1  # rows stored per sequence (position 0 is dropped)
    n_train = math.ceil(args.tokens / per_seq)
    n_eval = max(args.ce_seqs, math.ceil(args.eval_tokens / per_seq))
    total = n_train + n_eval
    gen = torch.Generator().manual_seed(args.seed)
    if tokenizer is None:
        seqs = torch.randint(0, vocab, (total, args.seq_len), generator=gen)
        info: dict[str, Any] = {"source": f"uniform random token ids in [0, {vocab})"}
    else:
        ids, used = text_stream(tokenizer, total * args.seq_len)
        seqs = torch.tensor(ids[: total * args.seq_len], dtype=torch.long).view(total, args.seq_len)
        info = {"source": "text", "tokens_per_source": used}
    perm = torch.randperm(total, generator=gen)
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:].sort().values
    info.update(train_sequences=n_train, eval_sequences=n_eval, seq_len=args.seq_len)
    return seqs[train_idx], seqs[eval_idx], info


@contextlib.contextmanager
def first_layers(model: torch.nn.Module, n: int) -> Iterator[None]:
    """Run only the first ``n`` decoder layers inside the block (restored after)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[:n])
    try:
        yield
    finally:
        model.model.layers = layers


@torch.no_grad()
def capture(model: torch.nn.Module, seqs: torch.Tensor, path: Path, args: argparse.Namespace,
            device: torch.device, model_name: str) -> dict[str, Any]:
    """Capture ``args.hook`` of every sequence into the store at ``path`` with our capture API."""
    layer = int(args.hook.split(".")[1])
    fw = InstrumentationFramework(InstrumentationConfig(hooks=[args.hook], compression_algorithm="zstd",
                                                        drop_bos=True))
    t0 = time.perf_counter()
    with first_layers(model, layer + 1):
        fw.instrument_model(model)
        with fw.capture_activations(path, mode="overwrite", metadata={"model": {"name": model_name}}):
            for a in range(0, seqs.shape[0], args.capture_batch):
                ids = seqs[a:a + args.capture_batch].to(device)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)
                done = min(seqs.shape[0], a + args.capture_batch)
                if (a // args.capture_batch) % 20 == 0 or done == seqs.shape[0]:
                    log(f"  captured {done}/{seqs.shape[0]} sequences ({time.perf_counter() - t0:.0f} s)")
    dt = time.perf_counter() - t0
    s = fw.stats()
    rows = len(ActivationStore(path))
    return {"rows": rows, "sequences": seqs.shape[0], "seconds": dt, "tokens_per_s": seqs.numel() / dt,
            "bytes_raw": s.get("bytes_captured"), "compression_ratio": s.get("writer_compression_ratio")}


def prepare_data(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, model_name: str,
                 device: torch.device, root: Path) -> dict[str, Any]:
    """Training store, evaluation store and the held-out ids under ``root`` (reused when they match)."""
    key = {"format": STORE_FORMAT, "model": model_name, "random_init": args.random_init, "seed": args.seed,
           "tokens": args.tokens, "eval_tokens": args.eval_tokens, "ce_seqs": args.ce_seqs,
           "seq_len": args.seq_len, "hook": args.hook}
    meta_path = root / "bench_meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise SystemExit(f"--store {root} holds stores made with {meta.get('key')}, not {key}; "
                             "use another directory or delete it")
        log(f"reusing the stores in {root}")
        meta["reused"] = True
        return meta
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_seqs, eval_seqs, source = make_sequences(args, tokenizer, model.config.vocab_size)
    log(f"sequences ready in {time.perf_counter() - t0:.1f} s: {source}")
    torch.save(eval_seqs, root / "eval_ids.pt")
    log(f"capturing {train_seqs.numel()} training tokens of {args.hook} ...")
    train = capture(model, train_seqs, root / "train", args, device, model_name)
    log(f"capturing {eval_seqs.numel()} held-out tokens ...")
    held = capture(model, eval_seqs, root / "eval", args, device, model_name)
    meta = {"key": key, "source": source, "train_capture": train, "eval_capture": held,
            "sequences_s": time.perf_counter() - t0 - train["seconds"] - held["seconds"]}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    meta["reused"] = False
    return meta


# ---------------------------------------------------------------------------- training helpers
def checksum(batch: torch.Tensor) -> torch.Tensor:
    """[2]: the sum of the batch and its column 0 weighted by row position (sees row order)."""
    w = torch.arange(1, batch.shape[0] + 1, device=batch.device, dtype=batch.dtype)
    return torch.stack([batch.sum(), (batch[:, 0] * w).sum()])


def make_datamodule(args: argparse.Namespace, store: Path) -> Any:
    from lightning_llm_inst.sae import ActivationDataModule

    return ActivationDataModule(str(store), hook=args.hook, batch_size=args.batch, num_workers=args.num_workers,
                                val_fraction=0.0, seed=args.seed, buffer_chunks=args.buffer_chunks)


def batch_plan(args: argparse.Namespace, store: Path) -> tuple[list[list[int]], int, torch.Tensor]:
    """The row lists of the first ``steps`` training batches as our datamodule deals them (epochs
    0, 1, ...), the batches per epoch, and the init sample ``SAEModule`` draws."""
    dm = make_datamodule(args, store)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler  # StoreBatchSampler, no workers started
    per_epoch = len(sampler)
    steps = args.steps or args.epochs * per_epoch
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        sampler.set_epoch(epoch)
        for rows in sampler:
            plan.append(rows)
            if len(plan) == steps:
                break
        epoch += 1
    sample = dm.sample(args.init_rows)
    return plan, per_epoch, sample


def sae_module(args: argparse.Namespace, d_in: int) -> Any:
    from lightning_llm_inst.sae import SAEModule

    torch.manual_seed(args.seed)
    return SAEModule(d_in=d_in, d_sae=args.expansion * d_in, architecture="topk", k=args.k, lr=args.lr,
                     adam_betas=(0.9, 0.999), aux_coefficient=args.aux_coefficient,
                     dead_window_tokens=(args.dead_window_steps + 1) * args.batch, init_sample_rows=args.init_rows,
                     hook_name=args.hook)


def initial_state(module: Any, sample: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ours' weights before step 1: the built W_enc / W_dec and what ``initialize_from_data`` sets."""
    sae = module.sae
    probe = SparseAutoencoder(SAEConfig.from_dict(sae.cfg.to_dict()))
    probe.initialize_from_data(sample)
    return {"W_enc": sae.W_enc.detach().clone(), "W_dec": sae.W_dec.detach().clone(),
            "b_enc": sae.b_enc.detach().clone(), "b_dec": probe.b_dec.detach().clone(),
            "scaling_factor": probe.scaling_factor.detach().clone()}


@torch.no_grad()
def activation_metrics(sae: torch.nn.Module, rows: torch.Tensor, device: torch.device, batch: int) -> dict[str, float]:
    """FVU, L0 and the fraction of latents firing on none of ``rows`` ([n, d_in])."""
    sae.eval()
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    fvu, l0, density = (M.FractionOfVarianceUnexplained(d_in).to(device), M.L0().to(device),
                        M.FeatureDensity(d_sae).to(device))
    for a in range(0, rows.shape[0], batch):
        x = rows[a:a + batch].to(device, torch.float32)  # [batch, d_in]
        out = sae(x)
        fvu.update(x, out.reconstruction)
        l0.update(out.latents)
        density.update(out.latents)
    return {"fvu": float(fvu.compute()), "l0": float(l0.compute()),
            "dead_fraction": float((density.compute() == 0).double().mean()), "rows": int(rows.shape[0])}


# ---------------------------------------------------------------------------- ours
def train_ours(args: argparse.Namespace, store: Path, init: dict[str, torch.Tensor], module: Any,
               device: torch.device) -> tuple[dict[str, Any], SparseAutoencoder]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        """Loop time, the batch checksums and a check that the start equals ``init``."""

        def __init__(self) -> None:
            self.sums: list[torch.Tensor] = []
            self.rows = 0
            self.t0 = self.t1 = self.t_skip = self.cpu0 = self.cpu1 = 0.0
            self.init_matches: dict[str, bool] = {}

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            sae = pl_module.sae
            self.init_matches = {name: bool(torch.equal(getattr(sae, name).detach().cpu(), value.cpu()))
                                 for name, value in init.items()}
            sync(device)
            self.load0 = loadavg()
            self.cpu0, self.t0 = time.process_time(), time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == args.skip_steps:
                self.t_skip, self.rows_before_skip = time.perf_counter(), self.rows
            self.rows += batch.shape[0]
            self.sums.append(checksum(batch))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.t1, self.cpu1 = time.perf_counter(), time.process_time()
            self.load1 = loadavg()

    clock = Clock()
    dm = make_datamodule(args, store)
    trainer = L.Trainer(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, max_steps=args.steps,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=1.0, gradient_clip_algorithm="norm", precision="32-true",
                        callbacks=[clock])
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    sae = module.sae
    loop_s = clock.t1 - clock.t0
    steady_rows = clock.rows - getattr(clock, "rows_before_skip", 0)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    result = {
        "steps": int(trainer.global_step), "rows": clock.rows, "loop_s": loop_s, "fit_s": fit_s,
        "tokens_per_s": clock.rows / loop_s,
        "steady_tokens_per_s": steady_rows / (clock.t1 - clock.t_skip) if clock.t_skip else None,
        "cpu_s": clock.cpu1 - clock.cpu0, "loadavg_before": clock.load0, "loadavg_after": clock.load1,
        "train_window_dead_fraction": float(module.train_dead.compute()),
        "last_step_metrics": metrics, "init_matches_copied_state": clock.init_matches,
        "num_workers": args.num_workers,
    }
    return result | {"_sums": torch.stack(clock.sums).cpu()}, sae


# ---------------------------------------------------------------------------- SAELens
def train_saelens(args: argparse.Namespace, store: Path, plan: list[list[int]], init: dict[str, torch.Tensor],
                  device: torch.device, work: Path) -> tuple[dict[str, Any], SparseAutoencoder, torch.nn.Module]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    from lightning_llm_inst.sae import load_saelens

    d_in, d_sae = init["W_dec"].shape[1], init["W_dec"].shape[0]
    copy = args.saelens_init == "copy"
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, dtype="float32", device=str(device),
                                apply_b_dec_to_input=True, normalize_activations="expected_average_only_in",
                                decoder_init_norm=1.0 if copy else 0.1, aux_loss_coefficient=args.aux_coefficient,
                                rescale_acts_by_decoder_norm=True, use_sparse_activations=False,
                                metadata=SAEMetadata(model_name=MODEL_NAME, hook_name=args.hook))
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(cfg)
    if copy:
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, name).copy_(init[name].to(device))
    sizes = [len(rows) for rows in plan]
    tcfg = SAETrainerConfig(total_training_samples=sum(sizes), train_batch_size_samples=args.batch, lr=args.lr,
                            lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, adam_beta1=0.9,
                            adam_beta2=0.999, device=str(device), autocast=False,
                            dead_feature_window=args.dead_window_steps, feature_sampling_window=10**9,
                            n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
                            logger=LoggingConfig(log_to_wandb=False))
    log("  loading the training store into memory for SAELens' data provider ...")
    t0 = time.perf_counter()
    data = ActivationStore(store)[args.hook][:].reshape(-1, d_in).to(device, torch.float32)  # [rows, d_in]
    index = [torch.tensor(rows, dtype=torch.long, device=device) for rows in plan]
    load_s = time.perf_counter() - t0
    sums: list[torch.Tensor] = []
    marks: dict[str, float] = {}

    def provider() -> Iterator[torch.Tensor]:
        for i, idx in enumerate(index):
            if i == args.skip_steps:
                marks["t_skip"] = time.perf_counter()
            batch = data[idx]  # [batch, d_in]
            sums.append(checksum(batch))
            yield batch

    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider())
    trainer.activation_scaler.scaling_factor = float(init["scaling_factor"])
    sync(device)
    load0, cpu0, t0 = loadavg(), time.process_time(), time.perf_counter()
    trainer.fit()
    sync(device)
    t1, cpu1, load1 = time.perf_counter(), time.process_time(), loadavg()
    loop_s = t1 - t0
    rows = sum(sizes)
    steady_rows = sum(sizes[args.skip_steps:])
    result = {
        "steps": trainer.n_training_steps, "rows": trainer.n_training_samples, "loop_s": loop_s, "fit_s": loop_s,
        "tokens_per_s": rows / loop_s,
        "steady_tokens_per_s": steady_rows / (t1 - marks["t_skip"]) if "t_skip" in marks else None,
        "cpu_s": cpu1 - cpu0, "loadavg_before": load0, "loadavg_after": load1,
        "train_window_dead_fraction": float(trainer.dead_neurons.float().mean()),
        "data_to_memory_s": load_s, "init": args.saelens_init,
    }
    del data, index
    gc.collect()
    out_dir = work / "saelens_sae"
    sae.save_inference_model(out_dir)
    converted = load_saelens(out_dir, device=device)
    return result | {"_sums": torch.stack(sums).cpu()}, converted, sae


@torch.no_grad()
def conversion_error(native: torch.nn.Module, converted: SparseAutoencoder, rows: torch.Tensor,
                     device: torch.device) -> float:
    """Largest |difference| between SAELens' own reconstruction and the converted SAE's, over the
    largest |reconstruction| (first 4096 rows)."""
    native.eval()
    x = rows[:4096].to(device, torch.float32)
    a = native(x)
    b = converted(x).reconstruction
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "device": str(device),
                            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                            "cuda_version": torch.version.cuda}
    for mod in ("lightning", "transformers", "sae_lens", "h5py"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", None)
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def f(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def acceptance(res: dict[str, Any]) -> list[dict[str, Any]]:
    ours, sl = res["ours"], res["saelens"]
    return [
        {"check": "our FVU within 0.02 of SAELens'", "value": ours["eval"]["fvu"] - sl["eval"]["fvu"],
         "met": abs(ours["eval"]["fvu"] - sl["eval"]["fvu"]) <= 0.02},
        {"check": "our dead latents under 10%", "value": ours["eval"]["dead_fraction"],
         "met": ours["eval"]["dead_fraction"] < 0.10},
        {"check": "our CE loss recovered at least 0.8", "value": ours["ce"]["ce_loss_recovered"],
         "met": bool(ours["ce"]["ce_loss_recovered"] >= 0.8)},
        {"check": "our train tokens/s at least SAELens'", "value": res["ratio_tokens_per_s"],
         "met": res["ratio_tokens_per_s"] >= 1.0},
    ]


def build_markdown(res: dict[str, Any]) -> str:
    c, m, d = res["config"], res["machine"], res["data"]
    per_source = d["source"].get("tokens_per_source")
    source = (" + ".join(f"{name} ({n:,} tokens)" for name, n in per_source.items()) if per_source
              else d["source"].get("source"))
    lines = [f"# SAE training: ours (Lightning) vs SAELens ({res['tag']})", "",
             f"{res['timestamp']}, `{res['command']}`", "",
             f"Machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
             f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, lightning {m['lightning']}, sae-lens {m['sae_lens']}, "
             f"transformers {m['transformers']}. Run wall time {res['wall_s'] / 60:.1f} min.", "",
             f"Data: {res['model']['name']}, `{c['hook']}`; {d['train_rows']:,} training rows from {source}, "
             f"sequences of {c['seq_len']} tokens, BOS position dropped; evaluation on {d['eval_rows']:,} held-out "
             f"rows, CE on {c['ce_seqs']} held-out sequences ({res['ours']['ce']['predicted_tokens']:,.0f} predicted "
             f"tokens). Capture (our API, zstd, first {int(c['hook'].split('.')[1]) + 1} layers): "
             f"{d['train_capture']['seconds']:.0f} s for the training rows "
             f"({d['train_capture']['tokens_per_s']:,.0f} tokens/s), {d['eval_capture']['seconds']:.0f} s for the "
             f"held-out ones" + (" (stores made by an earlier run and reused)." if d["reused"] else "."), "",
             f"Training: TopK k={c['k']}, d_sae={c['d_sae']} ({c['expansion']}x), {c['steps']} steps of {c['batch']} rows "
             f"({c['steps'] / c['batches_per_epoch']:.2f} passes), Adam lr {c['lr']:.3g} constant, betas (0.9, 0.999), "
             f"grad-norm clip 1.0, AuxK k_aux={c['d_in'] // 2} coefficient {c['aux_coefficient']:.4g}, dead window "
             f"{c['dead_window_steps']} steps, SAELens init: {c['saelens_init']}. Same batches in the same order: "
             f"**{res['same_batches']}** ({res['batches_compared']} checksums compared).", "",
             "| trainer | FVU | L0 | dead % | CE clean | CE spliced | CE zero | CE recovered | KL | train tokens/s | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("ours", "ours (SAEModule + ActivationDataModule)"), ("saelens", "SAELens (SAETrainer)")):
        r = res[key]
        e, ce, t = r["eval"], r["ce"], r["train"]
        lines.append(f"| {label} | {f(e['fvu'])} | {f(e['l0'], '.1f')} | {f(100 * e['dead_fraction'], '.2f')} | "
                     f"{f(ce['ce_loss_clean'])} | {f(ce['ce_loss_spliced'])} | {f(ce['ce_loss_zero'])} | "
                     f"{f(ce['ce_loss_recovered'])} | {f(ce['kl_div'])} | {f(t['tokens_per_s'], ',.0f')} | "
                     f"{f(t['loop_s'], '.1f')} |")
    lines += ["", f"ours / SAELens train tokens/s: **{res['ratio_tokens_per_s']:.3f}** (steady, after "
              f"{c['skip_steps']} steps: {f(res['ratio_steady_tokens_per_s'], '.3f')}).", "",
              "| trainer | steady tokens/s | process CPU s | load avg before / after | dead % in the training window "
              "at the end | FVU / L0 on the CE tokens (evaluate_sae) |", "|---|---|---|---|---|---|"]
    for key in ("ours", "saelens"):
        t, ce = res[key]["train"], res[key]["ce"]
        lines.append(f"| {key} | {f(t['steady_tokens_per_s'], ',.0f')} | {f(t['cpu_s'], '.0f')} | "
                     f"{t['loadavg_before']} / {t['loadavg_after']} | {f(100 * t['train_window_dead_fraction'], '.2f')} |"
                     f" {f(ce['fvu'])} / {f(ce['l0'], '.1f')} |")
    lines += ["", f"SAELens SAE converted with `save_inference_model` + `load_saelens`: largest reconstruction "
              f"difference {res['saelens']['conversion_rel_error']:.2e} of the largest value.", "",
              "Acceptance targets:", ""]
    for a in res["acceptance"]:
        lines.append(f"- {a['check']}: {'met' if a['met'] else 'NOT met'} ({a['value']:.4g})")
    lines += ["", "Definitions: FVU = sum of squared errors / sum of squared deviations from the per-feature mean over "
              "the held-out rows; dead % = latents that fire on none of the held-out rows; CE recovered = "
              "(CE zero - CE spliced) / (CE zero - CE clean); KL = KL(clean || spliced) per predicted token; train "
              "tokens/s = rows trained / training-loop seconds (ours: from on_train_start to on_train_end, reading the "
              "store through ActivationDataModule with its DataLoader workers; SAELens: SAETrainer.fit() fed from "
              "the training rows held in memory on the device).", "",
              "What differs between the trainers: " + " ".join(f"({i}) {x}" for i, x in enumerate(res["differences"], 1))]
    if res["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


DIFFERENCES = [
    "decoder norm: ours keeps W_dec rows at unit norm (parallel gradient removed, rows renormalised after each "
    "step); SAELens TopK leaves W_dec free and divides its norm out (rescale_acts_by_decoder_norm=True);",
    "AuxK: ours picks the top k_aux of ReLU(pre-activations) of dead latents, SAELens of the raw pre-activations;",
    "gradient clipping (norm 1.0): SAELens always clips; ours clips through Trainer(gradient_clip_val=1.0), after "
    "removing the parallel component;",
    "dead window: SAELens counts steps (dead when > W), ours tokens (dead when >= (W+1) x batch): the same latents "
    "for full batches;",
    "per step, ours also computes and logs loss, MSE, FVU, L0 and dead fraction of the batch; SAELens with wandb "
    "off only updates its firing counters;",
    "data: ours reads zstd chunks from the store in DataLoader workers; SAELens gathers from a tensor in memory.",
]


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--random-init", action="store_true",
                   help="SmolLM2's architecture with random weights and random token ids (no GGUF file needed)")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--tokens", type=int, default=None, help="training rows to capture (default 500000; 8192 quick)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out rows (default 32768; 1024 quick)")
    p.add_argument("--ce-seqs", type=int, default=None, help="held-out sequences for CE (default 32; 4 quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; 128 quick)")
    p.add_argument("--capture-batch", type=int, default=16, help="sequences per capture forward")
    p.add_argument("--store", default=None, help="directory for the stores, kept and reused (default: a temp dir)")
    p.add_argument("--batch", type=int, default=None, help="rows per training step (default 4096; 512 quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs passes)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training rows when --steps is not given")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: ours' 2e-4 / sqrt(d_sae / 16384)")
    p.add_argument("--aux-coefficient", type=float, default=1 / 32)
    p.add_argument("--dead-window-steps", type=int, default=None, help="default 50 (5 quick)")
    p.add_argument("--init-rows", type=int, default=16384, help="rows of the init sample (b_dec, scaling)")
    p.add_argument("--num-workers", type=int, default=2, help="ours: DataLoader worker processes")
    p.add_argument("--buffer-chunks", type=int, default=16, help="ours: chunks shuffled together")
    p.add_argument("--saelens-init", choices=["copy", "native"], default="copy")
    p.add_argument("--order", default="ours,saelens", choices=["ours,saelens", "saelens,ours"])
    p.add_argument("--skip-steps", type=int, default=None, help="steps left out of the steady rate (default 5)")
    p.add_argument("--ce-batch", type=int, default=8, help="sequences per evaluate_sae batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the core count)")
    p.add_argument("--tag", default=None, help="result file tag (default: h100 on CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    a = p.parse_args(argv)
    q = a.quick
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.tokens = a.tokens or (8192 if q else 500_000)
    a.eval_tokens = a.eval_tokens or (1024 if q else 32768)
    a.ce_seqs = a.ce_seqs or (4 if q else 32)
    a.seq_len = a.seq_len or (128 if q else 256)
    a.batch = a.batch or (512 if q else 4096)
    a.dead_window_steps = a.dead_window_steps if a.dead_window_steps is not None else (5 if q else 50)
    a.skip_steps = a.skip_steps if a.skip_steps is not None else (2 if q else 5)
    a.tag = a.tag or ("h100" if a.device == "cuda" else "cpu") + ("-quick" if q else "")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if not a.hook.startswith("blocks.") or not a.hook.split(".")[1].isdigit():
        p.error(f"--hook {a.hook!r}: use blocks.<layer>.hook_resid_post")
    for name in ("tokens", "eval_tokens", "ce_seqs", "batch", "capture_batch", "k", "expansion", "epochs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.seq_len < 3:
        p.error(f"--seq-len must be >= 3, got {a.seq_len}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    notes: list[str] = []
    others = loadavg()
    log(f"device {device}, {torch.get_num_threads()} torch threads, load average {others}")
    if others and device.type == "cpu" and others[0] > 0.5:
        notes.append(f"load average {others} when the run started: other processes share these "
                     f"{os.cpu_count()} cores, which slows both trainers (see the load averages per loop)")
    work = Path(tempfile.mkdtemp(prefix="sae_train_bench_"))
    root = Path(a.store) if a.store else work / "stores"
    try:
        model, tokenizer, model_info = build_model(a, device)
        log(f"model: {model_info['name']} ({model_info['load_s']:.1f} s)")
        data = prepare_data(a, model, tokenizer, model_info["name"], device, root)
        train_store, eval_store = root / "train", root / "eval"
        eval_ids = torch.load(root / "eval_ids.pt", weights_only=True)
        ce_ids = eval_ids[: a.ce_seqs]
        eval_rows = ActivationStore(eval_store)[a.hook][:]
        d_in = eval_rows.shape[-1]
        if a.lr is None:
            a.lr = 2e-4 / math.sqrt(a.expansion * d_in / 2**14)

        plan, per_epoch, sample = batch_plan(a, train_store)
        a.steps = len(plan)
        train_rows = len(ActivationStore(train_store))
        log(f"{train_rows} training rows, {per_epoch} batches per epoch, {a.steps} steps of {a.batch}")
        module = sae_module(a, d_in)
        init = initial_state(module, sample)

        results: dict[str, Any] = {}
        sums: dict[str, torch.Tensor] = {}
        native_sl = None
        for name in a.order.split(","):
            gc.collect()
            log(f"training: {name} ...")
            if name == "ours":
                train, sae = train_ours(a, train_store, init, module, device)
            else:
                train, sae, native_sl = train_saelens(a, train_store, plan, init, device, work)
            sums[name] = train.pop("_sums")
            log(f"  {name}: {train['steps']} steps, {train['rows']} rows in {train['loop_s']:.1f} s = "
                f"{train['tokens_per_s']:,.0f} tokens/s (CPU {train['cpu_s']:.0f} s, load {train['loadavg_after']})")
            results[name] = {"train": train, "sae": sae}
        if not all(results["ours"]["train"]["init_matches_copied_state"].values()):
            notes.append(f"ours' state at on_train_start differs from the state copied into SAELens: "
                         f"{results['ours']['train']['init_matches_copied_state']}")
        same = sums["ours"].shape == sums["saelens"].shape and bool(torch.equal(sums["ours"], sums["saelens"]))

        for name in ("ours", "saelens"):
            sae = results[name]["sae"].to(device)
            log(f"evaluating {name}: activations ...")
            results[name]["eval"] = activation_metrics(sae, eval_rows, device, a.batch)
            log(f"  {results[name]['eval']}; CE on {ce_ids.shape[0]} sequences ...")
            t0 = time.perf_counter()
            results[name]["ce"] = evaluate_ce(model, sae, a, ce_ids, device)
            results[name]["ce_s"] = time.perf_counter() - t0
            log(f"  CE recovered {results[name]['ce']['ce_loss_recovered']:.4f}, KL {results[name]['ce']['kl_div']:.4f}")
        results["saelens"]["conversion_rel_error"] = conversion_error(native_sl, results["saelens"]["sae"],
                                                                      eval_rows, device)
        for name in ("ours", "saelens"):
            del results[name]["sae"]

        res: dict[str, Any] = {
            "tag": a.tag, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(device),
            "model": model_info,
            "config": {"hook": a.hook, "d_in": d_in, "d_sae": a.expansion * d_in, "expansion": a.expansion, "k": a.k,
                       "batch": a.batch, "steps": a.steps, "batches_per_epoch": per_epoch, "lr": a.lr,
                       "aux_coefficient": a.aux_coefficient, "dead_window_steps": a.dead_window_steps,
                       "dead_window_tokens_ours": (a.dead_window_steps + 1) * a.batch, "init_rows": a.init_rows,
                       "num_workers": a.num_workers, "buffer_chunks": a.buffer_chunks, "saelens_init": a.saelens_init,
                       "order": a.order, "skip_steps": a.skip_steps, "seq_len": a.seq_len, "tokens": a.tokens,
                       "eval_tokens": a.eval_tokens, "ce_seqs": a.ce_seqs, "ce_batch": a.ce_batch, "seed": a.seed,
                       "quick": a.quick, "grad_clip_norm": 1.0, "adam_betas": [0.9, 0.999]},
            "data": {"train_rows": train_rows, "eval_rows": int(eval_rows.shape[0]), "reused": data["reused"],
                     "source": data["source"], "train_capture": data.get("train_capture"),
                     "eval_capture": data.get("eval_capture"), "store_dir": str(root) if a.store else None},
            "same_batches": same, "batches_compared": int(sums["ours"].shape[0]),
            "ours": results["ours"], "saelens": results["saelens"],
            "ratio_tokens_per_s": results["ours"]["train"]["tokens_per_s"] / results["saelens"]["train"]["tokens_per_s"],
            "ratio_steady_tokens_per_s": (results["ours"]["train"]["steady_tokens_per_s"] /
                                          results["saelens"]["train"]["steady_tokens_per_s"])
            if results["ours"]["train"]["steady_tokens_per_s"] and results["saelens"]["train"]["steady_tokens_per_s"]
            else None,
            "differences": DIFFERENCES, "notes": notes,
        }
        res["acceptance"] = acceptance(res)
        res["wall_s"] = time.perf_counter() - T_START
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = build_markdown(res)
    outs = [Path(a.results_dir)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for o in outs:
        o.mkdir(parents=True, exist_ok=True)
        (o / f"sae_train-{a.tag}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (o / f"sae_train-{a.tag}.md").write_text(md)
        log(f"wrote {o / f'sae_train-{a.tag}.json'} and .md")
    print()
    print(md, flush=True)
    return 0


def evaluate_ce(model: torch.nn.Module, sae: SparseAutoencoder, a: argparse.Namespace, ids: torch.Tensor,
                device: torch.device) -> dict[str, float]:
    from lightning_llm_inst.sae import evaluate_sae

    return evaluate_sae(model, sae, a.hook, input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                        batch_size=a.ce_batch, exclude_bos=True)


if __name__ == "__main__":
    sys.exit(main())
