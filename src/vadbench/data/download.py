"""Registry look-up, resumable HTTP download with checksum, and fetch-then-extract of raw datasets.

Order of trust: bytes land in ``<file>.part`` (resumed with a Range request after an interruption),
the size and sha256 are checked, and only then is the archive renamed to its final name and
extracted (archive.safe_extract). An archive whose sha256 is unknown is never extracted: the error
prints the computed checksum so the user can compare it with a trusted source and pass it as
``datasets.<name>.sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import requests
import yaml
from tqdm import tqdm

from vadbench.data.archive import safe_extract
from vadbench.io import sha256_file, write_json

REGISTRY = Path(__file__).with_name("registry.yaml")
CHUNK = 1 << 20
NET_CHUNK = 1 << 16  # small reads: an interrupted transfer loses at most this much
DONE_MARKER = ".vadbench-extracted.json"


class DownloadError(RuntimeError):
    """The archive could not be fetched completely (offline, HTTP error, truncated)."""


class ChecksumError(RuntimeError):
    """The archive's sha256 is wrong or unknown; it was not extracted."""


class ManualDownloadError(FileNotFoundError):
    """The dataset must be fetched by hand; the message says what and where."""


@cache
def registry() -> dict[str, Any]:
    with open(REGISTRY) as fh:
        return yaml.safe_load(fh)


def registry_entry(kind: str) -> dict[str, Any]:
    reg = registry()
    if kind not in reg:
        raise KeyError(f"{REGISTRY}: no entry for dataset kind {kind!r} (known: {sorted(reg)})")
    return reg[kind]


@dataclass(frozen=True)
class ArchiveSpec:
    url: str
    file: str
    size: int | None
    sha256: str | None


def archive_spec(kind: str, spec: Any) -> ArchiveSpec | None:
    """The registry's archive for `kind`, with the dataset params' url/sha256/archive overrides."""
    archives = registry_entry(kind).get("archives") or []
    base = archives[0] if archives else {}
    url = spec.url or base.get("url")
    if not url:
        return None
    overridden = spec.url is not None and spec.url != base.get("url")
    return ArchiveSpec(
        url=url,
        file=spec.archive or base.get("file") or url.rstrip("/").rsplit("/", 1)[-1],
        # a mirror's size/checksum may differ: only the params' own sha256 counts for an overridden url
        size=None if overridden else base.get("size"),
        sha256=spec.sha256 or (None if overridden else base.get("sha256")),
    )


def _hash_existing(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h


def download(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Fetch `url` to `dest` (resuming ``dest.part`` with a Range request); return the sha256.

    Raises DownloadError when the host cannot be reached (after `connect_timeout` s at most), the
    server answers with an error, or fewer bytes arrive than announced (the .part file is kept so the
    next call resumes).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=(connect_timeout, read_timeout))
    except requests.RequestException as err:
        raise DownloadError(
            f"cannot download {url}: {type(err).__name__}: {err} (offline? see docs/DATASETS.md)"
        ) from None
    with resp:
        if resp.status_code == 416 and have and size in (None, have):
            os.replace(part, dest)  # the .part was already complete (killed before the rename)
            return _hash_existing(dest).hexdigest()
        if resp.status_code not in (200, 206):
            raise DownloadError(f"cannot download {url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code == 200 and have:
            have = 0  # server ignored Range: start over
        if resp.status_code == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()  # the server resumed somewhere else: never splice mismatched bytes
            raise DownloadError(
                f"{url}: server answered Range bytes={have}- with "
                f"{resp.headers.get('Content-Range')!r}; partial file removed, run again"
            )
        h = _hash_existing(part) if have else hashlib.sha256()
        announced = resp.headers.get("Content-Length")
        total = have + int(announced) if announced is not None else size
        got = 0
        try:
            with (
                open(part, "ab" if have else "wb") as fh,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                for block in resp.iter_content(NET_CHUNK):
                    fh.write(block)
                    h.update(block)
                    got += len(block)
                    bar.update(len(block))
        except requests.RequestException as err:
            raise DownloadError(
                f"download of {url} interrupted after {have + got} bytes ({err}); run again to resume"
            ) from None
    final_size = have + got
    if announced is not None and got != int(announced):
        raise DownloadError(
            f"{url}: truncated: got {got} of {announced} announced bytes; run again to resume from {part}"
        )
    if size is not None and final_size < size:
        raise DownloadError(f"{url}: got {final_size} bytes, the registry expects {size}; run again to resume")
    if size is not None and final_size > size:
        os.replace(part, dest.with_name(dest.name + ".corrupt"))  # not the registry's file: do not resume it
        raise DownloadError(f"{url}: got {final_size} bytes, more than the registry's {size}; moved aside")
    os.replace(part, dest)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None, digest: str | None = None, *, param: str = "sha256") -> str:
    """Raise ChecksumError unless `path` hashes to `expected`; returns the actual sha256."""
    digest = digest or sha256_file(path)
    if expected is None:
        raise ChecksumError(
            f"{path}: no trusted sha256 is known for this archive, so it is not extracted. Its sha256 is "
            f"{digest}; if that matches a source you trust, set datasets.<name>.{param}: {digest}"
        )
    if digest != expected.lower():
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)  # keep it for inspection, but never at the name we extract from
        raise ChecksumError(f"{path}: sha256 {digest} differs from the expected {expected}; moved to {bad}")
    return digest


def fetch_and_extract(kind: str, spec: Any, raw_dir: Path, *, progress: bool = True) -> tuple[Path, str | None]:
    """Return (extracted root, archive sha256) for `kind`, downloading/extracting only when needed.

    `spec.data_dir` (an extracted tree) wins; then ``raw_dir/<kind>/extracted`` if a previous run
    finished it; otherwise the registry archive is downloaded, verified and extracted there.
    Datasets without an archive raise ManualDownloadError with the registry's instructions.
    """
    if spec.data_dir:
        root = Path(spec.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"datasets.<name>.data_dir: {root} is not a directory")
        return root, None
    base = Path(raw_dir) / kind
    extracted = base / "extracted"
    marker = extracted / DONE_MARKER
    arch = archive_spec(kind, spec)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if arch is None or arch.sha256 is None or done.get("sha256") == arch.sha256:
            return extracted, done.get("sha256")
    if arch is None:
        if base.is_dir() and any(base.iterdir()):
            return base, None  # manual download already placed there; the loader verifies its layout
        raise ManualDownloadError(f"{kind}: {registry_entry(kind).get('manual', 'no download known')}")
    archive = base / arch.file
    digest = None
    if not archive.is_file():
        digest = download(arch.url, archive, size=arch.size, connect_timeout=spec.connect_timeout, progress=progress)
    digest = verify_sha256(archive, arch.sha256, digest)
    safe_extract(archive, extracted, max_total_bytes=spec.max_extract_bytes)
    write_json(marker, {"sha256": digest, "url": arch.url, "file": arch.file})
    return extracted, digest
