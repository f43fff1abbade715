"""Token rows from Arrow to padded model inputs, with no Python loop over rows.

The tokenize stage hands each actor a ``list<int32>`` column. Its flat values and
offsets are all a micro-batch needs: one gather builds the padded ids and the mask
for any subset of rows, left- or right-padded, so host work stays small next to
the model's (a GPU must not wait for a Python loop over 8,000 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class TokenRows:
    """Every row's token ids, as one flat array and where each row starts."""

    values: np.ndarray  # int32, all rows' ids back to back
    starts: np.ndarray  # int64, where each row starts in ``values``
    lengths: np.ndarray  # int64, tokens per row (0 for a row with an error)
    # int64, per row the last tokens that are a text pair's second text (type 1);
    # None where the model takes no token types
    pair_tokens: np.ndarray | None = None

    @classmethod
    def from_arrow(
        cls,
        column: pa.ChunkedArray | pa.Array,
        pair_tokens: pa.ChunkedArray | None = None,
    ) -> TokenRows:
        """From the ``_ids`` column (and ``_pair_tokens``); null rows (rows with an
        error) have no tokens."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)  # nulls repeat offsets
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int32)
        pairs = None
        if pair_tokens is not None:
            pairs = pair_tokens.fill_null(0).to_numpy().astype(np.int64)
        return cls(values, offsets[:-1], np.diff(offsets), pairs)

    @classmethod
    def windows(
        cls,
        column: pa.ChunkedArray,
        windows: pa.ChunkedArray,
        scored: pa.ChunkedArray | None = None,
    ) -> tuple[TokenRows, np.ndarray]:
        """--on-long chunk: an entry for each window of each row (``_windows``: the
        window lengths of a row's ``_ids``), and the row each window belongs to;
        ``scored``: each window's last tokens scored (score), as ``pair_tokens``."""
        rows = cls.from_arrow(column)
        windows = windows.combine_chunks()
        counts = pc.list_value_length(windows).fill_null(0).to_numpy()
        lengths = windows.flatten().to_numpy().astype(np.int64)
        owner = np.repeat(np.arange(len(counts)), counts)
        before = np.cumsum(lengths) - lengths  # tokens before each window, all rows
        first = (np.cumsum(counts) - counts)[owner]  # each window's row's first
        starts = rows.starts[owner] + before - before[first]
        if scored is not None:
            scored = scored.combine_chunks().flatten().to_numpy().astype(np.int64)
        return cls(rows.values, starts, lengths, scored), owner

    def pad(
        self, rows: np.ndarray, pad_id: int, side: str = "right"
    ) -> tuple[np.ndarray, ...]:
        """(ids, mask) of shape ``len(rows) x longest``, int64, padded on ``side``;
        and the token types, where the rows are text pairs: 1 on the pair's second
        text, 0 elsewhere and on padding (as transformers pads them)."""
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        position = np.arange(width, dtype=np.int64)[None, :]
        if side == "left":
            position = position - (width - lengths)[:, None]
        mask = (position >= 0) & (position < lengths[:, None])
        index = self.starts[rows][:, None] + position
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        ids[mask] = self.values[index[mask]]
        if self.pair_tokens is None:
            return ids, mask.astype(np.int64)
        second = position >= (lengths - self.pair_tokens[rows])[:, None]
        return ids, mask.astype(np.int64), (second & mask).astype(np.int64)
