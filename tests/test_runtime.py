"""Runtime helpers: the scoped thread limit restores the caller's thread count and leaves CUDA alone."""

from __future__ import annotations

import torch

from vadbench.runtime import intra_op_threads


def test_intra_op_threads_is_scoped():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with intra_op_threads(1, torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with intra_op_threads(1, torch.device("cuda")):  # a device type only: no GPU needed
            assert torch.get_num_threads() == 2
        try:
            with intra_op_threads(1, torch.device("cpu")):
                raise KeyError("boom")
        except KeyError:
            pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
