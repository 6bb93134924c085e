"""`RowTokens`: the token id behind every KV position of a generation's rows, kept in step with the KV.

The cache writes a row back to the prefix cache under the ids of its tokens, so it must know them exactly:
the prompt, then every token a forward fed (recorded by a forward pre-hook), reordered, selected, repeated and
cropped exactly like the KV rows (beam search reorders rows, assisted decoding crops rejected drafts).

Invariants: ``length`` columns are valid in every row; the buffer lives on the device the forwards' input ids
come from (no device-to-host copy per step); capacity doubles when it runs out (amortised O(1) per token).
"""

from __future__ import annotations

import torch


class RowTokens:
    """A (rows, length) int64 matrix that grows by columns; `lost` once a forward fed no token ids."""

    def __init__(self, prefix: torch.Tensor) -> None:
        if prefix.dim() != 2:
            raise ValueError(f"prefix must be (rows, length) token ids, got shape {tuple(prefix.shape)}")
        self._ids = prefix.to(torch.long).clone()
        self.length = prefix.shape[1]
        self.lost = False

    @property
    def rows(self) -> int:
        return self._ids.shape[0]

    def append(self, ids: torch.Tensor) -> None:
        """Records the (rows, n) ids a forward fed after the current `length` columns."""
        if ids.dim() != 2 or ids.shape[0] != self.rows:
            raise ValueError(f"a forward fed ids of shape {tuple(ids.shape)}; the cache holds {self.rows} rows")
        end = self.length + ids.shape[1]
        if self._ids.device != ids.device or end > self._ids.shape[1]:
            grown = ids.new_zeros((self.rows, max(end, 2 * self._ids.shape[1], 64)))
            grown[:, : self.length] = self._ids[:, : self.length].to(ids.device)
            self._ids = grown
        self._ids[:, self.length : end] = ids
        self.length = end

    def truncate(self, length: int) -> None:
        """Keeps the first `length` columns (crop)."""
        self.length = max(0, min(self.length, length))

    def select(self, indices: torch.Tensor) -> None:
        """Rows `indices` in that order (beam reorder, batch selection)."""
        self._ids = self._ids[indices.to(self._ids.device)]

    def repeat_interleave(self, repeats: int) -> None:
        self._ids = self._ids.repeat_interleave(repeats, dim=0)

    def host(self) -> torch.Tensor:
        """The valid columns as a CPU tensor (one copy, at write-back time)."""
        return self._ids[:, : self.length].cpu()
