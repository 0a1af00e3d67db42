"""Checking a manifest before anything trusts it: its structure, its values and its paths.

Stage: the first step of every consumer of a store (reader, ``verify``, merge, a writer that
resumes). A manifest is JSON written by a writer, but it is read from a disk that may hold
anything: a truncated or hand-edited file, a file from another tool, or one that names shards
outside the store. :func:`load_manifest` reads it and hands back a manifest whose every key
the rest of the package uses has the type and range the format defines
(``docs/store-format.md``); :func:`shard_path` turns a shard entry into a path that resolves
inside the store. Every problem is one :class:`~lightning_llm_inst.store.format.StoreError`
of one line, naming the file and the entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from lightning_llm_inst.store.codecs import Codec
from lightning_llm_inst.store.format import (
    ACTIVATION_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    NAME_RULE,
    TOKEN_DTYPES,
    StoreError,
    name_problem,
)

__all__ = ["check_manifest", "load_manifest", "shard_path"]

_MAX_INT = (1 << 63) - 1  # counts are int64 everywhere they are used


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``directory/manifest.json`` and check it (:func:`check_manifest`)."""
    path = Path(directory) / MANIFEST
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise StoreError(f"no activation store at {os.fspath(directory)!r}: {MANIFEST} not found") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise StoreError(f"cannot read {os.fspath(path)!r}: {_one_line(exc) or type(exc).__name__}") from exc
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: Any, path: str | os.PathLike) -> None:
    """Raise :class:`StoreError` (one line, naming ``path`` and the entry) unless
    ``manifest`` is a structurally valid activation-store manifest."""
    where = os.fspath(path)

    def bad(entry: str, problem: str) -> StoreError:
        return StoreError(_one_line(f"{where!r}: {entry} {problem}"))

    def count(value: Any, entry: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(entry, f"must be an integer, got {_short(value)}")
        if not minimum <= value <= _MAX_INT:
            raise bad(entry, f"must be an integer from {minimum} to {_MAX_INT}, got {value}")
        return value

    def mapping(value: Any, entry: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise bad(entry, f"must be a JSON object, got {_short(value)}")
        return value

    if not isinstance(manifest, dict):
        raise StoreError(f"{where!r} is not an activation-store manifest: it holds a JSON {_json_type(manifest)}, "
                         f"not an object")
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{where!r} is not an activation-store manifest: format is {_short(manifest.get('format'))}, "
                         f"expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise StoreError(f"{where!r} has format_version {_short(version)}; this library reads versions 1 to "
                         f"{FORMAT_VERSION}")
    for key in ("codec", "rows", "shards"):
        if key not in manifest:
            raise bad(key, "is missing")
    codec = mapping(manifest["codec"], "codec")
    try:
        Codec.from_dict(dict(codec))
    except (KeyError, TypeError, ValueError) as exc:
        raise bad("codec", f"{_short(codec)} is not a valid codec: {exc}") from None

    for key, dtypes in (("hooks", ACTIVATION_DTYPES), ("tokens", TOKEN_DTYPES)):
        cols = manifest.get(key)
        if cols is None:
            continue
        for name, spec in mapping(cols, key).items():
            entry = f"{key}[{name!r}]"
            problem = name_problem(name)
            if problem is not None:
                raise bad(entry, f"is not a valid name: it {problem} (allowed: {NAME_RULE})")
            spec = mapping(spec, entry)
            if spec.get("dtype") not in dtypes:
                raise bad(f"{entry}.dtype", f"is {_short(spec.get('dtype'))}; allowed: {', '.join(dtypes)}")
            shape = spec.get("shape", [])
            if not isinstance(shape, list) or (key == "tokens" and shape):
                raise bad(f"{entry}.shape", f"must be {'[]' if key == 'tokens' else 'a list of sizes'}, "
                          f"got {_short(shape)}")
            for i, n in enumerate(shape):
                count(n, f"{entry}.shape[{i}]")
            count(spec.get("chunk_rows"), f"{entry}.chunk_rows", minimum=1)
            for k in ("rows", "raw_bytes", "stored_bytes"):
                if k in spec:
                    count(spec[k], f"{entry}.{k}")

    rows = count(manifest["rows"], "rows")
    if "rows_per_shard" in manifest:
        count(manifest["rows_per_shard"], "rows_per_shard", minimum=1)
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("shards", f"must be a list, got {_short(shards)}")
    if shards and not manifest.get("hooks") and not manifest.get("tokens"):
        raise bad("shards", f"lists {len(shards)} shard(s) but the manifest names no hook points or token fields")
    seen: set[str] = set()
    total = 0
    for i, sh in enumerate(shards):
        entry = f"shards[{i}]"
        sh = mapping(sh, entry)
        file = sh.get("file")
        problem = _path_problem(file)
        if problem is not None:
            raise bad(f"{entry}.file", f"{_short(file)} {problem}")
        if file in seen:
            raise bad(f"{entry}.file", f"{file!r} is listed twice")
        seen.add(file)
        total += count(sh.get("rows"), f"{entry}.rows")
        for k in ("index", "bytes", "raw_bytes", "stored_bytes"):
            if k in sh:
                count(sh[k], f"{entry}.{k}")
    if total != rows:
        raise bad("rows", f"is {rows} but the shards listed hold {total} rows")
    if "dropped" in manifest:
        for k, v in mapping(manifest["dropped"], "dropped").items():
            count(v, f"dropped.{k}")
    for key in ("recovered", "ranks"):
        if key in manifest and not isinstance(manifest[key], list):
            raise bad(key, f"must be a list, got {_short(manifest[key])}")
    for i, r in enumerate(manifest.get("recovered", [])):
        if not isinstance(mapping(r, f"recovered[{i}]").get("file"), str):
            raise bad(f"recovered[{i}].file", f"must be a file name, got {_short(r.get('file'))}")
    if manifest.get("metadata") is not None:
        mapping(manifest["metadata"], "metadata")


def _path_problem(file: Any) -> str | None:
    """Why a manifest's shard path cannot name a file inside the store, or None."""
    if not isinstance(file, str) or not file:
        return "is not a file name"
    if "\x00" in file:
        return "contains a NUL character"
    p = PurePosixPath(file)
    if p.is_absolute():
        return "is an absolute path; shard paths are relative to the store"
    if ".." in p.parts:
        return "leaves the store ('..'); shard paths are relative to the store"
    if file.endswith("/") or p.name in ("", "."):
        return "is not a file name"
    return None


def shard_path(base: str | os.PathLike, file: str, entry: str, manifest: str | os.PathLike) -> Path:
    """``base / file`` once it is known to resolve (symbolic links followed) inside ``base``;
    else :class:`StoreError` naming the manifest and the entry."""
    problem = _path_problem(file)
    if problem is not None:
        raise StoreError(_one_line(f"{os.fspath(manifest)!r}: {entry} {_short(file)} {problem}"))
    base = Path(base)
    path = base / file
    try:
        inside = path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic-link loop (Python < 3.13)
        raise StoreError(_one_line(f"{os.fspath(manifest)!r}: {entry} {file!r} cannot be resolved: {exc}")) from exc
    if not inside:
        raise StoreError(_one_line(f"{os.fspath(manifest)!r}: {entry} {file!r} resolves to {os.fspath(path.resolve())!r}, "
                                   f"outside the store at {os.fspath(base)!r}"))
    return path


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
