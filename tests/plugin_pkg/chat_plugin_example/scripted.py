"""A scripted backend for CLI and REPL behaviour tests (llm's MockModel pattern).

Model names start with ``scripted``. The answer is ``[persona] echo: <last user
message>`` streamed word by word (``-B echo=WORD`` changes the word: this backend's
own load option); a message containing ``long`` streams "la" until max_tokens or
the context ends. ``CHAT_SCRIPTED_DELAY`` (seconds per
word) slows it down so tests can interrupt it.
"""

from __future__ import annotations

import os
import time

from pydantic import Field

from chat.backend import BackendOptions, Finish, Timings, Usage
from chat.hookspecs import hookimpl


class ScriptedOptions(BackendOptions):
    """A third-party backend's own load option, next to the common ones."""

    echo: str = Field("echo", min_length=1, description="the word between the persona and the message")


class ScriptedBackend:
    name = "scripted"
    Options = ScriptedOptions

    @classmethod
    def can_load(cls, model: str) -> bool:
        return model.startswith("scripted")

    def __init__(self, model: str, options: ScriptedOptions) -> None:
        self.model_name = model
        self.echo = options.echo
        self.context_size = options.context_size or 256
        self.persona = "default"
        self.applied = []

    def apply(self, persona):
        self.persona = persona.label
        self.applied.append(persona.label)
        return [f"{persona.label}: {len(persona.adapters)} adapter(s) ignored by the scripted backend"] if persona.adapters else []

    def _count(self, text: str) -> int:
        return len(text.split())

    def render(self, messages):
        return "".join(f"<{m.role}>{m.content}</{m.role}>\n" for m in messages) + "<assistant>"

    def count_tokens(self, messages):
        return sum(self._count(m.content) + 4 for m in messages) + 2

    def stream(self, messages, sampling):
        delay = float(os.environ.get("CHAT_SCRIPTED_DELAY", "0"))
        start = time.perf_counter()
        prompt_tokens = self.count_tokens(messages)
        last = messages[-1].content
        system = next((m.content for m in messages if m.role == "system"), "")
        if "long" in last:
            words = iter(lambda: "la", None)
        elif "system?" in last:
            words = iter(f"system: {system}".split())
        else:
            words = iter(f"[{self.persona}] {self.echo}: {last}".split())
        limit = min(sampling.max_tokens or 10**9, self.context_size - prompt_tokens)
        n = 0
        first = None
        reason = "stop"
        for word in words:
            if n >= limit:
                reason = "length"
                break
            if delay:
                time.sleep(delay)
            if first is None:
                first = time.perf_counter() - start
            yield (" " if n else "") + word
            n += 1
        elapsed = time.perf_counter() - start
        yield Finish(reason, Usage(prompt_tokens, n), Timings(first or elapsed, n / elapsed if elapsed else 0.0))

    def info(self):
        return {"path": self.model_name, "template": "scripted"}

    def close(self):
        pass


@hookimpl
def register_backends(register):
    register(ScriptedBackend)
