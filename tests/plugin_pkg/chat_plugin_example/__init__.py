"""An example third-party plugin: adds the `pirate` persona and a `/shout` REPL command."""

from pathlib import Path

from chat.hookspecs import hookimpl


@hookimpl
def register_personas(register):
    register(Path(__file__).parent / "pirate")


def shout(repl, argument):
    """Repeat the last answer (or the argument) in capitals."""
    text = argument or next((m.content for m in reversed(repl.session.turns) if m.role == "assistant"), "")
    repl.print(text.upper() + "!")


@hookimpl
def register_commands(register):
    register("shout", shout, help="repeat the last answer in capitals")
