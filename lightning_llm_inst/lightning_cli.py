"""LightningCLI entry points: capture runs and SAE training from a YAML file.

Stage: the command line, for Lightning users::

    llm-inst lightning predict --config configs/capture_smollm2.yaml
    python -m lightning_llm_inst.lightning_cli validate --config configs/capture_tiny.yaml
    llm-inst sae fit --config configs/sae_tiny.yaml

Capture (:func:`main`): any ``LightningModule`` and, optionally, any ``LightningDataModule``
named in the YAML by ``class_path`` (a module that brings its own dataloaders needs no
``data:``); :class:`~lightning_llm_inst.lm.CausalLM` and :class:`~lightning_llm_inst.lm.TextDataModule`
are the ready-made ones, and ``ActivationCapture`` goes under ``trainer.callbacks``.

SAE training (:func:`sae_main`): :class:`~lightning_llm_inst.sae.module.SAEModule` on an
:class:`~lightning_llm_inst.sae.data.ActivationDataModule`; the logger defaults to TensorBoard under
``runs/sae`` (checkpoints go to its version folder), and ``SAELensExport`` under ``trainer.callbacks``
writes the trained SAE for sae-lens.

A configuration that cannot be used (an unknown option, a value outside its choices, a class
whose ``__init__`` rejects its arguments, a store that cannot be opened) raises
:class:`ConfigError` with a one-line message instead of printing usage and a traceback;
``llm-inst`` prints it as ``error: <message>`` and exits with code 2.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "main", "sae_main"]

SAE_LOG_DIR = "runs/sae"

# exceptions that mean "this input cannot be used", not "this program has a bug"
_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, LookupError, ImportError)


class ConfigError(Exception):
    """A LightningCLI configuration that cannot be used; the message is one line that names the
    option or class and the value (the original exception is chained as ``__cause__``)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"Expected a (.+?)\. Got value: (.*)$", re.DOTALL)
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its ``__cause__`` chain, outermost first."""
    out = [exc]
    while out[-1].__cause__ is not None and all(out[-1].__cause__ is not e for e in out):
        out.append(out[-1].__cause__)
    return out


def describe_parse_error(exc: BaseException) -> str:
    """One line from a jsonargparse error: the option as typed on the command line
    (``model.dtype``), the value given and, for a ``Literal`` option, the accepted values.

    jsonargparse chains one exception per nesting level (``model`` -> its class -> ``dtype``), each
    message holding the whole nested report; the option is the first key of each level joined
    with dots, the reason is the innermost message.
    """
    chain = _chain(exc)
    keys: list[str] = []
    for e in chain:
        m = _KEY.search(str(e))
        if m and (not keys or keys[-1] != m.group(1)):
            keys.append(m.group(1))
    key = ".".join(keys)
    root = str(chain[-1]).strip()
    m = _EXPECTED.search(root)
    if m:
        expected, value = m.group(1).strip(), _one_line(m.group(2))
        choices = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", expected)
        plain = re.sub(r"<class '([^']+)'>", r"\1", expected)
        allowed = f"choose one of: {choices.group(1)}" if choices else f"expected {plain}"
        return f"{key or 'value'}={value} is not valid; {allowed}"
    cls = next((m.group(1) for e in chain if (m := _CLASS_PATH.search(str(e)))), None)
    reason = _one_line(root.splitlines()[0] if "Given value" in root else root)
    if not key:
        return reason
    return f"{key}: {reason}" + (f" ({cls})" if cls else "")


def describe_init_error(exc: BaseException) -> str:
    """One line from an exception raised while the classes are built. jsonargparse wraps an error
    of a nested class's ``__init__`` (a callback's) in "Does not validate against any of the Union
    subtypes ..." with the original as ``__cause__``: the original's message is what to show."""
    from lightning_llm_inst.store import StoreError

    root = _chain(exc)[-1]
    if isinstance(root, (ValueError, OSError, StoreError)):  # these messages name the argument and value
        return _one_line(str(root))
    return _one_line(f"{type(root).__name__}: {root}")


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    from lightning_llm_inst.store import StoreError

    class _CLI(LightningCLI):
        """LightningCLI whose parse and instantiation errors are :class:`ConfigError` (one line)."""

        def init_parser(self, **kwargs: Any) -> Any:
            kwargs.setdefault("exit_on_error", False)  # raise ArgumentError instead of printing usage
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as exc:
                raise ConfigError(describe_parse_error(exc)) from exc

        def _set_seed(self) -> None:
            # "Seed set to N" is an INFO line on stderr; keep stderr to the error alone when setup fails
            seed_log = logging.getLogger("lightning.fabric.utilities.seed")
            level = seed_log.level
            seed_log.setLevel(logging.WARNING)
            try:
                super()._set_seed()
            finally:
                seed_log.setLevel(level)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ArgumentError as exc:
                raise ConfigError(describe_parse_error(exc)) from exc
            except (*_INPUT_ERRORS, StoreError) as exc:
                raise ConfigError(describe_init_error(exc)) from exc

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except StoreError as exc:  # e.g. a store path that holds no store: bad input, not a bug
                raise ConfigError(_one_line(str(exc))) from exc

    return _CLI


def _run(*classes: Any, argv: Sequence[str] | None, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        # `llm-inst <command> ...` hands the rest of its own command line over as args: no mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        _cli_class()(*classes, args=list(argv) if argv is not None else None, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """Run a Lightning loop (``fit`` / ``validate`` / ``test`` / ``predict``) from a YAML file: any
    ``LightningModule`` under ``model:`` and, if it needs one, any ``LightningDataModule`` under ``data:``."""
    import lightning as L

    _run(L.LightningModule, None, argv=argv, subclass_mode_model=True, subclass_mode_data=True,
         save_config_callback=None, seed_everything_default=0, parser_kwargs={"prog": "llm-inst lightning"})


def sae_main(argv: Sequence[str] | None = None) -> None:
    """``fit`` / ``validate`` an SAE from a YAML file (``--config``), with any option overridden on the line."""
    from lightning_llm_inst.sae.data import ActivationDataModule
    from lightning_llm_inst.sae.module import SAEModule

    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": SAE_LOG_DIR, "name": "sae"}}
    _run(SAEModule, ActivationDataModule, argv=argv, trainer_defaults={"logger": logger}, seed_everything_default=0,
         parser_kwargs={"prog": "llm-inst sae"})


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
