"""The engine's preallocated KV cache: rows of slots written in place, and each slot's metadata.

`SlotCache` is a transformers `Cache` of `batch_capacity` rows x `capacity` slots per layer; the engine
plans each forward (which rows, which slots each query writes, how many slots it attends over). `SlotMeta`
holds, per cache row, how many slots are used and per slot whether it is valid and its block and path ids,
from which the engine builds the step's Unseen mask (docs/engine.md).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer of a `SlotCache`: keys/values [rows, kv heads, capacity, head dim], written in place."""

    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, capacity = self.owner.batch_capacity, self.owner.capacity
        self.keys = key_states.new_zeros((rows, key_states.shape[1], capacity, key_states.shape[-1]))
        self.values = value_states.new_zeros((rows, value_states.shape[1], capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_length, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_length

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """A preallocated KV cache of `batch_capacity` rows x `capacity` slots per layer, written in place.

    Before each forward the engine sets the step's plan: `rows` (the cache rows of the step's batch rows:
    a slice, read as a view, or an index tensor, gathered), `row_index` [b, 1] and `slots` [b, Q] (where
    each query's key/value goes) and `kv_length` (how many slots the step attends over). `grow` enlarges
    the capacity, `move_row` copies a row (compaction), `swap_rows` exchanges two.
    """

    def __init__(self, num_layers: int, batch_capacity: int, capacity: int):
        self.batch_capacity, self.capacity = batch_capacity, capacity
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.rows: torch.Tensor | slice = slice(0)
        self.row_index: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.kv_length = 0

    def plan(self, rows: torch.Tensor | slice, row_index: torch.Tensor, slots: torch.Tensor, kv_length: int) -> None:
        self.rows, self.row_index, self.slots, self.kv_length = rows, row_index, slots, kv_length

    def write(self, layer: _SlotLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        layer.keys[self.row_index, :, self.slots] = key_states.transpose(1, 2)
        layer.values[self.row_index, :, self.slots] = value_states.transpose(1, 2)
        return layer.keys[self.rows, :, : self.kv_length], layer.values[self.rows, :, : self.kv_length]

    def grow(self, capacity: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
                    new[:, :, : old.shape[2]] = old
                    setattr(layer, name, new)
        self.capacity = capacity

    def swap_rows(self, a: int, b: int, length: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                for tensor in (layer.keys, layer.values):
                    kept = tensor[a, :, :length].clone()
                    tensor[a, :, :length] = tensor[b, :, :length]
                    tensor[b, :, :length] = kept

    def move_row(self, source: int, target: int, length: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]


class SlotMeta:
    """Per cache row: how many slots are used, and per slot whether it is valid ([rows, capacity]) and its
    block id and path id at each of `depth` nesting levels ([rows, capacity, depth], -1 outside)."""

    def __init__(self, rows: int, capacity: int, device: torch.device, depth: int = 1):
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.block = torch.full((rows, capacity, depth), -1, dtype=torch.long, device=device)
        self.path = torch.full((rows, capacity, depth), -1, dtype=torch.long, device=device)
        self.lengths: list[int] = []

    def reset(self, row: int) -> None:
        """Row `row` starts a new sample (appended when row == len(lengths))."""
        self.valid[row] = False
        if row == len(self.lengths):
            self.lengths.append(0)
        else:
            self.lengths[row] = 0

    def grow(self, capacity: int) -> None:
        for name, fill in (("valid", False), ("block", -1), ("path", -1)):
            old = getattr(self, name)
            new = torch.full((old.shape[0], capacity, *old.shape[2:]), fill, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def write(self, index: torch.Tensor, where: torch.Tensor) -> None:
        """Mark slots used: `index` [2, n] holds per slot its cache row and slot index, `where` [n, 2 D] its block
        ids at the D levels, then its path ids."""
        rows_slots = (index[0], index[1])
        depth = self.block.shape[2]
        self.valid[rows_slots] = True
        self.block[rows_slots] = where[:, :depth]
        self.path[rows_slots] = where[:, depth:]

    def hide(self, row: int, path_ids: list[int]) -> None:
        hidden = torch.isin(self.path[row], torch.tensor(path_ids, device=self.path.device)).any(-1)
        self.valid[row] &= ~hidden

    def move_row(self, source: int, target: int) -> None:
        for tensor in (self.valid, self.block, self.path):
            tensor[target] = tensor[source]
        self.lengths[target] = self.lengths[source]

    def swap_rows(self, a: int, b: int) -> None:
        for tensor in (self.valid, self.block, self.path):
            tensor[[a, b]] = tensor[[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def view(self, rows: torch.Tensor | slice, kv_length: int):
        return self.valid[rows, :kv_length], self.block[rows, :kv_length], self.path[rows, :kv_length]
