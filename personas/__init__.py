"""The built-in persona cards, registered through the same hook as any plugin's."""

from pathlib import Path

from chat.hookspecs import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_personas(register):
    for card in sorted(HERE.glob("*/persona.toml")):
        register(card.parent)
