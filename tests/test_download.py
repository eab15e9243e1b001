"""Download + extraction against a real HTTP server on 127.0.0.1 serving archives built here."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vadbench.data.archive import UnsafeArchiveError, safe_extract
from vadbench.data.download import ChecksumError, DownloadError, download, fetch_and_extract
from vadbench.data.params import MvtecAdParams


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files[name]; `?mode=truncate` announces the full size but sends half, once."""

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        name, _, query = self.path.lstrip("/").partition("?")
        srv.requests.append((name, self.headers.get("Range")))
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if "truncate" in query and srv.truncate_left > 0:
            srv.truncate_left -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-body
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.ranges, srv.truncate_left = {}, [], True, 1
    srv.timeout = 0.2
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _tar(members: dict[str, bytes], *, mode: str = "w:gz", extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


GOOD = {"ds/a.txt": b"alpha" * 1000, "ds/sub/b.txt": bytes(range(256)) * 4096}  # ~1 MB: cut mid-body


def _spec(url: str, sha: str | None = None, **kw: object) -> MvtecAdParams:
    return MvtecAdParams(category="bottle", url=url, sha256=sha, archive="ds.tar.gz", connect_timeout=2.0, **kw)


def test_good_archive_downloads_verifies_extracts_once(server, tmp_path):
    data = _tar(GOOD)
    server.files["ds.tar.gz"] = data
    spec = _spec(f"{server.url}/ds.tar.gz", hashlib.sha256(data).hexdigest())
    root, digest = fetch_and_extract("mvtec_ad", spec, tmp_path / "raw", progress=False)
    assert digest == hashlib.sha256(data).hexdigest()
    assert (root / "ds" / "sub" / "b.txt").read_bytes() == GOOD["ds/sub/b.txt"]
    n = len(server.requests)
    again, _ = fetch_and_extract("mvtec_ad", spec, tmp_path / "raw", progress=False)
    assert again == root and len(server.requests) == n  # finished marker: no second download


def test_truncated_download_fails_then_resumes_with_range(server, tmp_path):
    data = _tar(GOOD, mode="w")  # uncompressed: big enough to cut in half
    server.files["ds.tar"] = data
    dest = tmp_path / "ds.tar"
    url = f"{server.url}/ds.tar?truncate"
    with pytest.raises(DownloadError, match="truncated|interrupted"):
        download(url, dest, connect_timeout=2, read_timeout=5, progress=False)
    part = dest.with_name("ds.tar.part")
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    digest = download(url, dest, connect_timeout=2, read_timeout=5, progress=False)
    assert server.requests[-1][1] == f"bytes={have}-"  # resumed, not restarted
    assert dest.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert not part.exists()


def test_complete_part_file_is_finished_via_416(server, tmp_path):
    data = _tar(GOOD, mode="w")
    server.files["ds.tar"] = data
    dest = tmp_path / "ds.tar"
    dest.with_name("ds.tar.part").write_bytes(data)  # killed after the last byte, before the rename
    assert download(f"{server.url}/ds.tar", dest, size=len(data), progress=False) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data and server.requests[-1][1] == f"bytes={len(data)}-"


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    data = _tar(GOOD, mode="w")
    server.files["ds.tar"], server.ranges = data, False
    dest = tmp_path / "ds.tar"
    dest.with_name("ds.tar.part").write_bytes(b"stale partial bytes")
    assert download(f"{server.url}/ds.tar", dest, progress=False) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data


def test_wrong_checksum_is_never_extracted(server, tmp_path):
    data = _tar(GOOD)
    server.files["ds.tar.gz"] = data
    spec = _spec(f"{server.url}/ds.tar.gz", "0" * 64)
    with pytest.raises(ChecksumError, match="differs from the expected"):
        fetch_and_extract("mvtec_ad", spec, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / "mvtec_ad" / "extracted").exists()
    assert (tmp_path / "raw" / "mvtec_ad" / "ds.tar.gz.corrupt").is_file()


def test_unknown_checksum_refuses_until_user_supplies_it(server, tmp_path):
    data = _tar(GOOD)
    server.files["ds.tar.gz"] = data
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ChecksumError, match=digest):  # the message shows the sha256 to compare
        fetch_and_extract("mvtec_ad", _spec(f"{server.url}/ds.tar.gz"), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / "mvtec_ad" / "extracted").exists()
    n = len(server.requests)
    root, _ = fetch_and_extract("mvtec_ad", _spec(f"{server.url}/ds.tar.gz", digest), tmp_path / "raw", progress=False)
    assert (root / "ds" / "a.txt").is_file() and len(server.requests) == n  # reused the verified file


