"""Slots for requests: a bounded wait queue, and generation in a worker thread per request.

The slots are independent generation states on one loaded model (``backend.new_slot()``).
A request takes a free slot, or waits in line; beyond ``queue`` waiting requests it is refused
(503). Generation blocks (llama.cpp or torch), so each request runs its slot's stream in a
thread and hands chunks to the event loop through an asyncio queue. Cancelling (the client
went away) sets a flag the thread checks before every token; it then closes the stream, which
leaves the slot's memory consistent, and the slot goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from chat.backend import Finish
from chat.serve.api import APIError

DONE = object()


class SlotPool:
    """Free slots and the requests waiting for one (all on the event loop's thread)."""

    def __init__(self, slots: list[Any], queue: int) -> None:
        self.slots = list(slots)
        self._free = list(slots)
        self._waiting: deque[asyncio.Future] = deque()
        self.queue = queue
        self.live: set[Generation] = set()  # generations whose thread may still use a slot

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    async def acquire(self, persona: str | None = None) -> Any:
        """A free slot — the last one that served ``persona`` if free (its memory holds that persona's
        prefix), else the most recently used one — or wait in line for one."""
        if self._free:
            for i in range(len(self._free) - 1, -1, -1):
                if persona is not None and getattr(self._free[i], "persona_name", None) == persona:
                    return self._free.pop(i)
            return self._free.pop()
        if len(self._waiting) >= self.queue:
            raise APIError(
                503,
                f"all {len(self.slots)} slots are busy and {self.queue} requests wait",
                "server_busy",
                None,
                "server_busy",
            )
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # handed a slot just as the client left
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    self._waiting.remove(future)
            raise

    def start(self, slot: Any, start: Callable[[Any, Callable[[], bool]], Iterator[str | Finish]]) -> "Generation":
        """Run ``start(slot, cancelled)`` in a worker thread; the slot comes back when the thread is done."""

        def done() -> None:
            self.live.discard(generation)
            self.release(slot)

        generation = Generation(lambda: start(slot, generation.cancel.is_set), done)
        self.live.add(generation)
        generation.begin()
        return generation

    def stop_all(self, timeout: float = 30.0) -> bool:
        """Cancel every generation and wait for its thread (before the model is freed); False if one hangs on."""
        for generation in list(self.live):
            generation.cancel.set()
        deadline = time.monotonic() + timeout
        for generation in list(self.live):
            generation.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(g.thread.is_alive() for g in self.live)

    def release(self, slot: Any) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(slot)
                return
        self._free.append(slot)


class Generation:
    """One request's stream running in a worker thread; iterate it on the event loop."""

    def __init__(self, start: Callable[[], Iterator[str | Finish]], on_done: Callable[[], None]) -> None:
        self._start = start
        self._on_done = on_done  # on the event loop, once the thread is done with the slot
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="chat-generation")
        self.finished = asyncio.Event()

    def begin(self) -> None:
        self.thread.start()

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self) -> None:
        try:
            stream = self._start()  # apply the persona, tokenize, check: errors arrive before any chunk
            try:
                for item in stream:
                    if self.cancel.is_set():
                        break
                    self._put(item)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the request, which answers with an error object
            self._put(exc)
        finally:
            self._put(DONE)
            self._loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        self.finished.set()
        self._on_done()

    async def items(self) -> AsyncIterator[str | Finish]:
        """Chunks, then the Finish; an exception from the thread is raised here."""
        while True:
            item = await self._queue.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
