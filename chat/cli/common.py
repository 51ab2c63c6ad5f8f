"""What every command shares: the error guard, the app context (paths, config, store)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from functools import cached_property

import typer

from chat.errors import ChatError

_debug = False


def set_debug(value: bool) -> None:
    global _debug
    _debug = value or bool(os.environ.get("CHAT_DEBUG"))


def debugging() -> bool:
    return _debug or bool(os.environ.get("CHAT_DEBUG"))


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn ChatError into one red line and its exit code (re-raise under --debug)."""
    try:
        yield
    except ChatError as exc:
        if debugging():
            raise
        error_line(exc)
        raise typer.Exit(exc.exit_code) from None


def error_line(exc: ChatError) -> None:
    from chat.escapes import make_visible
    from chat.render import make_console

    console = make_console(stderr=True)
    text = f"error: {exc.message}"
    if exc.hint:
        text += f" — {exc.hint}"
    text = make_visible(text).replace("\n", " ")  # one line, and nothing from a file acts on the terminal
    console.print(text, style="bold red", markup=False, highlight=False, soft_wrap=True)


class AppContext:
    """Paths, config, catalog and store, created on first use."""

    @cached_property
    def paths(self):
        from chat.config import Paths

        return Paths()

    @cached_property
    def config(self):
        from chat.config import load_config

        return load_config(self.paths)

    @cached_property
    def catalog(self):
        from chat.catalog import PersonaCatalog

        return PersonaCatalog(self.paths.personas_dir)

    def open_store(self, readonly: bool = False):
        from chat.store import Store

        return Store(self.paths.history_db, readonly=readonly)


def echo(text: str = "", err: bool = False) -> None:
    """Print a line; on a terminal, control characters from cards, files and history are made visible."""
    from chat.escapes import make_visible
    from chat.render import is_terminal

    stream = sys.stderr if err else sys.stdout
    stream.write((make_visible(text) if is_terminal(stream) else text) + "\n")
    stream.flush()
