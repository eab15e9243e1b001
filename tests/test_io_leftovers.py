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
