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
        if _debug or os.environ.get("CHAT_DEBUG"):
            raise
        error_line(exc)
        raise typer.Exit(exc.exit_code) from None


def error_line(exc: ChatError) -> None:
    from chat.render import make_console

    console = make_console(stderr=True)
    text = f"error: {exc.message}"
    if exc.hint:
        text += f" — {exc.hint}"
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

    def open_store(self):
        from chat.store import Store

        return Store(self.paths.history_db)


def echo(text: str = "", err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()
