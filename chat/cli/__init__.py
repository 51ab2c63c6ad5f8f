"""The command line: ``chat [OPTIONS] [PROMPT]`` plus command groups.

A bare ``chat`` (or ``chat "question"``) runs the default command; words that
name a command group (``personas``, ``models``, ``history`` …) run that group.
Each group lives in its own module and imports its heavy parts inside the
command, so ``chat --help`` stays instant.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

DEFAULT_COMMAND = "talk"


class DefaultGroup(TyperGroup):
    """A group whose unknown first word starts the default command (llm's pattern)."""

    def parse_args(self, ctx, args):  # type: ignore[override]
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            if args:
                self._refuse_near_miss(args[0])
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def _refuse_near_miss(self, word: str) -> None:
        """``chat histroy list`` is a typo, not a prompt: refuse it (``chat -- histroy`` sends it as a prompt)."""
        import difflib

        if not word.isalpha() or len(word) < 4:
            return
        names = [n for n, c in self.commands.items() if not c.hidden]
        close = difflib.get_close_matches(word.lower(), names, n=1, cutoff=0.75)
        if close:
            from chat.cli.common import error_line
            from chat.errors import UsageError

            error_line(
                UsageError(
                    f"{word!r} is not a command — did you mean `chat {close[0]}`?",
                    f"to send it as a prompt, write `chat -- {word} …`",
                )
            )
            raise typer.Exit(2)

    def format_help(self, ctx, formatter):  # type: ignore[override]
        default = self.commands[DEFAULT_COMMAND]
        formatter.write_usage("chat", "[OPTIONS] [PROMPT]...\n       chat COMMAND [ARGS]...")
        formatter.write_paragraph()
        formatter.write_text(default.help or "")
        with ctx.scope(cleanup=False):
            sub = typer.Context(default, info_name="chat", parent=None)
            default.format_options(sub, formatter)
        rows = [(n, c.get_short_help_str(60)) for n, c in sorted(self.commands.items()) if not c.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=DefaultGroup,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from chat.cli import convert, history, main, models, personas, plugins, serve

    main.register(app)
    convert.register(app)
    personas.register(app)
    models.register(app)
    history.register(app)
    plugins.register(app)
    serve.register(app)
    from chat.cli import remote

    remote.register(models.models_app, personas.personas_app)  # models served, personas serve-args


_register()


def _refuse_undecodable_arguments() -> None:
    """Bytes that are not UTF-8 in argv (Python keeps them as lone surrogates) are one clear line, exit 2."""
    for i, arg in enumerate(sys.argv[1:], 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            from chat.cli.common import error_line
            from chat.errors import UsageError

            bad = arg.encode("utf-8", "surrogateescape")[exc.start : exc.start + 1]
            error_line(
                UsageError(
                    f"argument {i} is not UTF-8 text (byte {bad!r} at {exc.start})",
                    "pass arguments in UTF-8; convert files with iconv",
                )
            )
            sys.exit(2)


def _quiet_library_warnings() -> None:
    """numpy's and the model libraries' Python warnings are for developers: not on the user's stderr."""
    import os
    import warnings

    if not os.environ.get("CHAT_DEBUG") and "--debug" not in sys.argv:
        warnings.simplefilter("ignore")


def run() -> None:
    """Console-script entry point."""
    _refuse_undecodable_arguments()
    _quiet_library_warnings()
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)
