"""Fingerprints of a dataset's source files, so that DVC reruns `prepare` when any of them changes.

A `folder` (or `data_dir`) dataset reads files outside the repository, which dvc.yaml cannot list one
by one. The always-run `sources@<dataset>` stage writes ``data/sources/<dataset>.json``: every source
file's relative path, size and SHA-256. `prepare@<dataset>` depends on it, so adding, removing or editing
a file reruns prepare and everything below it — and nothing reruns when nothing changed, since the
fingerprint is then byte-identical. Content hashes (not modification times) keep it identical across
machines and clones; to stay fast on a 25,000-image tree, a file is only re-hashed when its
(size, mtime) changed since the last run (a local cache beside the data, not a DVC output).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vadbench.io import sha256_file, write_json

#: dataset param fields naming source directories read at prepare time (a string or a list of them)
SOURCE_FIELDS = ("data_dir", "root", "normal_dir", "abnormal_dir", "mask_dir", "test_normal_dir")


def source_dirs(spec: Any) -> list[tuple[str, Path]]:
    """(key, directory) pairs of a dataset spec that point at local source trees.

    The key is the field name, or ``field[i]`` for the i-th entry of a list, so that every directory of
    a list gets its own entry in the fingerprint.
    """
    out = []
    for field in SOURCE_FIELDS:
        value = getattr(spec, field, None)
        if isinstance(value, (list, tuple)):
            out += [(f"{field}[{i}]", Path(item)) for i, item in enumerate(value) if item]
        elif value:
            out.append((field, Path(value)))
    return out


def _walk(root: Path) -> Iterator[os.DirEntry]:
    """Every regular file under `root` (links followed only when they stay files), any depth, sorted."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue  # editor and OS droppings (.DS_Store, .~lock) are not data
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        elif entry.is_file():
            yield entry


def fingerprint(spec: Any, cache_path: Path | None = None) -> dict[str, Any]:
    """{field: {"dir": path, "files": [[relative path, size, sha256], ...]}} for every source dir of `spec`.

    `cache_path`: JSON of {absolute path: [size, mtime_ns, sha256]} from the last run; files whose size and
    mtime are unchanged are not read again. A missing source dir is an error naming the param.
    """
    cache: dict[str, list] = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cache = json.loads(Path(cache_path).read_text())
        except ValueError:
            cache = {}  # a torn cache only costs re-hashing
    fresh: dict[str, list] = {}
    out: dict[str, Any] = {}
    for field, root in source_dirs(spec):
        if not root.is_dir():
            raise FileNotFoundError(f"datasets.*.{field}: {root} is not a directory")
        files = []
        for entry in _walk(root):
            st = entry.stat()
            key = os.path.abspath(entry.path)
            hit = cache.get(key)
            digest = hit[2] if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns else sha256_file(Path(key))
            fresh[key] = [st.st_size, st.st_mtime_ns, digest]
            files.append([Path(entry.path).relative_to(root).as_posix(), st.st_size, digest])
        out[field] = {"dir": str(root), "files": files}
    if cache_path is not None:
        write_json(Path(cache_path), fresh)
    return out


def write_fingerprint(spec: Any, out_path: Path, cache_path: Path | None = None) -> dict[str, Any]:
    """Write `fingerprint(spec)` to `out_path` (deterministic JSON, atomic); return it."""
    fp = fingerprint(spec, cache_path)
    write_json(Path(out_path), fp)
    return fp
