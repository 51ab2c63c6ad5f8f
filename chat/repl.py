"""The interactive REPL (prompt_toolkit): streaming answers, slash commands, completion, input history."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prompt_toolkit.completion import Completer, Completion

from chat.errors import ChatError
from chat.escapes import make_visible
from chat.render import Renderer
from chat.signals import Terminated

BUILTIN_COMMANDS: dict[str, str] = {
    "help": "show this help",
    "persona": "/persona NAME or a mix teacher:0.7,pirate:0.3 — switch persona (the model stays loaded)",
    "set": "/set KEY VALUE — change a sampler setting (`/set KEY default` to unset)",
    "system": (
        "/system TEXT — replace the system prompt (`/system` alone shows it, `/system default` restores the persona's)"
    ),
    "greeting": "/greeting N — show the persona's greeting N (1 = its first); /greeting alone lists them",
    "retry": "answer the last message again",
    "undo": "remove the last exchange",
    "clear": "start a new conversation (same model and persona)",
    "info": "model, persona, sampler settings, context used / size",
    "adapters": "active adapters, control vectors and soft prompts, with their effective scales",
    "prompt": "/prompt [TEXT] — show the exact prompt the next turn sends (with TEXT as your message) and its tokens",
    "stats": "one line of stats after each answer (tokens, tokens/s, first token, cached); /stats again turns it off",
    "save": "/save [FILE.md|FILE.json|FILE.txt] — write the conversation to a file (it is always kept in history)",
    "exit": "leave (Ctrl-D also works)",
}


RECAP_EXCHANGES = 3  # `chat -c` shows this many last exchanges before the prompt
RECAP_CHARS = 400


class Repl:
    """The interactive loop over one session; slash commands from plugins get this object and an argument."""

    def __init__(
        self,
        session,
        *,
        input_history: Path | None = None,
        verbose: bool = False,
        markdown: bool = False,
        debug: bool = False,
    ) -> None:
        """``input_history``: the file that keeps typed lines across runs (None keeps them in memory);
        ``debug``: a failing command shows its traceback instead of one red line."""
        self.session = session
        self.input_history = input_history
        self.renderer = Renderer(markdown=markdown)
        self.verbose = verbose
        self.debug = debug
        self.running = True
        self.exit_code = 0
        self.greeting_number = 1  # which greeting opens a new conversation (--greeting N)
        from chat.plugins import get_registry

        self.plugin_commands: dict[str, tuple[Callable, str, str]] = get_registry().commands

    # --- output helpers available to plugin commands ----------------------------------

    def print(self, text: str = "") -> None:
        sys.stdout.write(make_visible(text) + "\n")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        self.renderer.note(text)

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        prompt = self._make_prompt()
        self._flush_notes()
        greeting = self._greeting(self.greeting_number)
        who = self.session.persona.label
        self.renderer.dim(f"chat · {self.session.model_label} · persona {who} · /help for commands, Ctrl-D to quit")
        if self.session.turns:
            self._recap()
        elif greeting:
            self.print(greeting)
        while self.running:
            toolbar = self._toolbar_text()
            try:
                text = prompt.prompt(self._prompt_text(), bottom_toolbar=lambda shown=toolbar: shown)
            except Terminated as exc:
                return exc.exit_code
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            text = text.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    self._command(text)
                else:
                    self._answer(self.session.send(text))
            except ChatError as exc:
                self.renderer.err_console.print(make_visible(f"error: {exc}"), style="bold red", markup=False)
            except Exception as exc:  # a plugin command, a file write or a backend's bug: report it, keep the session
                if self.debug:
                    raise
                text = make_visible(f"error: {exc.__class__.__name__}: {exc}")
                self.renderer.err_console.print(text, style="bold red", markup=False)
            self._flush_notes()
        return self.exit_code

    def _prompt_text(self) -> str:
        """The input line is the user's: ``you ›`` (the persona and model live in the toolbar)."""
        return "you › "

    def _toolbar_text(self) -> str:
        s = self.session
        try:
            used = s.context_used()
        except ChatError:
            used = 0
        context = f"context {used}/{s.backend.context_size} tokens"
        return make_visible(f" {s.model_label} · persona {s.persona.label} · {context} ")

    def _recap(self) -> None:
        """``chat -c``: the last few exchanges, so the user sees where the conversation stands."""
        turns = self.session.turns[-2 * RECAP_EXCHANGES :]
        earlier = len(self.session.turns) - len(turns)
        if earlier:
            self.renderer.dim(f"… {earlier} earlier message(s)")
        for m in turns:
            text = m.content if len(m.content) <= RECAP_CHARS else m.content[:RECAP_CHARS] + " …"
            self.renderer.dim(("you › " if m.role == "user" else "") + text)

    def _answer(self, chunks) -> None:
        with _typeahead_not_echoed():
            try:
                self.renderer.stream(chunks)
            except Terminated as exc:
                chunks.close()
                self.renderer.note("[stopped by a signal — the partial answer is kept]")
                self.running = False
                self.exit_code = exc.exit_code
                return
            except KeyboardInterrupt:
                chunks.close()
                self.renderer.note("[interrupted — the partial answer is kept]")
                return
            finally:
                chunks.close()
        finish = self.session.last.finish
        if finish.reason == "length":
            self.renderer.note("[stopped: max tokens or context limit reached]")
        if self.verbose:
            self.renderer.stats(finish)

    def _flush_notes(self) -> None:
        for note in self.session.notes:
            self.renderer.note(note)
        self.session.notes.clear()

    # --- commands ---------------------------------------------------------------------

    def _command(self, text: str) -> None:
        name, _, arg = text[1:].partition(" ")
        name, arg = name.strip().lower(), arg.strip()
        if name in ("exit", "quit", "q"):
            self.running = False
            return
        handler = getattr(self, f"cmd_{name}", None)
        if handler is not None:
            handler(arg)
            return
        if name in self.plugin_commands:
            fn, _, _ = self.plugin_commands[name]
            fn(self, arg)
            return
        import difflib

        names = list(BUILTIN_COMMANDS) + list(self.plugin_commands)
        close = difflib.get_close_matches(name, names, n=1)
        tip = f"did you mean /{close[0]}? " if close else ""
        raise ChatError(f"unknown command /{name}", f"{tip}/help lists commands")

    def cmd_help(self, arg: str) -> None:
        for name, help_ in BUILTIN_COMMANDS.items():
            self.print(f"/{name:<9} {help_}")
        for name, (_, help_, plugin) in sorted(self.plugin_commands.items()):
            self.print(f"/{name:<9} {help_}  [{plugin}]")
        self.print("Enter sends; Esc then Enter (or Alt-Enter) adds a new line; Ctrl-C stops an answer; Ctrl-D quits.")

    def cmd_persona(self, arg: str) -> None:
        if not arg:
            self.print(f"persona: {self.session.persona.label}")
            return
        import time

        started = time.perf_counter()
        persona = self.session.switch_persona(arg)
        ms = (time.perf_counter() - started) * 1000
        self.renderer.dim(f"persona → {persona.label} ({ms:.1f} ms; model not reloaded)")
        if persona.greeting:
            self.print(self._greeting(1))

    def _greeting(self, number: int) -> str:
        from chat.prompt import greeting_text

        return greeting_text(self.session.persona, number, user_name=getattr(self.session, "user_name", "User"))

    def cmd_greeting(self, arg: str) -> None:
        greetings = self.session.persona.all_greetings
        if not greetings:
            raise ChatError(f"{self.session.persona.label} has no greeting")
        if not arg:
            for i in range(1, len(greetings) + 1):
                self.print(f"{i}. {self._greeting(i).splitlines()[0][:100]}")
            return
        if not arg.isdigit() or not 1 <= int(arg) <= len(greetings):
            raise ChatError(f"/greeting {arg}: no such greeting", f"choose 1 to {len(greetings)}")
        self.print(self._greeting(int(arg)))

    def cmd_set(self, arg: str) -> None:
        if not arg:
            raise ChatError("/set needs KEY VALUE", "e.g. /set temperature 0.2")
        from chat.sampling import split_option

        key, value = split_option(arg)
        if key.startswith(("adapter.", "steering.")):
            setter = getattr(self.session, "set_part_scale", None)
            if setter is None:
                raise ChatError(f"{key}: not supported here")
            setter(key, value)
            return
        self.session.set_option(arg)
        shown = self.session.sampling.model_dump().get(key, value)
        self.renderer.dim(f"{key} = {shown}")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.print(self.session.system_prompt or "(no system prompt)")
            return
        self.session.set_system(None if arg == "default" else arg)
        self.renderer.dim("system prompt updated")

    def cmd_retry(self, arg: str) -> None:
        self._answer(self.session.regenerate())

    def cmd_undo(self, arg: str) -> None:
        n = self.session.undo()
        self.renderer.dim(f"removed {n} message(s)")

    def cmd_clear(self, arg: str) -> None:
        self.session.clear()
        self.renderer.dim("new conversation")

    def cmd_info(self, arg: str) -> None:
        s = self.session
        info = s.backend.info()
        self.print(f"model:    {s.model_label}  ({info.get('path') or info.get('model') or ''})")
        self.print(f"backend:  {s.backend.name}")
        self.print(f"persona:  {s.persona.label}  [{s.persona.source}]")
        self.print(f"context:  {s.context_used()} / {s.backend.context_size} tokens")
        self.print(f"conversation: {s.conversation_id or '(not saved yet)'}")
        changed = s.sampling.model_dump(exclude_defaults=True)
        shown = ", ".join(f"{k}={v} ({s.sampling_sources.get(k, 'default')})" for k, v in changed.items())
        self.print("sampling: " + (shown or "defaults"))
        self.print(f"stages:   {', '.join(s.sampling.active_stages())}")
        prompt = getattr(s, "last_prompt", None)
        for line in prompt.knowledge_lines() if prompt is not None else []:  # what fired last turn, and why
            self.print(f"knowledge: {line}")
        for key in ("architecture", "parameters", "template", "gpu_layers", "threads"):
            if key in info:
                self.print(f"{key + ':':<9} {info[key]}")
        soft = info.get("soft_prompt")
        for line in soft if isinstance(soft, list) else []:
            self.print(line)

    def cmd_adapters(self, arg: str) -> None:
        from chat.partsinfo import describe_parts

        lines = describe_parts(self.session.persona)
        active = getattr(self.session.backend, "active_parts", None)
        if active is not None:
            lines = active()
        self.print("\n".join(lines) if lines else "no adapters, control vectors or soft prompts are active")

    def cmd_prompt(self, arg: str) -> None:
        rendered, n_tokens = self.session.preview(arg or None)
        self.print(rendered)
        self.renderer.dim(f"[{n_tokens} tokens · template {self.session.backend.info().get('template', '?')}]")

    def cmd_stats(self, arg: str) -> None:
        self.verbose = not self.verbose
        if self.verbose and self.session.turns:
            self.renderer.stats(self.session.last.finish)
        self.renderer.dim(f"stats after each answer: {'on' if self.verbose else 'off'}")

    def cmd_save(self, arg: str) -> None:
        s = self.session
        path = Path(arg or f"chat-{s.conversation_id or 'conversation'}.md").expanduser()
        if not path.parent.is_dir():
            raise ChatError(
                f"/save {arg}: the folder {path.parent} does not exist", "create it first, or save elsewhere"
            )
        try:
            self._write_conversation(path)
        except OSError as exc:
            raise ChatError(f"/save {path}: {exc.strerror or exc}", "choose a file you can write") from None
        self.renderer.dim(f"saved {path}")

    def _write_conversation(self, path: Path) -> None:
        s = self.session
        if path.suffix == ".json":
            data = {
                "model": s.model_label,
                "persona": s.persona.label,
                "system": s.system_prompt,
                "messages": [{"role": m.role, "content": m.content} for m in s.turns],
            }
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        elif path.suffix == ".txt":
            blocks = [f"{'You' if t.role == 'user' else t.persona or 'Assistant'}: {t.content}" for t in s.turns]
            path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        else:
            lines = [f"# Conversation with {s.model_label}", ""]
            for t in s.turns:
                head = "You" if t.role == "user" else f"Assistant ({t.persona})"
                lines += [f"## {head}", "", t.content, ""]
            path.write_text("\n".join(lines), encoding="utf-8")

    # --- prompt_toolkit -----------------------------------------------------------------

    def _make_prompt(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event: Any) -> None:
            event.current_buffer.insert_text("\n")

        class KeptWhenPossible(FileHistory):
            """Input history in a file; a file it cannot read or write (read-only data dir) leaves it in memory."""

            def load_history_strings(self) -> Any:
                try:
                    yield from super().load_history_strings()
                except OSError:
                    return

            def store_string(self, string: str) -> None:
                try:
                    super().store_string(string)
                except OSError:
                    pass

        history: Any = InMemoryHistory()
        if self.input_history is not None:
            try:
                self.input_history.parent.mkdir(parents=True, exist_ok=True)
                history = KeptWhenPossible(str(self.input_history))
            except OSError:
                pass
        return PromptSession(
            history=history,
            completer=SlashCompleter(self),
            key_bindings=bindings,
            complete_while_typing=False,
            enable_history_search=False,
        )


