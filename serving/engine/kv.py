"""SlotCache: the KV cache of a batch of sequences, one slot (row) per sequence, a length per slot.

A sequence holds a slot from `acquire` to `release`. One forward (`serving.engine.models.forward_slots`)
runs the rows [0, rows): every slot in use and any free ones between them, which are padding.
Each row's n new keys and values are written at that row's own length, and a 4D mask
(`slot_attention`) shows each query its row's cached positions plus the new positions it may
see (its chain prefix, or its ancestors in a tree), within the layer's sliding window if it has
one: every layer keeps every position, whatever its window. Rolling a sequence back after a
rejection is setting its length: nothing moves. Slots are handed out lowest first, so the rows in
use stay packed at the front.

Two layouts, picked by the device (`serving.engine.device`):
- dynamic (CPU): slots and capacity grow on demand, and a forward attends over the rows in use
  up to the longest row, so short batches cost little;
- static (GPU): every slot is allocated at full capacity once, and a forward always runs all slots
  at full width, so every tensor shape is fixed (what CUDA graphs and torch.compile need).

(Padding a shared DynamicCache instead would leave rejected positions as masked holes, one set
per step and row; benchmarks/batching.py measures the two layouts side by side.)
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin


class CacheFullError(RuntimeError):
    """A static cache has no free slot, or no room for a row's tokens."""


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values [slots, kv_heads, capacity, head_dim]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, dim = key_states.shape
        shape = (self.owner.slots, heads, self.owner.capacity, dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        if self.owner.static:  # never reallocated: compiled graphs may write into them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.device = key_states.device
        self.is_initialized = True

    def fit(self) -> None:
        """Grow to the owner's slots and capacity, keeping what is stored."""
        slots, _, capacity, _ = self.keys.shape
        if (slots, capacity) == (self.owner.slots, self.owner.capacity):
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(self.owner.slots, old.shape[1], self.owner.capacity, old.shape[3])
            new[:slots, :, :capacity] = old
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write new states [rows, kv_heads, n, head_dim] at each row's length; return the keys and
        values the forward attends over [rows, kv_heads, width, head_dim]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.fit()
        rows, cols = self.owner.write_at  # [rows, 1], [rows, n]
        self.keys[rows, :, cols] = key_states.transpose(1, 2)  # indexed view: [rows, n, kv_heads, dim]
        self.values[rows, :, cols] = value_states.transpose(1, 2)
        count, width = self.owner.window
        return self.keys[:count, :, :width], self.values[:count, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.window[1], 0

    def get_seq_length(self) -> int:
        return self.owner.window[1]

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """See the module docstring. `lengths[slot]`: positions cached for the slot's sequence."""

    def __init__(self, config: PretrainedConfig, slots: int = 1, capacity: int = 64, static: bool = False):
        layers = config.get_text_config().num_hidden_layers
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])
        self.static, self.slots, self.capacity = static, slots, capacity
        self.lengths = [0] * slots
        self._free = set(range(slots))
        self.write_at: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))
        self.window = (0, 0)  # rows and width of the current forward

    @property
    def rows(self) -> int:
        """Rows a forward runs: up to the last slot in use (all slots when static)."""
        if self.static:
            return self.slots
        return max((s + 1 for s in range(self.slots) if s not in self._free), default=0)

    def acquire(self) -> int:
        if not self._free:
            if self.static:
                raise CacheFullError(f"all {self.slots} slots of the static cache are in use")
            self._free.add(self.slots)
            self.slots += 1
            self.lengths.append(0)
        slot = min(self._free)
        self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.add(slot)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, when dynamic)."""
        if length <= self.capacity:
            return
        if self.static:
            raise CacheFullError(f"{length} positions do not fit the static cache's {self.capacity}")
        while self.capacity < length:
            self.capacity *= 2

    def prepare(self, new: int, device: torch.device) -> torch.Tensor:
        """Set up a forward of `new` tokens per row over rows [0, rows); returns their lengths [rows]."""
        rows = self.rows
        lengths = torch.tensor(self.lengths[:rows], device=device)  # [rows]
        self.reserve(max(self.lengths[:rows], default=0) + new)
        width = self.capacity if self.static else max(self.lengths[:rows]) + new
        self.write_at = (
            torch.arange(rows, device=device).unsqueeze(1),  # [rows, 1]
            lengths.unsqueeze(1) + torch.arange(new, device=device),  # [rows, new]
        )
        self.window = (rows, width)
        return lengths

    def fill(self, slot: int, source: DynamicCache) -> None:
        """Copy a batch-1 DynamicCache (a prompt's prefill) into `slot`; its length becomes the source's."""
        length = source.get_seq_length()
        self.reserve(length)
        for layer, filled in zip(self.layers, source.layers, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(filled.keys, filled.values)
            layer.fit()
            layer.keys[slot, :, :length] = filled.keys[0]
            layer.values[slot, :, :length] = filled.values[0]
        self.lengths[slot] = length

    def keep(self, slot: int, start: int, columns: list[int]) -> None:
        """Move the cached positions `columns` (ascending, each >= start) to start, start + 1, ...
        and cut the slot there: a tree verification keeps its accepted path."""
        picked = torch.tensor(columns, dtype=torch.long, device=self.layers[0].keys.device)
        for layer in self.layers:
            layer.keys[slot, :, start : start + len(columns)] = layer.keys[slot, :, picked]
            layer.values[slot, :, start : start + len(columns)] = layer.values[slot, :, picked]
        self.lengths[slot] = start + len(columns)


def slot_attention(
    lengths: torch.Tensor,
    visible: torch.Tensor,
    width: int,
    dtype: torch.dtype,
    depths: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Additive mask [rows, 1, n, width] for n new tokens per row written at each row's length.

    lengths [rows]: cached positions per row. visible [rows, n, n]: whether new token t may see
    new token s (a chain: s <= t; a tree: s is t or an ancestor). Query t of row r sees columns
    below lengths[r] and columns lengths[r] + s where visible[r, t, s]. With a sliding `window`
    (a sliding-attention layer), it sees only keys fewer than `window` positions before its own:
    column c < lengths[r] holds position c, new token s position lengths[r] + depths[r, s]
    (depths [rows, n]: its depth in the tree; None, a chain: s).
    """
    n = visible.shape[-1]
    columns = torch.arange(width, device=lengths.device)
    relative = columns - lengths.unsqueeze(1)  # [rows, width]
    new = (relative >= 0) & (relative < n)
    index = relative.clamp(0, n - 1)  # [rows, width]: the new token a column holds, if any
    seen = visible.gather(2, index.unsqueeze(1).expand(-1, n, -1))  # [rows, n, width]
    allowed = (relative < 0).unsqueeze(1) | (new.unsqueeze(1) & seen)
    if window is not None:
        if depths is None:
            depths = torch.arange(n, device=lengths.device).expand(lengths.shape[0], n)
        keys = torch.where(
            relative < 0, columns, lengths.unsqueeze(1) + depths.gather(1, index)
        )  # [rows, width]
        queries = lengths.unsqueeze(1) + depths  # [rows, n]
        allowed &= queries.unsqueeze(2) - keys.unsqueeze(1) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=lengths.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
