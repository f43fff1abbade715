"""One actor call's output: contiguous buffers filled micro-batch by micro-batch, then
Arrow arrays built from them in one step (a fixed-size list from one float array, not
a list of per-row numpy objects).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lmbatch.actors.tasks import Columns


class Outputs:
    """Columns of ``schema`` for ``rows`` rows; a row never filled is null."""

    def __init__(self, schema: pa.Schema, rows: int) -> None:
        self.schema = schema
        self.rows = rows
        self.filled = np.zeros(rows, dtype=bool)
        self.buffers: dict[str, np.ndarray] = {}  # by column, one entry a row

    def put(self, rows: np.ndarray, columns: Columns) -> None:
        """Values for ``rows`` (positions in the call), one per row along axis 0."""
        for name, values in columns.items():
            buffer = self.buffers.get(name)
            if buffer is None:
                shape = (self.rows, *values.shape[1:])
                empty = np.empty if values.dtype == object else np.zeros
                buffer = self.buffers[name] = empty(shape, dtype=values.dtype)
            buffer[rows] = values
        self.filled[rows] = True

    def fail(self, row: int) -> int:
        """A row that did not fit even alone, or whose values are not finite: it is
        null. -> row"""
        self.filled[row] = False
        return row

    def arrays(self) -> list[pa.Array]:
        """One Arrow array per schema field, in schema order."""
        return [self._array(f) for f in self.schema]

    def _array(self, field: pa.Field) -> pa.Array:
        buffer = self.buffers.get(field.name)
        if buffer is None:
            return pa.nulls(self.rows, field.type)
        missing = pa.array(~self.filled)
        if pa.types.is_fixed_size_list(field.type):
            values = pa.array(buffer.reshape(-1), field.type.value_type)
            return pa.FixedSizeListArray.from_arrays(
                values, type=field.type, mask=missing
            )
        return pa.array(buffer, field.type, mask=~self.filled)


class Windows:
    """An --on-long chunk call's output: each window's values, kept as micro-batches
    finish (a row's windows may fall in several); ``arrays`` gives each row's from
    its windows' (``merge`` of the head: embed and classify average, score adds up)."""

    def __init__(self, head, owner: np.ndarray, tokens: np.ndarray, rows: int) -> None:
        """``owner``: the row of each window, in row order; ``tokens``: each
        window's tokens."""
        self.head = head
        self.owner = owner
        self.tokens = tokens
        self.rows = rows
        # One entry a window, its buffers only: the windows' values, before merging.
        self.values = Outputs(head.schema, len(owner))
        self.failed = np.zeros(rows, dtype=bool)

    def put(self, windows: np.ndarray, columns: Columns) -> None:
        self.values.put(windows, columns)

    def fail(self, window: int) -> int:
        """A window that did not fit even alone, or whose values are not finite: its
        row gets no values. -> row"""
        row = int(self.owner[window])
        self.failed[row] = True
        return row

    def arrays(self) -> list[pa.Array]:
        out = Outputs(self.head.schema, self.rows)
        if self.values.filled.any():
            first = np.flatnonzero(np.diff(self.owner, prepend=-1))  # each row's
            rows = self.owner[first]
            merged = self.head.merge(self.values.buffers, first, self.tokens)
            ok = ~self.failed[rows]
            out.put(rows[ok], {name: v[ok] for name, v in merged.items()})
        return out.arrays()