class SlashCompleter(Completer):
    """Completes /commands, persona names after /persona, and setting names after /set."""

    def __init__(self, repl: Repl) -> None:
        self.repl = repl

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            names = list(BUILTIN_COMMANDS) + list(self.repl.plugin_commands)
            for name in names:
                if name.startswith(text[1:]):
                    yield Completion("/" + name, start_position=-len(text))
            return
        command, _, arg = text.partition(" ")
        word = arg.split(",")[-1] if command == "/persona" else arg
        if command == "/persona" and ":" in word:
            return  # typing a weight: nothing to complete
        if command == "/persona":
            choices = self.repl.session.catalog.names() if self.repl.session.catalog else []
        elif command == "/set" and " " not in arg:
            from chat.sampling import FIELD_NAMES

            choices = list(FIELD_NAMES)
        else:
            return
        for choice in choices:
            if choice.startswith(word):
                yield Completion(choice, start_position=-len(word))


@contextlib.contextmanager
def _typeahead_not_echoed() -> Iterator[None]:
    """While an answer streams, keys the user types are not echoed into it: they wait for the next prompt.

    The terminal is put in cbreak mode without echo (signals still work, so Ctrl-C
    interrupts); the typed bytes stay queued and prompt_toolkit reads them next.
    """
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            raise OSError
        import termios

        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, AttributeError, ImportError):
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
