"""Named sampler presets: built-in ones and the user's ``presets/NAME.toml`` files."""

from __future__ import annotations

import difflib
from typing import Any

from chat.config import Paths
from chat.errors import SamplingError
from chat.sampling import BUILTIN_PRESETS, normalize_layer
from chat.tomlfile import quote, read_toml


def user_presets(paths: Paths) -> dict[str, dict[str, Any]]:
    """``presets/NAME.toml`` files by name; a broken one is one SamplingError naming the file."""
    folder = paths.presets_dir
    out: dict[str, dict[str, Any]] = {}
    if folder.is_dir():
        for file in sorted(folder.glob("*.toml")):
            out[file.stem] = read_toml(file, SamplingError, "fix the preset file, or move it away")
    return out


def all_presets(paths: Paths) -> dict[str, tuple[dict[str, Any], str]]:
    out = {name: (values, "built-in") for name, values in BUILTIN_PRESETS.items()}
    out.update({name: (values, "user") for name, values in user_presets(paths).items()})
    return out


def load_preset(name: str, paths: Paths) -> dict[str, Any]:
    """A preset's settings, checked key by key (values are checked when the layers are merged)."""
    presets = all_presets(paths)
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1) if len(name) <= 255 else []
        tip = f"did you mean {close[0]!r}? " if close else ""
        raise SamplingError(f"unknown preset {quote(name)}", f"{tip}known presets: {', '.join(sorted(presets))}")
    values, _ = presets[name]
    normalize_layer(values, source=f"preset {name}")  # a user preset's name is a file name: short
    return dict(values)
