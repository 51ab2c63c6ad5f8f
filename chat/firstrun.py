"""The first run: no model configured. Offer a small default instruct model, download it, remember it.

In a terminal the user is asked once; with ``--yes`` the download starts without asking;
in a pipe or with ``--no-input`` nothing is asked and the error says exactly what to run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from chat.config import Paths
from chat.errors import NoModelError

DEFAULT_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
DEFAULT_FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
DEFAULT_ALIAS = Path(DEFAULT_FILE).stem  # the alias `chat models pull … --default` gives it too
DEFAULT_SIZE = "about 400 MB"


def pull_command() -> str:
    return f"chat models pull {DEFAULT_REPO} {DEFAULT_FILE}"


def offer_default_model(paths: Paths, *, assume_yes: bool, no_input: bool, interactive: bool) -> str:
    """Download the default model (asking first when allowed); record it in config.toml; return its alias.

    Raises NoModelError, with the commands to run, when nothing may be asked or the user says no.
    """
    hint = (
        f"run `{pull_command()} --default` to download a small instruct model ({DEFAULT_SIZE}) and make it the "
        f"default, or pass `-m /path/to/model.gguf`"
    )
    if not assume_yes:
        if no_input or not interactive:
            raise NoModelError("no model given and none configured", hint)
        from rich.prompt import Confirm

        from chat.render import make_console

        console = make_console(stderr=True)
        console.print(f"No model is configured. chat can download {DEFAULT_FILE} ({DEFAULT_SIZE}) from {DEFAULT_REPO}.")
        if not Confirm.ask("Download it and make it your default?", default=True, console=console):
            raise NoModelError("no model given and none configured", hint)
    from chat.models import pull

    path = pull(DEFAULT_REPO, DEFAULT_FILE, paths)
    record_default_model(paths, DEFAULT_ALIAS, path)
    print(f"saved {path} as your default model ({DEFAULT_ALIAS} in {paths.config_file})", file=sys.stderr)
    return DEFAULT_ALIAS


def record_default_model(paths: Paths, alias: str, path: Path) -> None:
    """Add ``default_model`` and the alias to config.toml, keeping everything already in it.

    Top-level keys must precede the first table in TOML, so ``default_model`` goes first;
    the alias goes into the ``[models]`` table (created when missing).
    """
    file = paths.config_file
    text = file.read_text(encoding="utf-8") if file.is_file() else ""
    entry = f"{alias} = {_toml_string(str(path))}"
    if re.search(r"(?m)^\[models\]\s*$", text):
        text = re.sub(r"(?m)^\[models\]\s*$", lambda m: m.group(0) + "\n" + entry, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + "[models]\n" + entry + "\n"
    if re.search(r"(?m)^default_model\s*=", text):
        text = re.sub(r"(?m)^default_model\s*=.*$", f"default_model = {_toml_string(alias)}", text, count=1)
    else:
        text = f"default_model = {_toml_string(alias)}\n" + text
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text, encoding="utf-8")


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these characters)."""
    import json

    return json.dumps(value, ensure_ascii=False)
