"""Where things live and what the user configured.

Directories come from platformdirs and can be moved with ``CHAT_CONFIG_DIR`` and
``CHAT_DATA_DIR`` (tests and portable installs use them). The config file is
``config.toml`` in the config dir; everything in it is optional.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chat.errors import ConfigError
from chat.tomlfile import quote, read_toml, shorten

APP = "chat"


class ModelEntry(BaseModel):
    """One ``[models]`` alias. Keys besides these are load options for its backend (``gpu_layers = -1``),
    checked against that backend's ``Options`` when the model loads."""

    model_config = ConfigDict(extra="allow")

    path: str | None = Field(None, description="a GGUF file, a Hugging Face model folder, or a model id")
    url: str | None = Field(None, description="a serving engine's OpenAI URL (http://host:8000/v1); not with path")
    backend: str | None = None
    template: str | None = Field(None, description="chat template: a well-known name or a Jinja file")

    @model_validator(mode="after")
    def _path_or_url(self) -> "ModelEntry":
        if (self.path is None) == (self.url is None):
            raise ValueError("give either path (a model file or folder) or url (a serving engine), not both")
        return self

    @property
    def location(self) -> str:
        """What the entry points at: its url or its path."""
        return self.url or self.path or ""

    @property
    def options(self) -> dict[str, Any]:
        """The load options this entry sets (template included)."""
        extra = dict(self.model_extra or {})
        return extra | ({"template": self.template} if self.template else {})


class ConfigFile(BaseModel):
    """The schema of ``config.toml``."""

    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    default_persona: str | None = None
    history: bool = True
    markdown: bool = Field(True, description="render answers as Markdown on a terminal (never in a pipe)")
    models: dict[str, str | ModelEntry] = Field(default_factory=dict)
    backend: dict[str, Any] = Field(
        default_factory=dict,
        description="load options for every backend; a table named after a backend ([backend.transformers]) "
        "holds options for that one only",
    )
    sampling: dict[str, Any] = Field(default_factory=dict)
    user_name: str = Field("User", max_length=200, description="your name in persona cards ({{user}}, <USER>)")


class Paths:
    """The user's directories, created on first use."""

    @cached_property
    def config_dir(self) -> Path:
        env = os.environ.get("CHAT_CONFIG_DIR")
        if env:
            return Path(env).expanduser()
        import platformdirs

        return Path(platformdirs.user_config_dir(APP, appauthor=False))

    @cached_property
    def data_dir(self) -> Path:
        env = os.environ.get("CHAT_DATA_DIR")
        if env:
            return Path(env).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir(APP, appauthor=False))

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def personas_dir(self) -> Path:
        return self.config_dir / "personas"

    @property
    def presets_dir(self) -> Path:
        return self.config_dir / "presets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def history_db(self) -> Path:
        return self.data_dir / "history.db"

    @property
    def input_history(self) -> Path:
        return self.data_dir / "input_history"


def load_config(paths: Paths) -> ConfigFile:
    """The user's ``config.toml`` (defaults when there is none); any problem is one ConfigError naming the key."""
    file = paths.config_file
    if not os.path.lexists(file):
        return ConfigFile()
    data = read_toml(file, ConfigError, "fix the file or move it away")
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise _config_error(file, exc.errors()[0]) from None


def _config_error(file: Path, err: Any) -> ConfigError:
    """One pydantic error as one line, keys and values from the file cut short."""
    loc = ".".join(str(p) if isinstance(p, int) else shorten(str(p), 40) for p in err["loc"])
    msg = shorten(err["msg"], 160)
    got = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {quote(err.get('input'))})"
    return ConfigError(f"{file}: {loc}: {msg}{got}", "see README's Configuration section")


def model_entry(config: ConfigFile, name: str) -> ModelEntry | None:
    """The config entry for an alias, if ``name`` is one."""
    entry = config.models.get(name)
    if entry is None:
        return None
    return ModelEntry(path=entry) if isinstance(entry, str) else entry
