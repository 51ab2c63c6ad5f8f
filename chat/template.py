"""Chat templates: the GGUF's own Jinja template, or a named fallback.

The template in ``tokenizer.chat_template`` is rendered the way Hugging Face
renders it (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``bos_token``/``eos_token``, ``add_generation_prompt``). A template never runs
outside the sandbox: it comes from a downloaded file. Files without a template get
ChatML, and :attr:`ChatTemplate.name` says so. Templates that refuse a system
message, or silently drop it, get the system text merged into the first user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from chat.backend import Message
from chat.errors import ModelError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Marker strings → the family a file's template belongs to (only for /info).
_FAMILIES = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral/llama2"),
    ("<|user|>", "zephyr/phi3"),
    ("<｜User｜>", "deepseek"),
)

_PROBE = "\u2063system-probe\u2063"


class TemplateRenderError(Exception):
    pass


class ChatTemplate:
    """Renders a list of messages into the prompt text the model was trained on."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "", model: str = "") -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._where = model
        self.merge_system = False
        self.from_file = False
        if source:
            try:
                self._template = _environment().from_string(source)
                self.from_file = True
                family = next((name for marker, name in _FAMILIES if marker in source), "custom")
                self.name = f"{family} (the file's tokenizer.chat_template)"
            except Exception as exc:  # a template that does not even compile: fall back, and say so
                self._template = _environment().from_string(CHATML)
                self.name = f"chatml (fallback: the file's template does not compile: {_first_line(exc)})"
        else:
            self._template = _environment().from_string(CHATML)
            self.name = "chatml (fallback: the file has no chat template)"
        self.source = source if self.from_file else CHATML
        if self.from_file:
            self.merge_system = not self._keeps_system()

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if self.merge_system:
            msgs = merge_system_into_first_user(msgs)
        try:
            return self._render(msgs, add_generation_prompt)
        except TemplateRenderError as exc:
            if not self.merge_system and msgs and msgs[0]["role"] == "system":
                try:
                    text = self._render(merge_system_into_first_user(msgs), add_generation_prompt)
                except TemplateRenderError:
                    pass
                else:
                    self.merge_system = True
                    return text
            raise ModelError(
                f"{self._where}: the chat template failed: {exc}",
                "the conversation's roles may not fit this template (e.g. two user turns in a row)",
            ) from None

    def _render(self, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:  # jinja errors, raise_exception(), sandbox violations
            raise TemplateRenderError(_first_line(exc)) from None

    def _keeps_system(self) -> bool:
        """Whether the template renders a system message (some raise, some drop it silently)."""
        probe = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
        try:
            return _PROBE in self._render(probe, True)
        except TemplateRenderError:
            return False


def merge_system_into_first_user(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Fold leading system messages into the first user message (what such templates expect)."""
    system = [m["content"] for m in msgs if m["role"] == "system"]
    rest = [dict(m) for m in msgs if m["role"] != "system"]
    if not system:
        return rest
    text = "\n\n".join(s for s in system if s)
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{text}\n\n{m['content']}" if text else m["content"]
            return rest
    return [{"role": "user", "content": text}] + rest


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRenderError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
