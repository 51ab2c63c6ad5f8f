"""Chat templates: the model's own Jinja template, a well-known one, or one the user names.

The template in ``tokenizer.chat_template`` is rendered the way Hugging Face
renders it (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``bos_token``/``eos_token``, ``add_generation_prompt``). A template never runs
outside the sandbox: it comes from a downloaded file. A file without a template gets
one from the table in ``templates.toml``, chosen by what the file says (its special
tokens, then its architecture); :func:`choose_template` returns it with the reason,
which ``/info`` and ``chat models show`` print. Every template carries its family's
end-of-turn markers (:attr:`ChatTemplate.stops`): backends end the answer on them, so no
marker is ever printed or saved. Templates that refuse a system message, or silently
drop it, get the system text merged into the first user turn.
"""

from __future__ import annotations

import contextvars
import json
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from chat.backend import Message
from chat.errors import ModelError

MAX_TEMPLATE_FILE = 1 << 20  # a --template FILE larger than this is not a chat template
FALLBACK = "chatml"


@dataclass(frozen=True)
class KnownTemplate:
    """One entry of ``templates.toml``."""

    name: str
    description: str
    source: str
    markers: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    stops: tuple[str, ...] = ()


@cache
def known_templates() -> dict[str, KnownTemplate]:
    """The table of well-known templates shipped with chat, in detection order."""
    data = tomllib.loads(files("chat").joinpath("templates.toml").read_text(encoding="utf-8"))
    return {
        name: KnownTemplate(
            name,
            entry.get("description", ""),
            entry["source"],
            tuple(entry.get("markers", ())),
            tuple(entry.get("architectures", ())),
            tuple(entry.get("stops", ())),
        )
        for name, entry in data.items()
    }


def family_of(source: str) -> KnownTemplate | None:
    """The well-known family a template's text belongs to (by the first marker it uses)."""
    for known in known_templates().values():
        if known.markers and known.markers[0] in source:
            return known
    return None


def detect_template(has_token: Callable[[str], bool], architecture: str) -> tuple[KnownTemplate, str]:
    """For a model without a template: the family whose markers are all single tokens, else by architecture."""
    table = known_templates()
    for known in table.values():
        if known.markers and all(has_token(m) for m in known.markers):
            return known, f"chosen from the vocabulary: {' '.join(known.markers)} are tokens"
    for known in table.values():
        if architecture in known.architectures:
            return known, f"chosen from the architecture {architecture!r}"
    return table[FALLBACK], "the last resort: nothing in the file points to a family"


def choose_template(
    file_source: str | None,
    *,
    override: str | None = None,
    override_from: str = "--template",
    has_token: Callable[[str], bool] = lambda _: False,
    architecture: str = "",
    bos_token: str = "",
    eos_token: str = "",
    model: str = "",
) -> "ChatTemplate":
    """The template to use and why: the user's choice, else the file's own, else a well-known one.

    ``override`` is a name from the table or a path to a Jinja file (``override_from`` says
    who asked for it: a flag, the config or a card). ``has_token(text)`` tells whether
    ``text`` is a single token of the model's vocabulary.
    """
    kw: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token, "model": model}
    if override:
        table = known_templates()
        if override in table:
            known = table[override]
            return ChatTemplate(
                known.source, name=known.name, reason=f"set by {override_from}", stops=known.stops, **kw
            )
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelError(
                f"{override_from} {override!r}: neither a known template nor a file",
                f"known templates: {', '.join(table)}; or give the path of a Jinja file",
            )
        if path.stat().st_size > MAX_TEMPLATE_FILE:
            raise ModelError(
                f"{override_from} {override}: larger than {MAX_TEMPLATE_FILE >> 20} MiB", "that is not a chat template"
            )
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{override_from} {override}: cannot read it ({exc})", "give a UTF-8 Jinja file") from None
        family = family_of(source)
        template = ChatTemplate(
            source,
            name=family.name if family else path.name,
            reason=f"the file {path}, set by {override_from}",
            stops=family.stops if family else (),
            **kw,
        )
        if template.compile_error:
            raise ModelError(
                f"{override_from} {override}: the template does not compile: {template.compile_error}", "fix the file"
            )
        return template
    if file_source:
        family = family_of(file_source)
        template = ChatTemplate(
            file_source,
            name=family.name if family else "custom",
            reason="the file's own tokenizer.chat_template",
            stops=family.stops if family else (),
            **kw,
        )
        if not template.compile_error:
            return template
        why = f"the file's template does not compile ({template.compile_error}); "
    else:
        why = "the file has no chat template; "
    known, how = detect_template(has_token, architecture)
    return ChatTemplate(known.source, name=known.name, reason=why + how, stops=known.stops, **kw)


