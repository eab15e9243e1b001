"""Atomic outputs: a killed run's temp dirs are cleaned up by the next write of the same output."""

from __future__ import annotations

import pytest

from vadbench.io import atomic_dir


def test_next_write_removes_a_killed_runs_leftovers(tmp_path):
    final = tmp_path / "data" / "scores" / "cell"
    final.parent.mkdir(parents=True)
    (final.parent / ".cell.tmp-abc123").mkdir()  # what SIGKILL mid-write leaves
    (final.parent / ".cell.tmp-abc123" / "maps.npy").write_bytes(b"half")
    (final.parent / ".cell.old-999").mkdir()
    (final.parent / ".other.tmp-x").mkdir()  # another output's: not ours to touch
    with atomic_dir(final) as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert sorted(p.name for p in final.parent.iterdir()) == [".other.tmp-x", "cell"]


def test_failed_write_leaves_the_old_output(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (final / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_problems_are_found_before_the_work_and_told_in_one_line(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from vadbench.cli import describe_os_error
    from vadbench.io import preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 1 << 20))
    with pytest.raises(OSError) as info:
        preflight(tmp_path / "scores", need_bytes=1 << 30)
    line = describe_os_error(info.value)
    assert str(tmp_path / "scores") in line and "disk is full" in line and "\n" not in line
    ro = describe_os_error(OSError(errno.EROFS, "Read-only file system", "/data/fits/x"))
    assert ro.startswith("/data/fits/x: ") and "read-only" in ro
    short = describe_os_error(OSError("1277952 requested and 518080 written"))
    assert "disk is full" in short


def test_refused_pickle_never_suggests_weights_only_false(tmp_path):
    import pickle

    from vadbench.io import load_tensors

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    import torch

    torch.save({"obj": Evil()}, path)
    with pytest.raises(ValueError) as info:
        load_tensors(path)
    msg = str(info.value)
    assert str(path) in msg and "refused" in msg and "weights_only=False" not in msg and "\n" not in msg
