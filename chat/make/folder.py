"""The card folder a make writes: staged beside its final place and renamed into it, whole or not at all.

Everything (``persona.toml``, the vector, the adapter in both formats, ``make.json``, the loss
curve) is written into a hidden staging folder next to the destination; only when all of it
is there does one rename make it the card. A failure — a full disk, Ctrl-C, an error — removes
the staging folder, so no half-written card is ever left where the catalog would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chat.errors import ChatError, ConfigError, UsageError

#: How many of the data's dialogues become the card's ``[[examples]]`` (sent before every conversation).
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class CardParts:
    name: str
    description: str
    system: str
    examples: Sequence[tuple[str, str]]
    adapter: str | None = None  # relative path the card references
    adapter_scale: float = 1.0
    vector: str | None = None
    vector_scale: float = 1.0
    vector_layers: tuple[int, int] | None = None
    other_format: str | None = None  # the same adapter in the other format (a comment in the card)
    soft_prompt: str | None = None
    soft_prompt_other: str | None = None  # the same soft prompt in the other format (a comment in the card)


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also wants DEL escaped."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def card_text(parts: CardParts) -> str:
    """``persona.toml`` with the card keys: system, [[examples]], [[adapters]], [[steering]], [[soft_prompt]]."""
    lines = [f"name = {toml_string(parts.name)}", f"description = {toml_string(parts.description)}"]
    if parts.system:
        lines.append(f"system = {toml_string(parts.system)}")
    for user, assistant in parts.examples:
        lines += ["", "[[examples]]", f"user = {toml_string(user)}", f"assistant = {toml_string(assistant)}"]
    if parts.adapter:
        lines += ["", "[[adapters]]"]
        if parts.other_format:
            lines.append(f"# the same adapter for the other backend: {parts.other_format}")
        lines += [f"path = {toml_string(parts.adapter)}", f"scale = {parts.adapter_scale:g}"]
    if parts.vector:
        lines += ["", "[[steering]]", f"path = {toml_string(parts.vector)}", f"scale = {parts.vector_scale:g}"]
        if parts.vector_layers:
            lines.append(f"layers = [{parts.vector_layers[0]}, {parts.vector_layers[1]}]")
    if parts.soft_prompt:
        lines += ["", "[[soft_prompt]]"]
        if parts.soft_prompt_other:
            lines.append(f"# the same soft prompt in the other format: {parts.soft_prompt_other}")
        lines.append(f"path = {toml_string(parts.soft_prompt)}")
    return "\n".join(lines) + "\n"


def check_destination(dest: Path, force: bool) -> None:
    """Refuse before any work is done: an existing card without --force, a file in the way."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a folder", "pass another -o")
    if (dest / "persona.toml").exists() and not force:
        raise UsageError(f"{dest / 'persona.toml'} already exists", "pass --force to replace the card")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "persona.toml").exists() and not force:
        raise UsageError(f"{dest}: the folder is not empty", "pass another -o, or --force to replace it")


@contextmanager
def staged(dest: Path, force: bool) -> Iterator[Path]:
    """A fresh folder beside ``dest``; renamed to ``dest`` when the block ends without error, else removed."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.making-", dir=dest.parent))
    except OSError as exc:
        raise _unwritable(dest, exc) from None
    try:
        yield stage
        old = None
        if dest.exists():
            check_destination(dest, force)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise _unwritable(dest, exc) from None
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _unwritable(dest: Path, exc: OSError) -> ChatError:
    return ConfigError(
        f"{dest}: cannot write the card ({exc.strerror or exc})",
        "free some disk space or pass a writable -o; nothing was left behind",
    )
