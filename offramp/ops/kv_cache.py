"""Preallocated per-stage KV cache with one slot per running sequence.

Layout per layer: ``(max_slots, num_kv_heads, max_seq, head_dim)``. Slots are handed out
lowest-free-first, so a batch that starts together occupies consecutive slots and
attention reads cache *views* instead of gathering copies. A finished or cancelled
sequence frees its slot at once (rows leave the batch; their KV rows are reused).
"""
from __future__ import annotations

import heapq

import torch

from offramp.errors import Overloaded


class KVCache:
    def __init__(self, num_layers: int, max_slots: int, max_seq: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (max_slots, num_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots, self.max_seq = max_slots, max_seq
        self._free = list(range(max_slots))  # min-heap
        self.slot_of: dict[str, int] = {}
        self.length: dict[str, int] = {}  # positions cached per sequence

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def free_slots(self) -> int:
        return len(self._free)

    def occupancy(self) -> float:
        return len(self.slot_of) / self.max_slots

    def alloc(self, seq_id: str) -> int:
        if seq_id in self.slot_of:
            return self.slot_of[seq_id]
        if not self._free:
            raise Overloaded(f"all {self.max_slots} KV slots of this stage are in use; retry later or raise max_sequences")
        slot = heapq.heappop(self._free)
        self.slot_of[seq_id] = slot
        self.length[seq_id] = 0
        return slot

    def free(self, seq_id: str) -> None:
        slot = self.slot_of.pop(seq_id, None)
        self.length.pop(seq_id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)

    def layer_kv(self, seq_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nkv, length, hd) views of one sequence's cached K/V at a local layer index."""
        s, n = self.slot_of[seq_id], self.length[seq_id]
        return self.k[layer][s, :, :n], self.v[layer][s, :, :n]