def test_http_error_and_offline_fail_fast(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.tar", tmp_path / "x.tar", progress=False)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="cannot download"):
        download(f"http://127.0.0.1:{port}/x.tar", tmp_path / "x.tar", connect_timeout=1, progress=False)
    assert time.monotonic() - t0 < 30  # a hang guard, not a speed assertion


def test_silent_server_times_out_instead_of_hanging(tmp_path):
    with socket.socket() as listener:  # accepts (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DownloadError):
            download(
                f"http://127.0.0.1:{port}/x.tar",
                tmp_path / "x.tar",
                connect_timeout=1,
                read_timeout=0.5,
                progress=False,
            )
        assert time.monotonic() - t0 < 30


@pytest.mark.parametrize(
    "members, extra, message",
    [
        ({"ok.txt": b"x", "../evil.txt": b"owned"}, [], "'..'"),
        ({"/tmp/abs_evil.txt": b"owned"}, [], "absolute"),
        ({"ok.txt": b"x"}, [_link("ds/escape", "../../outside")], "points outside"),
        ({"ok.txt": b"x"}, [_link("ds/abs", "/etc/passwd")], "points outside"),
        ({"ok.txt": b"x"}, [_link("hard", "../outside", tarfile.LNKTYPE)], "points outside"),
        ({"ok.txt": b"x"}, [_link("dev", "", tarfile.CHRTYPE)], "device"),
    ],
)
def test_unsafe_tar_members_are_refused(server, tmp_path, members, extra, message):
    data = _tar(members, extra=extra)
    server.files["ds.tar.gz"] = data
    spec = _spec(f"{server.url}/ds.tar.gz", hashlib.sha256(data).hexdigest())
    with pytest.raises(UnsafeArchiveError, match=message):
        fetch_and_extract("mvtec_ad", spec, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / "mvtec_ad" / "extracted").exists()
    assert not (tmp_path / "raw" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert [p.name for p in (tmp_path / "raw" / "mvtec_ad").iterdir()] == ["ds.tar.gz"]  # no temp dirs left


def test_links_inside_target_are_skipped_not_followed(tmp_path):
    archive = tmp_path / "in.tar.xz"  # xz like the MVTec archives: read in one streaming pass
    archive.write_bytes(_tar({"d/a.txt": b"a"}, mode="w:xz", extra=[_link("d/alias", "a.txt")]))
    report = safe_extract(archive, tmp_path / "out", max_total_bytes=10_000)
    assert (report.files, report.skipped_links) == (1, 1)
    assert not (tmp_path / "out" / "d" / "alias").exists()


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def test_zip_symlink_escape_and_size_cap(tmp_path):
    link = zipfile.ZipInfo("ds/link")
    link.external_attr = 0o120777 << 16  # S_IFLNK: a symlink whose content is its target
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip([("ds/a.txt", b"a"), (link, b"../../etc")]))
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        safe_extract(bad, tmp_path / "out", max_total_bytes=10_000)
    assert not (tmp_path / "out").exists()
    big = tmp_path / "big.zip"
    big.write_bytes(_zip([("a.bin", b"\0" * 200_000), ("b.bin", b"\0" * 200_000)]))  # compresses to ~1 KB
    with pytest.raises(UnsafeArchiveError, match="size cap"):
        safe_extract(big, tmp_path / "out", max_total_bytes=300_000)
    assert not (tmp_path / "out").exists()
    report = safe_extract(big, tmp_path / "out", max_total_bytes=400_000)
    assert report.bytes == 400_000 and (tmp_path / "out" / "b.bin").stat().st_size == 200_000
