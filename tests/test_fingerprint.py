"""Source fingerprints: any added, removed or edited file changes them; nothing else does."""

from __future__ import annotations

import os

from vadbench.data.fingerprint import fingerprint
from vadbench.data.params import FolderParams


def _spec(root):
    return FolderParams(normal_dir=str(root / "ok"), abnormal_dir=str(root / "ng"), image_size=32)


def _tree(root):
    for sub, n in (("ok", 3), ("ng/scratch", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            (root / sub / f"{i}.png").write_bytes(bytes([i]) * (10 + i))
    return root


def test_fingerprint_follows_content_not_time(tmp_path):
    root = _tree(tmp_path / "src")
    cache = tmp_path / "cache.json"
    first = fingerprint(_spec(root), cache)
    assert [f[0] for f in first["abnormal_dir"]["files"]] == ["scratch/0.png", "scratch/1.png"]
    os.utime(root / "ok" / "0.png", ns=(1, 1))  # touched, same bytes: same fingerprint
    assert fingerprint(_spec(root), cache) == first
    (root / "ok" / "1.png").write_bytes(b"edited!!!!!")  # same size, new content
    os.utime(root / "ok" / "1.png", ns=(2, 2))
    edited = fingerprint(_spec(root), cache)
    assert edited != first
    (root / "ok" / "9.png").write_bytes(b"new")
    added = fingerprint(_spec(root), cache)
    assert len(added["normal_dir"]["files"]) == 4
    (root / "ng" / "scratch" / "1.png").unlink()
    assert len(fingerprint(_spec(root), cache)["abnormal_dir"]["files"]) == 1
    (root / "ok" / ".DS_Store").write_bytes(b"x")  # hidden files are not data
    assert len(fingerprint(_spec(root), cache)["normal_dir"]["files"]) == 4


def test_cache_is_used_for_unchanged_files(tmp_path, monkeypatch):
    root = _tree(tmp_path / "src")
    cache = tmp_path / "cache.json"
    fingerprint(_spec(root), cache)
    calls = []
    import vadbench.data.fingerprint as fp

    monkeypatch.setattr(fp, "sha256_file", lambda p: calls.append(p) or "x")
    fingerprint(_spec(root), cache)
    assert calls == []  # nothing re-hashed


def test_generated_dataset_has_no_sources():
    from vadbench.data.params import SyntheticSemParams

    assert fingerprint(SyntheticSemParams()) == {}