_PROBE = "\u2063system-probe\u2063"


class TemplateRenderError(Exception):
    pass


class TemplateBoundError(TemplateRenderError):
    """The template went past a bound (steps, time, size): it is broken or hostile, not merely strict."""


class ChatTemplate:
    """Renders a list of messages into the prompt text the model was trained on."""

    def __init__(
        self,
        source: str,
        *,
        name: str = "custom",
        reason: str = "",
        stops: Sequence[str] = (),
        bos_token: str = "",
        eos_token: str = "",
        model: str = "",
    ) -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._where = model
        self.name = name  # the family: gemma, llama3, chatml, … or "custom"
        self.reason = reason  # why this template is the one in use
        self.stops = tuple(s for s in stops if s)  # end-of-turn markers: they always end an answer
        self.source = source
        self.merge_system = False
        self.compile_error = ""
        try:
            self._template = _environment().from_string(source)
        except Exception as exc:  # a template that does not even compile: the caller falls back, and says so
            self.compile_error = _first_line(exc)
            self._template = _environment().from_string("")
            return
        self.merge_system = not self._keeps_system()

    @property
    def description(self) -> str:
        """``gemma (the file has no chat template; chosen from the vocabulary: …)`` for /info."""
        return f"{self.name} ({self.reason})" if self.reason else self.name

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if self.merge_system:
            msgs = merge_system_into_first_user(msgs)
        try:
            return self._render(msgs, add_generation_prompt)
        except TemplateBoundError as exc:
            raise ModelError(
                f"{self._where}: the chat template failed: {exc}",
                "the template is broken or hostile; use a well-known one instead: --template NAME (see README)",
            ) from None
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
        budget = RenderBudget(max_chars=MAX_RENDER_CHARS + 2 * sum(len(m["content"]) for m in msgs))
        token = _BUDGET.set(budget)
        try:
            out: list[str] = []
            for piece in self._template.generate(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            ):
                budget.output(len(piece))
                out.append(piece)
            return "".join(out)
        except TemplateRenderError:
            raise  # raise_exception() in the template, or a bound it went past
        except RecursionError:
            raise TemplateBoundError("the template recurses too deeply") from None
        except MemoryError:
            raise TemplateBoundError("the template needs too much memory") from None
        except Exception as exc:  # jinja errors, raise_exception(), sandbox violations, the budget
            raise TemplateRenderError(_first_line(exc)) from None
        finally:
            _BUDGET.reset(token)

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


MAX_RENDER_CHARS = 4 << 20  # output beyond the messages' own size (twice over) that a template may write
MAX_RENDER_STEPS = 1_000_000  # loop iterations, calls and operations in one render
MAX_RENDER_S = 2.0  # seconds one render may take
MAX_SIZE = 1 << 20  # the largest number, string or sequence an operation inside a template may produce


