"""What every local backend shares: one loaded model, slots on it, and the session's slot.

A backend plugin subclasses :class:`LocalBackend`, loads its model in ``__init__`` and
implements :meth:`LocalBackend.make_slot`; the :class:`chat.backend.Backend` protocol the
session uses is answered by slot 0. A server takes more slots with :meth:`new_slot`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from chat.backend import Finish, Message

if TYPE_CHECKING:
    from chat.generation import LocalSlot, SlotStats
    from chat.persona import Persona
    from chat.sampling import SamplerSettings
    from chat.template import ChatTemplate


class PromptCache:
    """The last few rendered-and-tokenized prompts, keyed by (template, messages)."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._items: OrderedDict[tuple, list[int]] = OrderedDict()
        self._lock = threading.Lock()  # slots in several threads share one model's cache

    def get(self, template: "ChatTemplate", messages: Sequence[Message], compute: Callable[[], list[int]]) -> list[int]:
        key = (template, *messages)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                return list(cached)
        tokens = compute()
        with self._lock:
            self._items[key] = tokens
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return list(tokens)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class LocalBackend(ABC):
    """A model loaded once in this process, and the slots generating on it."""

    name: ClassVar[str]
    model: Any
    model_name: str

    def __init__(self) -> None:
        self.slots: list["LocalSlot"] = []

    @abstractmethod
    def make_slot(self) -> "LocalSlot":
        """A new generation state on the loaded model."""

    def new_slot(self) -> "LocalSlot":
        """Another independent generation state on the loaded model (own parts, memory and sampler)."""
        slot = self.make_slot()
        self.slots.append(slot)
        return slot

    @property
    def slot(self) -> "LocalSlot":
        """The session's slot (the first)."""
        return self.slots[0]

    # --- the Backend protocol, answered by the session's slot ---------------------------

    def apply(self, persona: "Persona") -> list[str]:
        return self.slot.apply(persona)  # type: ignore[attr-defined]

    def stream(self, messages: Sequence[Message], sampling: "SamplerSettings") -> Iterator[str | Finish]:
        return self.slot.stream(messages, sampling)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return self.slot.count_tokens(messages)

    def render(self, messages: Sequence[Message]) -> str:
        return self.slot.render(messages)

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self.slot.prompt_tokens(messages)

    def active_parts(self) -> list[str]:
        return self.slot.active_parts()  # type: ignore[attr-defined]

    @property
    def context_size(self) -> int:
        return self.slot.context_size

    @property
    def template(self) -> "ChatTemplate":
        return self.slot.template

    @property
    def persona_name(self) -> str:
        return str(getattr(self.slot, "persona_name", ""))

    @property
    def stats(self) -> "SlotStats":
        return self.slot.stats

    @property
    def kv_tokens(self) -> list[int]:
        return self.slot.kv_tokens

    @property
    def last_token_ids(self) -> tuple[int, ...]:
        return self.slot.last_token_ids

    @property
    def n_vocab(self) -> int:
        return int(self.model.n_vocab)

    def info(self) -> dict[str, object]:
        return {"backend": self.name, **self.model.info(), **self.slot.info(), "slots": len(self.slots)}  # type: ignore[attr-defined]

    # --- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every slot, then the model; safe to call twice."""
        for slot in self.__dict__.get("slots", []):
            slot.close()  # type: ignore[attr-defined]
        model = self.__dict__.get("model")
        if model is not None:
            model.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
