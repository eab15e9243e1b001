"""Safe, member-by-member archive extraction (.tar, .tar.gz/.tgz, .tar.xz, .tar.bz2, .zip).

Never `extractall`: every member is checked before a byte is written —
absolute paths, `..` components, device/FIFO files, symlinks and hard links whose target leaves the
extraction dir are refused; the total number of bytes actually written is capped (a zip header can
lie about sizes, so the cap counts the decompressed stream, not the header). Links that stay inside
are not materialised (no dataset needs them): they are skipped and counted. Extraction goes to a
temp dir renamed into place, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vadbench.io import atomic_dir

CHUNK = 1 << 20


class UnsafeArchiveError(ValueError):
    """The archive holds a member that would escape the target, a device file, or too many bytes."""


@dataclass
class ExtractReport:
    files: int = 0
    bytes: int = 0
    skipped_links: int = 0


@dataclass
class _Member:
    name: str
    kind: str  # file | dir | symlink | hardlink | other
    link: str = ""
    open: object = None  # callable returning a binary stream (files only)


def _safe_relpath(archive: Path, name: str) -> str:
    """Normalised POSIX relative path of a member, or raise when it could escape the target."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    return "/".join(parts)


def _link_stays_inside(rel: str, link: str, *, hard: bool) -> bool:
    link = link.replace("\\", "/")
    if link.startswith("/"):
        return False
    # tar hard links name a path from the archive root; symlinks are relative to the member's dir
    joined = posixpath.normpath(link if hard else posixpath.join(posixpath.dirname(rel), link))
    return not (joined == ".." or joined.startswith("../"))


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    for m in tf:
        if m.isreg():
            yield _Member(m.name, "file", open=lambda m=m: tf.extractfile(m))
        elif m.isdir():
            yield _Member(m.name, "dir")
        elif m.issym():
            yield _Member(m.name, "symlink", m.linkname)
        elif m.islnk():
            yield _Member(m.name, "hardlink", m.linkname)
        else:  # character/block devices, FIFOs, sparse/unknown types
            yield _Member(m.name, "other")


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            yield _Member(info.filename, "symlink", zf.read(info).decode("utf-8", "replace"))
        elif info.is_dir():
            yield _Member(info.filename, "dir")
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: zips made without unix modes
            yield _Member(info.filename, "other")
        else:
            yield _Member(info.filename, "file", open=lambda info=info: zf.open(info))


def _copy_capped(src: IO[bytes], dst: Path, report: ExtractReport, cap: int, archive: Path, name: str) -> None:
    with open(dst, "wb") as out:
        while block := src.read(CHUNK):
            report.bytes += len(block)
            if report.bytes > cap:
                raise UnsafeArchiveError(
                    f"{archive}: extracting {name!r} exceeds the size cap of {cap} bytes "
                    "(raise datasets.<name>.max_extract_bytes if the archive is genuine)"
                )
            out.write(block)


def _extract_into(archive: Path, members: Iterator[_Member], root: Path, cap: int, max_members: int) -> ExtractReport:
    report = ExtractReport()
    real_root = root.resolve()
    for count, m in enumerate(members, 1):
        if count > max_members:
            raise UnsafeArchiveError(f"{archive}: more than {max_members} members; refusing to extract")
        rel = _safe_relpath(archive, m.name)
        if m.kind == "other":
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device/FIFO/special file; refusing")
        if m.kind in ("symlink", "hardlink"):
            if not _link_stays_inside(rel, m.link, hard=m.kind == "hardlink"):
                raise UnsafeArchiveError(
                    f"{archive}: {m.kind} {m.name!r} -> {m.link!r} points outside the target; refusing"
                )
            report.skipped_links += 1
            continue
        if not rel:
            continue
        dest = root / rel
        if m.kind == "dir":
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        # belt and braces: nothing we created can be a link, but check the resolved parent anyway
        if not dest.parent.resolve().is_relative_to(real_root):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} resolves outside the target; refusing")
        if dest.exists():
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} appears twice; refusing an ambiguous archive")
        with m.open() as src:  # type: ignore[operator]
            _copy_capped(src, dest, report, cap, archive, m.name)
        dest.chmod(0o644)
        report.files += 1
    return report


def safe_extract(archive: Path, target: Path, *, max_total_bytes: int, max_members: int = 2_000_000) -> ExtractReport:
    """Extract `archive` into `target` (replaced atomically) after checking every member.

    Raises UnsafeArchiveError (nothing is left at `target`) on any unsafe member or when more than
    `max_total_bytes` would be written.
    """
    archive, target = Path(archive), Path(target)
    name = archive.name.lower()
    with atomic_dir(target) as tmp:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                report = _extract_into(archive, _zip_members(zf), tmp, max_total_bytes, max_members)
        elif tarfile.is_tarfile(archive):
            # stream mode ("r|*"): one sequential pass, so a 5 GB .tar.xz is decompressed once
            with tarfile.open(archive, "r|*") as tf:
                report = _extract_into(archive, _tar_members(tf), tmp, max_total_bytes, max_members)
        else:
            raise ValueError(f"{archive}: not a tar or zip archive (expected .tar, .tar.gz, .tar.xz, .zip)")
    return report
