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
        self._buffers: dict[str, np.ndarray] = {}

    def put(self, rows: np.ndarray, columns: Columns) -> None:
        """Values for ``rows`` (positions in the call), one per row along axis 0."""
        for name, values in columns.items():
            buffer = self._buffers.get(name)
            if buffer is None:
                shape = (self.rows, *values.shape[1:])
                empty = np.empty if values.dtype == object else np.zeros
                buffer = self._buffers[name] = empty(shape, dtype=values.dtype)
            buffer[rows] = values
        self.filled[rows] = True

    def arrays(self) -> list[pa.Array]:
        """One Arrow array per schema field, in schema order."""
        return [self._array(f) for f in self.schema]

    def _array(self, field: pa.Field) -> pa.Array:
        buffer = self._buffers.get(field.name)
        if buffer is None:
            return pa.nulls(self.rows, field.type)
        missing = pa.array(~self.filled)
        if pa.types.is_fixed_size_list(field.type):
            values = pa.array(buffer.reshape(-1), field.type.value_type)
            return pa.FixedSizeListArray.from_arrays(
                values, type=field.type, mask=missing
            )
        return pa.array(buffer, field.type, mask=~self.filled)
