"""The block tables of running sequences: one row per sequence, kept on the host and on every
rank's device, and changed only where a sequence joins, gains a block or leaves.

The driver's `BlockTables` is written by the block manager (a row per sequence that holds
blocks, `Sequence.block_row`). Every rank keeps a device copy of the same array; a step does
not send its sequences' tables, only their row numbers and the entries written since the
copies last took them (`updates`), so a decode step's message no longer grows with the
batch's context lengths. The rank applies the entries, then gathers the step's rows
(`device_tables`).
"""

from __future__ import annotations

import numpy as np
import torch


class BlockTables:
    def __init__(self, num_rows: int, width: int) -> None:
        self.host = np.zeros((num_rows, width), dtype=np.int32)  # 0-padded
        # Entries written since the devices last took them: flat index -> value. A dict keeps
        # the last write of an entry (a row freed, then given to another sequence).
        self._pending: dict[int, int] = {}

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        """Entries [start, start + len(blocks)) of `row`."""
        self.host[row, start : start + len(blocks)] = blocks
        base = row * self.host.shape[1] + start
        self._pending.update(zip(range(base, base + len(blocks)), blocks))

    def clear(self, row: int, count: int) -> None:
        """Zero the first `count` entries of `row` (its sequence left)."""
        self.write(row, 0, [0] * count)

    def updates(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices, values) written since `taken` was last called. They stay pending
        until then, so a step that fails before every rank applied them sends them again
        (applying an entry twice writes the same value)."""
        pending = self._pending
        index = np.fromiter(pending.keys(), dtype=np.int64, count=len(pending))
        values = np.fromiter(pending.values(), dtype=np.int64, count=len(pending))
        return index, values

    def taken(self) -> None:
        """Every rank has the entries `updates` returned."""
        self._pending.clear()


def new_device_tables(num_rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A rank's copy of the driver's `BlockTables.host` (all zeros, as the host starts)."""
    return torch.zeros(num_rows, width, dtype=torch.int32, device=device)


def device_tables(
    tables: torch.Tensor, index: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
    max_blocks: int,
) -> torch.Tensor:
    """Apply a step's entries to a rank's copy, then the step's tables: int32 [len(rows),
    max_blocks], row i the table of the step's sequence i. On CUDA both run in stream order,
    so a step still running reads the copy as it was when that step gathered its rows."""
    if index.numel():
        tables.view(-1).index_copy_(0, index, values.to(torch.int32))
    return tables[:, :max_blocks].index_select(0, rows)
