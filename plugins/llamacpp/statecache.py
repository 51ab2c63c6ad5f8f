"""Saved KV states of one sequence, keyed by the parameter set they were computed under.

A state saved with ``llama_state_seq_get_data`` holds keys and values only: nothing
in it says which LoRA adapters or control vectors produced them. The key therefore
is the active parameter set, and one entry per set is kept: the memory as it was
when the backend last switched away from that set (its persona's fixed prefix —
system prompt and examples — and whatever of the conversation followed). Entries
are evicted least recently used first once their bytes exceed the budget.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class SavedState:
    tokens: tuple[int, ...]  # the tokens whose keys/values the state holds, in position order
    data: ctypes.Array  # what llama_state_seq_get_data wrote

    @property
    def n_bytes(self) -> int:
        return ctypes.sizeof(self.data)


class StateCache:
    """An LRU of :class:`SavedState` by parameter-set key, within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[tuple, SavedState] = OrderedDict()
        self.n_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def fits(self, n_bytes: int) -> bool:
        return 0 < n_bytes <= self.budget

    def put(self, key: tuple, state: SavedState) -> bool:
        """Keep ``state`` for ``key`` (replacing the older one); False if it alone exceeds the budget."""
        self.discard(key)
        if not self.fits(state.n_bytes):
            return False
        self._entries[key] = state
        self.n_bytes += state.n_bytes
        while self.n_bytes > self.budget and self._entries:
            _, old = self._entries.popitem(last=False)
            self.n_bytes -= old.n_bytes
            self.evictions += 1
        return True

    def get(self, key: tuple) -> SavedState | None:
        state = self._entries.get(key)
        if state is not None:
            self._entries.move_to_end(key)
        return state

    def discard(self, key: tuple) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.n_bytes -= old.n_bytes

    def clear(self) -> None:
        self._entries.clear()
        self.n_bytes = 0
