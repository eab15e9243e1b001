#!/usr/bin/env python3
"""Fetch pinned vega / vega-lite / vega-embed builds and write the offline `dvc plots show` page template.

`dvc plots show` (dvc-render) loads vega@5.20.2, vega-lite@5.2.0 and vega-embed@6.18.2 from a CDN, so its
page stays blank without internet. This script:

1. runs `npm pack <pkg>@<version>` (the npm client, into a temp dir) for each pinned package,
2. checks each tarball's sha512 against the integrity pinned below (the registry's `dist.integrity`),
3. extracts only the one UMD build file per package (member checked: a regular file at the expected path),
4. writes `.cache/vega/<pkg>.min.js`, and `.cache/vega/template.html` = `plots/template.html` with the
   three builds inlined, so a page rendered from it is self-contained: it opens from disk (file://),
   needs no network and no files beside it except the images dvc copies into `<out>/static/`,
5. records what it wrote in `.cache/vega/manifest.json` (versions, sha256 of every file, template source).

Idempotent: when the cache already matches the pins (sha256 of each file), npm is not run at all; the
template is rebuilt from the cached builds when `plots/template.html` changed. `--check` only verifies
and exits 1 with the problems. Standard library only, so it runs before the project venv exists.

Usage: python scripts/fetch_vega.py [--root REPO] [--check]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The exact versions dvc-render's VegaRenderer.SCRIPTS loads from the CDN (dvc-render 1.x, dvc 3.67);
# tests/test_plots_page.py fails if the installed dvc-render asks for different ones.
# integrity = `npm view <pkg>@<version> dist.integrity` (sha512 of the .tgz, base64).
PINS: dict[str, dict[str, str]] = {
    "vega": {
        "version": "5.20.2",
        "integrity": "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "member": "package/build/vega.min.js",
    },
    "vega-lite": {
        "version": "5.2.0",
        "integrity": "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "member": "package/build/vega-lite.min.js",
    },
    "vega-embed": {
        "version": "6.18.2",
        "integrity": "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "member": "package/build/vega-embed.min.js",
    },
}
# Load order matters: vega-lite's UMD build needs the global `vega`, vega-embed needs `vega` and `vegaLite`.
ORDER = ("vega", "vega-lite", "vega-embed")

CACHE_REL = Path(".cache/vega")
TEMPLATE_SRC_REL = Path("plots/template.html")
MARKER = "<!-- vadbench:vega-scripts -->"
# dvc-render fills the template with str.replace on these; inlined JS must not contain them.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
NPM_TIMEOUT_S = 300
INSTALL_HINT = "run `make plots-deps` (or `python3 scripts/fetch_vega.py`; needs npm and the npm registry)"


class VegaFetchError(RuntimeError):
    """A fetch or verification step failed; the message says which file and what was expected."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _integrity_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is plain readable data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_js(name: str, js: bytes) -> None:
    """Inline-safety: the build must not end the <script> element early nor contain dvc placeholders."""
    low = js.lower()
    for bad in (b"</script", b"<!--"):
        if bad in low:
            raise VegaFetchError(f"{name}: build contains {bad.decode()!r}; it cannot be inlined in a <script>")
    for ph in DVC_PLACEHOLDERS:
        if ph.encode() in js:
            raise VegaFetchError(f"{name}: build contains the dvc-render placeholder {ph}")


def build_template(template_src: str, builds: dict[str, bytes]) -> str:
    """Return `template_src` with MARKER replaced by the three builds inlined in ORDER."""
    if template_src.count(MARKER) != 1:
        raise VegaFetchError(f"{TEMPLATE_SRC_REL}: expected exactly one {MARKER!r} line")
    if template_src.count("{plot_divs}") != 1:
        raise VegaFetchError(f"{TEMPLATE_SRC_REL}: expected exactly one {{plot_divs}} placeholder")
    if "{scripts}" in template_src:
        # dvc-render would put its CDN <script src=https://cdn.jsdelivr.net/...> tags there.
        raise VegaFetchError(f"{TEMPLATE_SRC_REL}: must not contain the {{scripts}} placeholder (CDN scripts)")
    parts = []
    for name in ORDER:
        js = builds[name].decode("utf-8")
        version = PINS[name]["version"]
        parts.append(f'<script data-vendor="{name}@{version}">\n{js}\n</script>')
    return template_src.replace(MARKER, "\n".join(parts))