class RenderBudget:
    """What one render may spend: steps, seconds and output characters. A template is a stranger's code."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_S

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_RENDER_STEPS:
            raise TemplateBoundError(f"the template takes more than {MAX_RENDER_STEPS:,} steps")
        if time.monotonic() > self.deadline:
            raise TemplateBoundError(f"the template takes longer than {MAX_RENDER_S:g} s to render")

    def output(self, n: int) -> None:
        self.chars += n
        if self.chars > self.max_chars:
            raise TemplateBoundError(f"the template writes more than {self.max_chars:,} characters")
        self.step()


_BUDGET: contextvars.ContextVar[RenderBudget] = contextvars.ContextVar("template_budget")


def _spend(n: int = 1) -> None:
    budget = _BUDGET.get(None)
    if budget is not None:
        budget.step(n)


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 8
    return 0


def _bounded_filter(fn: Any) -> Any:
    """A filter that costs a step, takes no huge number and returns nothing over MAX_SIZE."""
    import functools

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _spend()
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
                raise TemplateBoundError(f"the template passes {value} to a filter")
        result = fn(*args, **kwargs)
        if isinstance(result, (str, list, tuple)) and len(result) > MAX_SIZE:
            raise TemplateBoundError("the template builds a huge value")
        return result

    return bounded


def _environment() -> Any:
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        """``a ~ b`` goes through :meth:`BoundedEnvironment.bounded_concat` (Jinja joins strings directly)."""

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, plus bounds: every call, attribute and operation costs a step; none may build a huge value."""

        intercepted_binops = frozenset(["*", "**", "+", "//", "%"])
        intercepted_unops = frozenset()
        code_generator_class = BoundedCodeGenerator

        def bounded_concat(self, parts: Any) -> str:
            _spend()
            text = "".join(str(p) for p in parts)
            if len(text) > MAX_SIZE:
                raise TemplateBoundError("the template builds a huge value")
            return text

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _spend()
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 1:
                if max(left.bit_length(), 1) * right > 8 * MAX_SIZE:
                    raise TemplateBoundError(f"the template raises a number to the power {right}")
            if operator == "*" and isinstance(right, int) and isinstance(left, int):
                if left.bit_length() + right.bit_length() > 8 * MAX_SIZE:
                    raise TemplateBoundError("the template builds a huge number")
            elif operator == "*" and (
                _size(left) * (right if isinstance(right, int) else 1) > MAX_SIZE
                or _size(right) * (left if isinstance(left, int) else 1) > MAX_SIZE
            ):
                raise TemplateBoundError("the template builds a huge value")
            if operator == "+" and _size(left) + _size(right) > MAX_SIZE:
                raise TemplateBoundError("the template builds a huge value")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _spend()
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
                    raise TemplateBoundError(f"the template calls a function with {value}")
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            _spend()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _spend()
            return super().getitem(obj, argument)

    def bounded_range(*args: int) -> Any:
        if len(range(*args)) > MAX_SIZE:
            raise TemplateBoundError(f"range{args} is too long for a template")
        for i in range(*args):
            _spend()
            yield i

    def raise_exception(message: str) -> None:
        raise TemplateRenderError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["range"] = bounded_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class TemplateSelector:
    """One loaded model's template choice: made once at load, overridden by a card's ``template`` key.

    ``--template`` beats a card (the user asked for it on this very command line); a card
    beats the config entry and the file's own. Choices are cached, so switching personas
    never reads or compiles a template twice.
    """

    def __init__(
        self,
        file_source: str | None,
        *,
        override: str | None,
        override_from: str,
        has_token: Callable[[str], bool],
        architecture: str,
        bos_token: str,
        eos_token: str,
        model: str,
    ) -> None:
        self._kw: dict[str, Any] = {
            "has_token": has_token,
            "architecture": architecture,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "model": model,
        }
        self._pinned = bool(override) and override_from == "--template"
        self.base = choose_template(file_source, override=override, override_from=override_from, **self._kw)
        self._file_source = file_source
        self._by_card: dict[tuple[str, str], ChatTemplate] = {}

    def for_card(self, template: str, card: str) -> ChatTemplate:
        """The template for a persona whose card sets ``template`` ("" = none)."""
        if not template or self._pinned:
            return self.base
        key = (template, card)
        chosen = self._by_card.get(key)
        if chosen is None:
            chosen = choose_template(self._file_source, override=template, override_from=f"card {card}", **self._kw)
            self._by_card[key] = chosen
        return chosen
