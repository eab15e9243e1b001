"""RowFile: rows appended to an anonymous file, read back exactly (slices, picks), in the stored dtype."""

from __future__ import annotations

import pytest
import torch

from vadbench.models.components.row_file import RowFile


def test_fp16_rows_round_trip_with_torch_rounding(tmp_path):
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(0)) * 100
    rows = RowFile(50, 12, torch.float16, dir=tmp_path)
    rows.add(x[:20])
    rows.add(x[20:].double())  # any float dtype in, the stored dtype out
    assert rows.count == 50 and list(tmp_path.iterdir()) == []
    assert rows[0:50].dtype == torch.float16 and torch.equal(rows[0:50], x.half())
    picks = [49, 3, 3, 17, 0]  # any order, repeats allowed
    assert torch.equal(rows.take(picks), x.half()[picks])
    assert rows.take([]).shape == (0, 12)
    rows.close()
    rows.close()  # idempotent
    assert rows.closed


def test_bad_rows_and_indices_are_named_errors():
    rows = RowFile(4, 3)
    rows.add(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"rows \(1, 2\) do not fit a RowFile of shape \(4, 3\)"):
        rows.add(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        rows.add(torch.zeros(3, 3))  # more rows than planned
    with pytest.raises(IndexError, match="row 2 of a RowFile with 2 rows"):
        rows.take([0, 2])
    with pytest.raises(IndexError, match="row -1"):
        rows.take([-1])
    with pytest.raises(IndexError, match="up to 3"):
        rows[0:3]
    rows.close()
