"""``ActivationCapture``: the Lightning callback that captures activations during loops.

Stage: Lightning entry point. At the start of a validate / test / predict loop (fit
optional) it resolves the hook points on the model, opens a store per stage
(``<output_path>/<stage>``, one ``rank<N>/`` folder per rank under DDP) and attaches the
capture pipeline; each batch's ``input_ids`` / ``attention_mask`` (and sequence ids, if the
batch carries them) give the rows' metadata. At the loop's end the pipeline drains, every
complete batch is committed and rank 0 merges the per-rank manifests. Hooks are removed at
the loop's end, in ``teardown`` and in ``on_exception``. With ``capture_gradients`` the
gradients of a loop that runs backward passes (``"fit"``, or a step that enables grad) go to
``<output_path>/<stage>/gradients``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from typing_extensions import override

from lightning_llm_inst.capture.pipeline import BatchContext, CapturePipeline
from lightning_llm_inst.capture.session import open_pipeline
from lightning_llm_inst.config import HookGranularity, InstrumentationConfig

__all__ = ["ActivationCapture"]

log = logging.getLogger(__name__)

Granularity = Literal["all", "attention_only", "ffn_only", "residual"]
CodecName = Literal["zstd", "lz4", "none"]
StorageDtype = Literal["float32", "float16", "bfloat16"]
OnFull = Literal["block", "drop"]
Stage = Literal["fit", "validate", "test", "predict"]
Mode = Literal["create", "append", "overwrite"]
STAGES: tuple[str, ...] = get_args(Stage)
MODES: tuple[str, ...] = get_args(Mode)
CODECS: tuple[str, ...] = get_args(CodecName)
_ALIASES = {"compression": "codec", "compression_level": "codec_level"}


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"ActivationCapture: {name}={value!r} is not valid; {allowed}")


def _deprecated_aliases(codec: Any, codec_level: Any, given: dict[str, Any]) -> tuple[Any, Any]:
    """``compression`` / ``compression_level`` (the earlier names) mapped to ``codec`` /
    ``codec_level``, with a deprecation warning; an error if both names of one are given."""
    unknown = sorted(set(given) - set(_ALIASES))
    if unknown:
        raise TypeError(f"ActivationCapture got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    out = {"codec": codec, "codec_level": codec_level}
    defaults = {"codec": "zstd", "codec_level": None}
    for old, new in _ALIASES.items():
        if old not in given:
            continue
        if out[new] != defaults[new]:
            raise ValueError(f"ActivationCapture: give {new}= only; {old}= is its deprecated name "
                             f"(got {new}={out[new]!r} and {old}={given[old]!r})")
        rank_zero_deprecation(f"ActivationCapture({old}=...) is deprecated; use {new}=... (the same values)")
        out[new] = given[old]
    return out["codec"], out["codec_level"]


def _codec(codec: Any, level: Any) -> tuple[str | None, int | None]:
    """``codec`` (``"zstd:N"`` sets the level too; ``None`` is ``"none"``) as the config's
    ``compression_algorithm`` and ``compression_level``."""
    if isinstance(codec, str) and codec.startswith("zstd:"):
        try:
            n = int(codec.split(":", 1)[1])
        except ValueError:
            _fail("codec", codec, "use zstd:N with an integer level N")
        if level is not None and level != n:
            _fail("codec_level", level, f"leave it unset with codec={codec!r}")
        codec, level = "zstd", n
    if codec is None:
        codec = "none"
    if codec not in CODECS:
        _fail("codec", codec, f"choose one of: {', '.join(map(repr, CODECS))} (in Python also None, 'zstd:N')")
    if level is not None and codec != "zstd":
        _fail("codec_level", level, "only zstd has levels; leave it unset")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22):
        _fail("codec_level", level, "use an integer from 1 to 22")
    return (None if codec == "none" else codec), level


def _granularity(value: Any) -> HookGranularity:
    """A granularity value (``"ffn_only"``), its enum member, or (in Python) its name."""
    if isinstance(value, HookGranularity):
        return value
    if isinstance(value, str):
        for g in HookGranularity:
            if value.lower() == g.value:
                return g
    _fail("granularity", value, f"choose one of: {', '.join(repr(g.value) for g in HookGranularity)}")


class ActivationCapture(Callback):
    """Capture transformer activations to an activation store during Lightning loops.

    Args:
        output_path: directory; each stage writes ``<output_path>/<stage>``.
        granularity: ``"all"``, ``"attention_only"``, ``"ffn_only"`` or ``"residual"`` (or a
            :class:`HookGranularity`).
        hooks: explicit hook spec (TransformerLens names, globs over module names), instead
            of ``granularity``.
        layers: layer selection (int, list, or text such as ``"0-5,10"``).
        codec: ``"zstd"``, ``"lz4"`` or ``"none"`` (in Python also ``None``, and ``"zstd:N"`` for
            a level). ``compression`` is its deprecated name.
        codec_level: zstd level, 1 to 22 (default 1). ``compression_level`` is its deprecated name.
        target_throughput_gbps: raw GB/s the capture should sustain (sizes the worker pool).
        max_memory_gb: host memory the capture may hold.
        storage_dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``None`` (model dtype).
        on_full: ``"block"`` (nothing lost) or ``"drop"`` (skip batches, counted).
        drop_bos: do not store position 0.
        drop_token_ids: token ids never stored.
        position_window: keep only positions ``start <= p < stop``.
        include_padding: store every position of a batch that reaches the model with no
            attention mask; by default such a batch is refused when its rows begin or end with
            the pad token (padding cannot be told from text).
        pad_token_id: id the inputs are padded with (default: the model config's).
        capture_gradients: also store the gradient of each captured activation when a backward
            pass reaches it (``stages=["fit"]``, or a step that enables grad and calls
            ``backward``), as ``<hook>.grad`` in ``<output_path>/<stage>/gradients``: the same
            rows as the activations, plus ``forward_row``. Loops under ``torch.no_grad()`` /
            inference mode (validate / test / predict by default) store none, with a warning.
        shard_size: raw bytes per shard.
        stages: loops to capture, from ``"validate"``, ``"test"``, ``"predict"``, ``"fit"``.
        model_attr: attribute of the LightningModule holding the model to hook (default:
            ``"model"`` if present, else the LightningModule itself).
        input_ids_key, attention_mask_key: keys of dict batches.
        sequence_id_key: key of per-sample ids in dict batches (stored as ``sequence_id``);
            without it, ids are assigned in order (unique across ranks).
        mode: ``"create"`` (fail if the stage's store exists), ``"append"`` or ``"overwrite"``.
        log_every_n_batches: how often counters go to the trainer's logger.
    """

    def __init__(
        self,
        output_path: str,
        granularity: Granularity = "all",
        hooks: str | list[str] | None = None,
        layers: int | list[int] | str | None = None,
        codec: CodecName = "zstd",
        codec_level: int | None = None,
        target_throughput_gbps: float = 2.0,
        max_memory_gb: float = 4.0,
        storage_dtype: StorageDtype | None = None,
        on_full: OnFull = "block",
        drop_bos: bool = False,
        drop_token_ids: list[int] | None = None,
        position_window: tuple[int, int | None] | None = None,
        include_padding: bool = False,
        pad_token_id: int | None = None,
        capture_gradients: bool = False,
        shard_size: int | str = "256MiB",
        stages: Sequence[Stage] = ("validate", "test", "predict"),
        model_attr: str | None = None,
        input_ids_key: str = "input_ids",
        attention_mask_key: str = "attention_mask",
        sequence_id_key: str | None = "sequence_id",
        mode: Mode = "create",
        log_every_n_batches: int = 50,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        codec, codec_level = _deprecated_aliases(codec, codec_level, deprecated)
        if not isinstance(output_path, (str, os.PathLike)) or not os.fspath(output_path):
            _fail("output_path", output_path, "give a directory path")
        if isinstance(stages, str) or not stages or any(s not in STAGES for s in stages):
            _fail("stages", list(stages) if not isinstance(stages, str) else stages,
                  f"choose from: {', '.join(STAGES)}")
        if mode not in MODES:
            _fail("mode", mode, f"choose one of: {', '.join(MODES)}")
        if isinstance(log_every_n_batches, bool) or not isinstance(log_every_n_batches, int) or log_every_n_batches < 1:
            _fail("log_every_n_batches", log_every_n_batches, "use a positive integer")
        codec, codec_level = _codec(codec, codec_level)
        try:
            self.config = InstrumentationConfig(
                granularity=_granularity(granularity), compression_algorithm=codec,
                target_throughput_gbps=target_throughput_gbps, max_memory_gb=max_memory_gb, hooks=hooks, layers=layers,
                compression_level=codec_level, storage_dtype=storage_dtype, on_full=on_full, drop_bos=drop_bos,
                drop_token_ids=list(drop_token_ids or []), position_window=position_window, shard_size=shard_size,
                include_padding=include_padding, pad_token_id=pad_token_id, capture_gradients=capture_gradients,
            )
        except ValueError as exc:  # the same argument names, but for compression_algorithm / _level (checked above)
            raise ValueError(str(exc).replace("InstrumentationConfig.", "ActivationCapture: ", 1)) from None
        self.output_path = Path(output_path)
        self.stages = tuple(stages)
        self.model_attr = model_attr
        self.input_ids_key = input_ids_key
        self.attention_mask_key = attention_mask_key
        self.sequence_id_key = sequence_id_key
        self.mode = mode
        self.log_every_n_batches = log_every_n_batches
        self._pipeline: CapturePipeline | None = None
        self._stage: str | None = None
        self._opened: set[str] = set()
        self._batches_done: dict[str, dict[int, int]] = {}
        self._skip: dict[str, dict[int, int]] = {}
        self._last_stats: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_path=os.fspath(self.output_path), stages=self.stages)

    # ------------------------------------------------------------------ setup and loops
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        if not isinstance(target, torch.nn.Module):
            raise TypeError(f"ActivationCapture: model_attr={self.model_attr!r} is not a torch.nn.Module on "
                            f"{type(pl_module).__name__}")

    def _target(self, pl_module: LightningModule) -> Any:
        if self.model_attr is not None:
            if not hasattr(pl_module, self.model_attr):
                raise AttributeError(f"ActivationCapture: the LightningModule {type(pl_module).__name__} has no "
                                     f"attribute model_attr={self.model_attr!r}")
            return getattr(pl_module, self.model_attr)
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, torch.nn.Module) else pl_module

    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking or self._pipeline is not None:
            return
        world = trainer.world_size
        rank = trainer.global_rank if world > 1 else None
        path = self.output_path / stage
        mode = "append" if (stage in self._opened or stage in self._skip or self.mode == "append") else self.mode
        self._pipeline = open_pipeline(
            self._target(pl_module), self.config, path, mode=mode, rank=rank, world_size=world,
            metadata={"stage": stage, "world_size": world})
        self._stage = stage
        self._opened.add(stage)
        grads = " and their gradients" if self.config.capture_gradients else ""
        rank_zero_info(f"ActivationCapture: capturing {len(self._pipeline.hook_points)} hook points{grads} during "
                       f"{stage} into {path}")

    def _stop(self, trainer: Trainer, *, failed: bool = False) -> None:
        pipeline, stage = self._pipeline, self._stage
        if pipeline is None or stage is None:
            return
        self._pipeline = None
        try:
            if failed:
                pipeline.abort_forward()
            pipeline.close()
        finally:
            self._last_stats = pipeline.stats()
            self._log(trainer, self._last_stats)
        world = trainer.world_size
        if world > 1 and not failed:
            trainer.strategy.barrier("llm_inst_capture_merge")
            if trainer.global_rank == 0:
                from lightning_llm_inst.capture.session import gradient_store_path
                from lightning_llm_inst.store.merge import merge_rank_manifests

                merge_rank_manifests(self.output_path / stage, world)
                if self.config.capture_gradients:
                    merge_rank_manifests(gradient_store_path(self.output_path / stage), world)
            trainer.strategy.barrier("llm_inst_capture_merged")

    def _batch_start(self, trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        p = self._pipeline
        if p is None:
            return
        stage = self._stage or ""
        p.enabled = batch_idx >= self._skip.get(stage, {}).get(dataloader_idx, 0)
        p.set_context(self._context(batch) if p.enabled else None)

    def _batch_end(self, trainer: Trainer, batch_idx: int, dataloader_idx: int) -> None:
        p = self._pipeline
        if p is None:
            return
        stage = self._stage or ""
        if p.enabled:
            done = self._batches_done.setdefault(stage, {})
            done[dataloader_idx] = max(done.get(dataloader_idx, 0), batch_idx + 1)
        p.set_context(None)
        if (batch_idx + 1) % self.log_every_n_batches == 0:
            self._log(trainer, p.stats())

    def _context(self, batch: Any) -> BatchContext | None:
        if not isinstance(batch, Mapping):
            return None
        ids = batch.get(self.input_ids_key)
        if not isinstance(ids, torch.Tensor):
            return None
        mask = batch.get(self.attention_mask_key)
        seq = batch.get(self.sequence_id_key) if self.sequence_id_key else None
        return BatchContext(ids, mask if isinstance(mask, torch.Tensor) else None,
                            seq if isinstance(seq, torch.Tensor) else None)

    def _log(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        if trainer.logger is None or trainer.global_rank != 0:
            return
        metrics = {f"capture/{k}": float(v) for k, v in stats.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def stats(self) -> dict[str, Any]:
        """Per-stage counters of the running capture (or of the last one): forwards, rows,
        bytes, compression ratio, time blocked, dropped, write rate."""
        return self._pipeline.stats() if self._pipeline is not None else dict(self._last_stats)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "validate":
            self._stop(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "test":
            self._stop(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "predict":
            self._stop(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "fit")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stage == "fit":
            self._stop(trainer)

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, batch_idx, dataloader_idx)

    @override
    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, batch, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, batch_idx, dataloader_idx)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start(trainer, batch, batch_idx, 0)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_end(trainer, batch_idx, 0)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        try:
            self._stop(trainer, failed=True)
        except Exception as exc:  # noqa: BLE001 - the loop's exception must propagate, not this one
            log.error("ActivationCapture: closing the store after %s failed: %s", type(exception).__name__, exc)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop(trainer, failed=True)

    # ------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pipeline is not None:
            self._pipeline.flush()  # what is counted as done is committed
        return {"output_path": os.fspath(self.output_path), "batches_done": {
            s: dict(d) for s, d in self._batches_done.items()}, "opened": sorted(self._opened)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done = {s: {int(k): int(v) for k, v in d.items()} for s, d in state_dict.get("batches_done", {}).items()}
        self._batches_done = {s: dict(d) for s, d in done.items()}
        self._skip = done
        self._opened.update(state_dict.get("opened", []))
