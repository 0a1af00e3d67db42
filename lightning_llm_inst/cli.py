"""The ``llm-inst`` command line.

Stage: the user's shell. ``llm-inst info PATH`` prints what a store holds; ``llm-inst verify
PATH`` reads every committed shard and exits 0 only if all of them check out; ``llm-inst
lightning SUBCOMMAND --config FILE`` runs a Lightning loop (capture) from a YAML file; ``llm-inst
sae fit|validate --config FILE`` trains or validates a sparse autoencoder on a store; ``llm-inst
causal --pairs FILE.jsonl`` scores the nodes (and edges) of a causal graph over a model and checks it
(``cli_causal``).

Errors that come from the user's input (a path that holds no store, a damaged manifest, an
option value outside its choices, a model that cannot be found) are printed as one line,
``error: <message>``, on stderr, with exit code 2 and no traceback. Set ``LLM_INST_DEBUG=1`` to
get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    right = [i > 0 for i in range(len(header))]
    right[1] = right[2] = False  # shape, dtype

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).rjust(w) if r else str(v).ljust(w) for v, w, r in zip(row, widths, right))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _error(message: object) -> int:
    """Print ``error: <message>`` as one line on stderr; the exit code for bad input."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def cmd_info(args: argparse.Namespace) -> int:
    from lightning_llm_inst.store import ActivationStore

    store = ActivationStore(args.path)
    m = store.manifest
    print(f"store     {args.path}")
    print(f"format    {m['format']} v{m['format_version']} (written by lightning-llm-inst {m.get('library_version')})")
    print(f"codec     {store.codec.spec}")
    print(f"rows      {store.rows} in {store.num_shards} shard(s)")
    if store.dropped.get("batches"):
        print(f"dropped   {store.dropped['batches']} batch(es), {store.dropped['rows']} rows (on_full='drop')")
    if store.recovered:
        print(f"recovered {len(store.recovered)} leftover file(s) of interrupted writers were removed")
    if store.leftovers:
        print(f"leftovers {', '.join(store.leftovers)} (not in the manifest, not read)")
    cols = list(store.hooks.values()) + list(store.token_fields.values())
    rows = []
    raw_total = stored_total = 0
    for c in cols:
        raw_total += c.raw_bytes
        stored_total += c.stored_bytes
        name = c.name if c.kind == "activations" else f"tokens/{c.name}"
        rows.append([name, "x".join(map(str, c.feature_shape)) or "-", c.dtype, str(c.rows), _human(c.raw_bytes),
                     _human(c.stored_bytes), f"{c.ratio:.2f}" if c.ratio else "-"])
    if rows:
        rows.append(["total", "", "", "", _human(raw_total), _human(stored_total),
                     f"{raw_total / stored_total:.2f}" if stored_total else "-"])
        print()
        print(_table(["hook point", "shape", "dtype", "rows", "raw", "stored", "ratio"], rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lightning_llm_inst.store import ActivationStore

    store = ActivationStore(args.path)
    bar = tqdm(total=store.num_shards, unit="shard", desc="verify", disable=args.quiet or None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    report = store.verify(progress=progress)
    bar.close()
    for p in report.problems:
        print(f"FAIL {p}")
    for name in report.leftovers:
        print(f"note {name}: not listed in the manifest (ignored)")
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {report.shards_checked} shard(s), {report.rows_checked} rows, {report.chunks_checked} chunks "
          f"checked, {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def cmd_lightning(args: argparse.Namespace) -> int:
    from lightning_llm_inst.lightning_cli import main as lightning_main

    lightning_main(args.args)
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    from lightning_llm_inst.lightning_cli import sae_main

    sae_main(args.args)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit code 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def _guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2."""
    from lightning_llm_inst.lightning_cli import ConfigError
    from lightning_llm_inst.store import StoreError

    try:
        return int(func(args))
    except (ConfigError, StoreError) as exc:
        if os.environ.get("LLM_INST_DEBUG"):
            raise
        return _error(exc)
    except (ValueError, OSError) as exc:
        if os.environ.get("LLM_INST_DEBUG") or args.command in ("lightning", "sae"):
            raise  # a failure inside a Lightning run keeps its traceback
        return _error(exc)


def build_parser() -> argparse.ArgumentParser:
    from lightning_llm_inst import __version__

    p = _Parser(prog="llm-inst", description="Capture and inspect transformer activations.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the hook points, rows, dtypes, sizes and compression of a store")
    info.add_argument("path", help="store directory (holds manifest.json)")
    info.set_defaults(func=cmd_info)
    ver = sub.add_parser("verify", help="check every committed shard; exit 0 only if all verify")
    ver.add_argument("path", help="store directory (holds manifest.json)")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=cmd_verify)
    lt = sub.add_parser("lightning", help="run a Lightning loop from a YAML config (LightningCLI), e.g. "
                        "`llm-inst lightning predict --config configs/capture_tiny.yaml`", add_help=False)
    lt.add_argument("args", nargs=argparse.REMAINDER)
    lt.set_defaults(func=cmd_lightning)
    sae = sub.add_parser("sae", help="train (fit) or validate a sparse autoencoder on a store from a YAML config "
                         "(LightningCLI), e.g. `llm-inst sae fit --config configs/sae_tiny.yaml`", add_help=False)
    sae.add_argument("args", nargs=argparse.REMAINDER)
    sae.set_defaults(func=cmd_sae)
    from lightning_llm_inst.cli_causal import add_parser as add_causal_parser

    add_causal_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # options right after `lightning` / `sae` (e.g. --help) belong to the LightningCLI
        if args.command not in ("lightning", "sae"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args = extra + args.args
    return _guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