def _npm_pack(name: str, version: str, workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise VegaFetchError(
            f"npm not found on PATH: install Node.js/npm (Debian: apt-get install -y npm), then {INSTALL_HINT}"
        )
    cmd = [npm, "pack", "--silent", "--json", f"{name}@{version}"]
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise VegaFetchError(
            f"`{' '.join(cmd)}` took more than {NPM_TIMEOUT_S} s (is the npm registry reachable?)"
        ) from exc
    if proc.returncode != 0:
        raise VegaFetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    tgz = workdir / f"{name}-{version}.tgz"
    if not tgz.is_file():
        raise VegaFetchError(f"`{' '.join(cmd)}` did not write {tgz.name}; stdout: {proc.stdout.strip()[:500]}")
    return tgz


def _extract_member(tgz: Path, member_name: str) -> bytes:
    """Read exactly one regular-file member from the tarball; nothing is written to disk from the archive."""
    with tarfile.open(tgz, "r:gz") as tar:
        try:
            member = tar.getmember(member_name)
        except KeyError as exc:
            raise VegaFetchError(f"{tgz.name}: has no {member_name}") from exc
        if not member.isfile():
            raise VegaFetchError(f"{tgz.name}: {member_name} is not a regular file")
        fh = tar.extractfile(member)
        assert fh is not None
        return fh.read()


def fetch_builds(workdir: Path) -> dict[str, bytes]:
    """npm-pack each pinned package into `workdir`, verify integrity, return {name: build bytes}."""
    builds = {}
    for name in ORDER:
        pin = PINS[name]
        tgz = _npm_pack(name, pin["version"], workdir)
        got = _integrity_sha512(tgz.read_bytes())
        if got != pin["integrity"]:
            raise VegaFetchError(f"{tgz.name}: integrity {got} != pinned {pin['integrity']}")
        js = _extract_member(tgz, pin["member"])
        _check_js(name, js)
        builds[name] = js
    return builds


def _load_manifest(cache: Path) -> dict | None:
    try:
        return json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_builds(root: Path) -> tuple[dict[str, bytes] | None, list[str]]:
    """The cached builds if all three match the pins (by manifest and sha256), else (None, problems)."""
    cache = root / CACHE_REL
    manifest = _load_manifest(cache)
    if manifest is None:
        return None, [f"{cache / 'manifest.json'} is missing or unreadable"]
    problems, builds = [], {}
    for name in ORDER:
        entry = manifest.get("packages", {}).get(name, {})
        pin = PINS[name]
        if entry.get("version") != pin["version"] or entry.get("integrity") != pin["integrity"]:
            problems.append(f"{name}: cached {entry.get('version')!r}, pinned {pin['version']}")
            continue
        path = cache / f"{name}.min.js"
        try:
            data = path.read_bytes()
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if _sha256(data) != entry.get("sha256"):
            problems.append(f"{path}: sha256 differs from {cache / 'manifest.json'}")
            continue
        builds[name] = data
    return (builds if not problems else None), problems


def check(root: Path) -> list[str]:
    """Problems with the cache and the generated template (empty list = ready for `dvc plots show`)."""
    builds, problems = cached_builds(root)
    if builds is None:
        return problems
    cache = root / CACHE_REL
    manifest = _load_manifest(cache) or {}
    template = cache / "template.html"
    src = root / TEMPLATE_SRC_REL
    try:
        src_sha = _sha256(src.read_bytes())
    except OSError:
        return [f"{src} is missing"]
    if manifest.get("template_source_sha256") != src_sha:
        problems.append(f"{template} is stale: {src} changed since it was built")
    try:
        if _sha256(template.read_bytes()) != manifest.get("template_sha256"):
            problems.append(f"{template}: sha256 differs from {cache / 'manifest.json'}")
    except OSError:
        problems.append(f"{template} is missing")
    return problems


def ensure(root: Path) -> Path:
    """Make `.cache/vega/` match the pins and the template source; return the template path."""
    cache = root / CACHE_REL
    src = root / TEMPLATE_SRC_REL
    builds, _ = cached_builds(root)
    fetched = builds is None
    if builds is None:
        with tempfile.TemporaryDirectory(prefix="vadbench-npm-") as tmp:
            builds = fetch_builds(Path(tmp))
    template_src_bytes = src.read_bytes()
    template = build_template(template_src_bytes.decode("utf-8"), builds).encode("utf-8")
    if not fetched and not check(root):
        return cache / "template.html"
    for name in ORDER:
        _atomic_write(cache / f"{name}.min.js", builds[name])
    _atomic_write(cache / "template.html", template)
    manifest = {
        "note": "written by scripts/fetch_vega.py; do not edit",
        "packages": {
            name: {
                "version": PINS[name]["version"],
                "integrity": PINS[name]["integrity"],
                "member": PINS[name]["member"],
                "sha256": _sha256(builds[name]),
            }
            for name in ORDER
        },
        "template_source": str(TEMPLATE_SRC_REL),
        "template_source_sha256": _sha256(template_src_bytes),
        "template_sha256": _sha256(template),
    }
    # manifest last: a crash before this leaves a cache that `check` reports as stale, never a false "ok"
    _atomic_write(cache / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return cache / "template.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root")
    parser.add_argument("--check", action="store_true", help="only verify the cache; exit 1 if it is not ready")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.check:
        problems = check(root)
        if problems:
            print("vega cache not ready:\n  " + "\n  ".join(problems) + f"\n{INSTALL_HINT}", file=sys.stderr)
            return 1
        print(f"ok: {root / CACHE_REL / 'template.html'}")
        return 0
    try:
        template = ensure(root)
    except VegaFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
