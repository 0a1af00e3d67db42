"""The seed API: ``InstrumentationFramework``, a plain-PyTorch facade over the capture engine.

Stage: user entry point without Lightning::

    framework = InstrumentationFramework(InstrumentationConfig(granularity=HookGranularity.ALL))
    model = framework.instrument_model(model)
    with framework.capture_activations("acts"):
        model(input_ids, attention_mask=mask)          # or model.generate(...)
    report = framework.analyze_activations("acts")

Inside the ``with`` block every forward pass of the model is captured (padding excluded);
leaving it commits everything to the store, also when the block raises (complete forwards
only). Outside the block the model runs with no hooks at all. With
``InstrumentationConfig(capture_gradients=True)``, a backward pass run inside the block
(``loss.backward()``) also stores the gradients of the captured activations, in
``<output_path>/gradients``.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

from torch import nn

from lightning_llm_inst.capture.hooks import HookPoint, resolve_hook_points
from lightning_llm_inst.capture.pipeline import BatchContext, CapturePipeline
from lightning_llm_inst.capture.session import open_pipeline
from lightning_llm_inst.capture.sink import ActivationSink
from lightning_llm_inst.config import InstrumentationConfig

__all__ = ["InstrumentationFramework"]

log = logging.getLogger(__name__)


class InstrumentationFramework:
    """Capture activations of a PyTorch / transformers model into an activation store."""

    def __init__(self, config: InstrumentationConfig | None = None) -> None:
        if config is None:
            config = InstrumentationConfig()
        if not isinstance(config, InstrumentationConfig):
            raise TypeError(f"config must be an InstrumentationConfig, got {type(config).__name__}")
        self.config = config
        self.model: nn.Module | None = None
        self.hook_points: list[HookPoint] = []
        self.pipeline: CapturePipeline | None = None
        self._last_stats: dict[str, Any] = {}

    def instrument_model(self, model: nn.Module) -> nn.Module:
        """Resolve the configured hook points on ``model`` and return it (unchanged: hooks are
        only attached inside :meth:`capture_activations`). Raises if the spec matches nothing,
        listing the module names that exist."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.hook_points = resolve_hook_points(model, self.config.hook_spec, self.config.layers)
        self.model = model
        return model

    def capture_activations(self, output_path: str | os.PathLike | None = None, *, mode: str = "create",
                            metadata: dict[str, Any] | None = None,
                            sink: ActivationSink | None = None) -> _Capture:
        """Capture every forward pass of the instrumented model inside the block into the
        store at ``output_path`` (``mode``: ``"create"``, ``"append"`` or ``"overwrite"``), or
        hand the rows to ``sink`` (an :class:`~lightning_llm_inst.capture.ActivationSink`)
        instead of storing them.

        A context manager; the capture starts when it is entered. Entered without ``with``
        (``__enter__()`` alone), the capture runs until ``__exit__`` is called, or until the
        interpreter exits, which commits every complete forward.

        With ``capture_gradients`` in the config, each backward pass inside the block that
        reaches captured activations stores their gradients as ``<hook>.grad`` in the store at
        ``<output_path>/gradients`` (``mode`` applies to it too), the same rows as the
        activations plus ``forward_row``; with ``sink`` they go to the sink as batches of
        ``<hook>.grad`` rows. Run the backward before leaving the block: after it nothing is
        stored."""
        return _Capture(self, output_path, mode, metadata, sink)

    def _start(self, output_path: str | os.PathLike | None, mode: str, metadata: dict[str, Any] | None,
               sink: ActivationSink | None) -> None:
        if self.model is None:
            raise RuntimeError("call instrument_model(model) before capture_activations()")
        if self.pipeline is not None:
            raise RuntimeError("a capture is already running; captures of one framework cannot be nested")
        self.pipeline = open_pipeline(self.model, self.config, output_path, hook_points=self.hook_points, mode=mode,
                                      metadata=metadata, sink=sink)

    def _finish(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is None:
            return
        try:
            pipeline.close()
        finally:
            self._last_stats = pipeline.stats()

    def _stop(self, failed: BaseException | None) -> None:
        """Close the running capture; after ``failed`` (the block's exception), its open forward
        is dropped and a failure to close is logged, so that ``failed`` propagates."""
        if failed is None:
            self._finish()
            return
        if self.pipeline is not None:
            self.pipeline.abort_forward()
        try:
            self._finish()
        except Exception as exc:  # noqa: BLE001 - the block's exception wins
            if exc is not failed:
                log.error("closing the activation capture after %s failed: %s", type(failed).__name__, exc)

    def set_batch_context(self, input_ids: Any, attention_mask: Any = None, sequence_ids: Any = None) -> None:
        """Token ids / mask / sequence ids for forwards called without ``input_ids``."""
        if self.pipeline is None:
            raise RuntimeError("set_batch_context() works inside capture_activations()")
        self.pipeline.set_context(BatchContext(input_ids, attention_mask, sequence_ids))

    def stats(self) -> dict[str, Any]:
        """Counters of the running capture, or of the last one."""
        return self.pipeline.stats() if self.pipeline is not None else dict(self._last_stats)

    def analyze_activations(self, data_path: str | os.PathLike, top_k: int = 10, *, sae: Any = None,
                            hook: str | None = None, tokenizer: Any = None, contexts_per_feature: int = 5,
                            context_window: int = 8, max_rows: int | None = None) -> dict[str, Any]:
        """Summary of a store: per hook point, rows, dtype, mean and norm statistics, and the
        explained variance of the top principal directions.

        With ``sae`` (a SparseAutoencoder, or a directory in SAELens format) the summary gains
        ``"sae_features"`` for ``hook`` (default: the SAE's hook name, or the store's only hook
        point): per latent, its density and top token contexts (as text too when a
        ``tokenizer`` or ``"smollm2"`` is given), plus FVU, MSE, L0 and the dead fraction over
        the first ``max_rows`` rows (default: all). See ``analysis.summary.summarize_sae_features``.

        A store written by :func:`lightning_llm_inst.causal.capture_attribution` (clean and corrupt
        node outputs with the metric's gradients) gives ``"causal_graph"``: the attribution graph
        over heads, MLPs and SAE latents, read from the store without the model.
        """
        from lightning_llm_inst.analysis.summary import summarize_store

        return summarize_store(data_path, top_k=top_k, sae=sae, hook=hook, tokenizer=tokenizer,
                               contexts_per_feature=contexts_per_feature, context_window=context_window,
                               max_rows=max_rows)


class _Capture:
    """What :meth:`InstrumentationFramework.capture_activations` returns: enter to start the
    capture, exit to commit it (an object, not a generator, so that dropping it does not end
    a capture entered without ``with``)."""

    def __init__(self, framework: InstrumentationFramework, output_path: str | os.PathLike | None, mode: str,
                 metadata: dict[str, Any] | None, sink: ActivationSink | None) -> None:
        self._framework = framework
        self._args = (output_path, mode, metadata, sink)

    def __enter__(self) -> InstrumentationFramework:
        self._framework._start(*self._args)
        return self._framework

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._framework._stop(exc)
