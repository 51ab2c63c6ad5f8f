"""A backend's load options, built for the backend that will load the model, from config.toml and the flags.

Options belong to backends: each declares its own pydantic ``Options`` (a subclass of
``chat.backend.BackendOptions``), and only what the chosen backend declares is accepted.
``--device`` given for a .gguf model is one line naming the flag, the backend and what it
takes, before any model is loaded; nothing is silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from chat.backend import BackendOptions
from chat.errors import ChatError, ConfigError, UsageError
from chat.tomlfile import quote, shorten

if TYPE_CHECKING:
    from chat.backend import BackendFactory
    from chat.models import ModelChoice


@dataclass(frozen=True)
class OptionLayer:
    """Options from one place; ``where`` + ``key_name(key)`` is how the user wrote a key (``--ctx``, ``backend.x``)."""

    values: Mapping[str, Any]
    where: str
    key_name: Callable[[str], str]
    error: type[ChatError]

    def name(self, key: str) -> str:
        return f"{self.where}{self.key_name(shorten(key, 40))}"


def options_class(cls: type) -> type[BackendOptions]:
    """The backend's ``Options`` class; a backend that declares none takes the common options."""
    return getattr(cls, "Options", BackendOptions)


def user_options(options: type[BackendOptions]) -> dict[str, Any]:
    """The fields a user may set (chat's own bookkeeping fields are ``exclude=True``), in declaration order."""
    return {name: f for name, f in options.model_fields.items() if not f.exclude}


def build_options(cls: type[BackendFactory], layers: Sequence[OptionLayer]) -> BackendOptions:
    """Merge ``layers`` (later wins) into ``cls``'s Options; the first bad key or value is one ChatError line."""
    options = options_class(cls)
    merged: dict[str, Any] = {}
    origin: dict[str, OptionLayer] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if key not in options.model_fields:
                raise _not_taken(cls, key, layer)
            merged[key], origin[key] = value, layer
    try:
        return options(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        culprit = origin.get(key)
        where = culprit.name(key) if culprit else f"the {cls.name} backend's options"
        msg = shorten(err["msg"].removeprefix("Value error, "), 160)
        secret = "key" in key.lower() or "secret" in key.lower() or "token" in key.lower()
        shown = "" if secret else f" {quote(err.get('input'))}"  # a pasted key is never echoed
        raise (culprit.error if culprit else UsageError)(
            f"{where}{shown}: {msg}", "`chat plugins` lists each backend's options"
        ) from None


def _not_taken(cls: type[BackendFactory], key: str, layer: OptionLayer) -> ChatError:
    from chat.plugins import get_registry

    takes = ", ".join(layer.key_name(k) for k in user_options(options_class(cls))) or "none"
    others = sorted(b.name for b in get_registry().backends.values() if key in user_options(options_class(b)))
    hint = "`chat plugins` lists each backend's options"
    if others:
        hint = f"it is an option of the {' and '.join(others)} backend; " + hint
    return layer.error(f"{layer.name(key)}: the {cls.name} backend has no such option (it takes: {takes})", hint)


def plan_options(
    choice: ModelChoice,
    config_backend: Mapping[str, Any],
    config_file: Path | str,
    flags: Mapping[str, Any],
    flag_name: Callable[[str], str],
) -> BackendOptions:
    """The options the chosen backend loads ``choice`` with.

    Lowest first: config.toml's ``[backend]``, its table for this backend (``[backend.transformers]``),
    the model's ``[models]`` entry, then the flags (named for errors by ``flag_name``).
    """
    from chat.models import backend_class
    from chat.plugins import get_registry

    cls = backend_class(choice)
    names = set(get_registry().backends)
    common = {k: v for k, v in config_backend.items() if not (k in names and isinstance(v, Mapping))}
    own = config_backend.get(cls.name)
    entry = dict(choice.options)
    if "template" in flags:
        entry.pop("template_origin", None)  # --template given: it is the flag's choice
    table = cls.name if cls.name.replace("_", "").replace("-", "").isalnum() else f'"{cls.name}"'
    return build_options(
        cls,
        [
            OptionLayer(common, f"{config_file}: backend.", str, ConfigError),
            OptionLayer(own if isinstance(own, Mapping) else {}, f"{config_file}: backend.{table}.", str, ConfigError),
            OptionLayer(entry, f"{config_file}: models.{shorten(choice.spec, 40)}.", str, ConfigError),
            OptionLayer(flags, "", flag_name, UsageError),
        ],
    )


def describe_options(cls: type[BackendFactory]) -> list[tuple[str, str, Any, str]]:
    """For ``chat plugins``: (name, type, default, description) of each option ``cls`` takes."""
    rows = []
    for name, f in user_options(options_class(cls)).items():
        ann = f.annotation
        kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        default = f.default_factory() if f.default_factory else f.default  # type: ignore[call-arg]
        rows.append((name, kind, default, f.description or ""))
    return rows
