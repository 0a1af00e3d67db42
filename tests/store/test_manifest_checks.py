"""A manifest is checked before anything trusts it: a malformed one, or one that names a
shard outside the store, is one StoreError of one line naming the file and the entry (and
the CLI prints that line and exits 2), for the reader, verify, merge and a resuming writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_llm_inst import cli
from lightning_llm_inst.store import ActivationStore, StoreError, StoreWriteError, StoreWriter, merge_rank_manifests

REPO = Path(__file__).resolve().parents[2]


def _store(path: Path, rank: int | None = None) -> dict:
    with StoreWriter(path, rank=rank, codec="lz4", shard_size="4KB", chunk_size="1KiB") as w:
        for i in range(3):
            w.append({"h": np.full((40, 12), i, np.float32)}, tokens={"seq": np.full(40, i, np.int64)})
    d = path if rank is None else path / f"rank{rank}"
    return json.loads((d / "manifest.json").read_text())


def _set(m: dict, keys: tuple, value) -> dict:
    m = json.loads(json.dumps(m))
    *head, last = keys
    target = m
    for k in head:
        target = target[k]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return m


_DELETE = object()

# (id, the manifest's text from a good one, words the message must hold)
MALFORMED = [
    ("not-json", lambda m: "{not json", "cannot read"),
    ("empty-file", lambda m: "", "cannot read"),
    ("bad-utf8", lambda m: b"\xff\xfe{}", "cannot read"),
    ("deep-nesting", lambda m: "[" * 200_000 + "]" * 200_000, "cannot read"),
    ("array", lambda m: [m], "JSON array, not an object"),
    ("string", lambda m: json.dumps("a store"), "JSON string, not an object"),
    ("no-format", lambda m: _set(m, ("format",), _DELETE), "format is None"),
    ("other-format", lambda m: _set(m, ("format",), "zarr"), "format is 'zarr'"),
    ("version-text", lambda m: _set(m, ("format_version",), "1"), "format_version '1'"),
    ("version-future", lambda m: _set(m, ("format_version",), 99), "format_version 99"),
    ("version-zero", lambda m: _set(m, ("format_version",), 0), "format_version 0"),
    ("no-shards", lambda m: _set(m, ("shards",), _DELETE), "shards is missing"),
    ("shards-object", lambda m: _set(m, ("shards",), {}), "shards must be a list"),
    ("shard-not-object", lambda m: _set(m, ("shards", 0), "shard-000000.h5"), "shards[0] must be a JSON object"),
    ("shard-no-rows", lambda m: _set(m, ("shards", 1, "rows"), _DELETE), "shards[1].rows must be an integer"),
    ("shard-rows-text", lambda m: _set(m, ("shards", 0, "rows"), "40"), "shards[0].rows must be an integer"),
    ("shard-rows-negative", lambda m: _set(m, ("shards", 0, "rows"), -40), "shards[0].rows must be an integer from 0"),
    ("shard-no-file", lambda m: _set(m, ("shards", 0, "file"), _DELETE), "shards[0].file None is not a file name"),
    ("shard-file-number", lambda m: _set(m, ("shards", 0, "file"), 7), "shards[0].file 7 is not a file name"),
    ("shard-file-parent", lambda m: _set(m, ("shards", 0, "file"), "../x.h5"), "shards[0].file '../x.h5' leaves the store"),
    ("shard-file-absolute", lambda m: _set(m, ("shards", 0, "file"), "/etc/passwd"), "is an absolute path"),
    ("shard-file-twice", lambda m: _set(m, ("shards", 1, "file"), m["shards"][0]["file"]), "is listed twice"),
    ("no-rows", lambda m: _set(m, ("rows",), _DELETE), "rows is missing"),
    ("rows-negative", lambda m: _set(m, ("rows",), -1), "rows must be an integer from 0"),
    ("rows-float", lambda m: _set(m, ("rows",), 120.5), "rows must be an integer"),
    ("rows-huge", lambda m: _set(m, ("rows",), 2**70), "rows must be an integer from 0 to 9223372036854775807"),
    ("rows-nan", lambda m: json.dumps(m).replace('"rows": 120,', '"rows": NaN,'), "rows must be an integer"),
    ("rows-disagree", lambda m: _set(m, ("rows",), 999), "rows is 999 but the shards listed hold 120 rows"),
    ("no-codec", lambda m: _set(m, ("codec",), _DELETE), "codec is missing"),
    ("codec-text", lambda m: _set(m, ("codec",), "lz4"), "codec must be a JSON object"),
    ("codec-unknown", lambda m: _set(m, ("codec", "name"), "brotli"), "is not a valid codec"),
    ("codec-bad-level", lambda m: _set(m, ("codec",), {"name": "zstd", "level": 99}), "is not a valid codec"),
    ("hooks-list", lambda m: _set(m, ("hooks",), ["h"]), "hooks must be a JSON object"),
    ("hooks-null-with-shards", lambda m: _set(_set(m, ("hooks",), None), ("tokens",), None), "names no hook points"),
    ("hook-dtype", lambda m: _set(m, ("hooks", "h", "dtype"), "float8"), "hooks['h'].dtype is 'float8'; allowed:"),
    ("hook-shape-text", lambda m: _set(m, ("hooks", "h", "shape"), "12"), "hooks['h'].shape must be a list"),
    ("hook-shape-negative", lambda m: _set(m, ("hooks", "h", "shape"), [-12]), "hooks['h'].shape[0] must be"),
    ("hook-chunk-rows-zero", lambda m: _set(m, ("hooks", "h", "chunk_rows"), 0), "chunk_rows must be an integer from 1"),
    ("hook-name-slash", lambda m: _set(m, ("hooks",), {"a/b": m["hooks"]["h"]}), "it contains '/'"),
    ("token-dtype-float", lambda m: _set(m, ("tokens", "seq", "dtype"), "float32"), "tokens['seq'].dtype"),
    ("dropped-text", lambda m: _set(m, ("dropped",), "none"), "dropped must be a JSON object"),
    ("recovered-object", lambda m: _set(m, ("recovered",), {}), "recovered must be a list"),
    ("metadata-list", lambda m: _set(m, ("metadata",), [1]), "metadata must be a JSON object"),
]


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        (path / "manifest.json").write_bytes(content)
    elif isinstance(content, str):
        (path / "manifest.json").write_text(content)
    else:
        (path / "manifest.json").write_text(json.dumps(content))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "s"
    return path, _store(path)


@pytest.mark.parametrize("kind, make, words", MALFORMED, ids=[k for k, _, _ in MALFORMED])
def test_malformed_manifest_is_one_line_store_error_everywhere(tmp_path, good, kind, make, words, capsys):
    src, manifest = good
    path = tmp_path / "s"
    path.mkdir()
    for p in src.iterdir():
        if p.name != "manifest.json":
            os.link(p, path / p.name)
    _write(path, make(manifest))

    with pytest.raises(StoreError) as err:
        ActivationStore(path)
    msg = str(err.value)
    assert "\n" not in msg and "manifest.json" in msg and words in msg, msg

    # the command line: one line on stderr, exit status 2, for info and verify
    for command in (["info", str(path)], ["verify", "-q", str(path)]):
        assert cli.main(command) == 2
        out, errtext = capsys.readouterr()
        assert out == "" and errtext == f"error: {msg}\n"

    # a writer resuming the store refuses it with the same message
    with pytest.raises(StoreWriteError) as werr:
        StoreWriter(path, mode="append", codec="lz4")
    assert str(werr.value) == msg


def test_manifest_that_is_a_directory(tmp_path):
    (tmp_path / "s" / "manifest.json").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"cannot read '.*manifest.json': \[Errno 21\] Is a directory"):
        ActivationStore(tmp_path / "s")


def test_cli_prints_one_line_and_exits_2_without_a_traceback(tmp_path, good):
    src, manifest = good
    path = tmp_path / "s"
    path.mkdir()
    _write(path, _set(manifest, ("shards", 0, "file"), "../../etc/passwd"))
    for command in ("info", "verify"):
        proc = subprocess.run([sys.executable, "-m", "lightning_llm_inst.cli", command, str(path)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and "shards[0].file '../../etc/passwd' leaves the store" in lines[0], proc.stderr


# ---------------------------------------------------------------------------- paths that leave the store
def test_symlinked_shard_outside_the_store_is_refused(tmp_path):
    path = tmp_path / "s"
    _store(path)
    outside = tmp_path / "elsewhere.h5"
    (path / "shard-000000.h5").rename(outside)
    (path / "shard-000000.h5").symlink_to(outside)
    with pytest.raises(StoreError) as err:
        ActivationStore(path)
    msg = str(err.value)
    assert "shards[0].file 'shard-000000.h5' resolves to" in msg and "elsewhere.h5" in msg and "outside the store" in msg
    with pytest.raises(StoreWriteError, match="outside the store"):
        StoreWriter(path, mode="append", codec="lz4")
    # a link that stays inside the store is fine
    (path / "shard-000000.h5").unlink()
    (path / "data").mkdir()
    outside.rename(path / "data" / "first.h5")
    (path / "shard-000000.h5").symlink_to(path / "data" / "first.h5")
    store = ActivationStore(path)
    assert store.rows == 120 and store.verify().ok


def test_rank_manifests_with_paths_outside_their_folder_are_refused(tmp_path):
    root = tmp_path / "s"
    m0 = _store(root, rank=0)
    _store(root, rank=1)
    m1 = json.loads((root / "rank1" / "manifest.json").read_text())
    m1["shards"][0]["file"] = "../rank0/" + m0["shards"][0]["file"]
    (root / "rank1" / "manifest.json").write_text(json.dumps(m1))
    with pytest.raises(StoreError, match=r"rank1/manifest.json': shards\[0\].file '../rank0/shard-000000.h5' leaves"):
        merge_rank_manifests(root, world_size=2)
    with pytest.raises(StoreError, match="leaves the store"):
        ActivationStore(root)  # read through the rank manifests before a merge
    # a symbolic link from one rank's folder into another's leaves the rank's folder
    m1["shards"][0]["file"] = "link.h5"
    (root / "rank1" / "manifest.json").write_text(json.dumps(m1))
    (root / "rank1" / "link.h5").symlink_to(root / "rank0" / m0["shards"][0]["file"])
    with pytest.raises(StoreError, match=r"shards\[0\].file 'link.h5' resolves to .*outside the store at '.*rank1'"):
        merge_rank_manifests(root, world_size=2)
    assert not (root / "manifest.json").exists()


def test_malformed_rank_manifest_stops_the_merge(tmp_path):
    root = tmp_path / "s"
    _store(root, rank=0)
    _store(root, rank=1)
    (root / "rank1" / "manifest.json").write_text('{"format": "lightning-llm-inst/activation-store", '
                                                  '"format_version": 1, "codec": {"name": "none"}, "rows": 0, '
                                                  '"shards": [], "dropped": {"batches": -1}}')
    with pytest.raises(StoreError, match=r"rank1/manifest.json': dropped.batches must be an integer from 0"):
        merge_rank_manifests(root, world_size=2)
