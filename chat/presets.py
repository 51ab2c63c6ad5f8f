"""Named sampler presets: built-in ones and the user's ``presets/NAME.toml`` files."""

from __future__ import annotations

import difflib
import tomllib
from typing import Any

from chat.config import Paths
from chat.errors import SamplingError
from chat.sampling import BUILTIN_PRESETS, normalize_layer


def user_presets(paths: Paths | None = None) -> dict[str, dict[str, Any]]:
    folder = (paths or Paths()).presets_dir
    out: dict[str, dict[str, Any]] = {}
    if folder.is_dir():
        for file in sorted(folder.glob("*.toml")):
            try:
                out[file.stem] = tomllib.loads(file.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise SamplingError(f"{file}: not valid TOML: {exc}", "fix the preset file") from None
    return out


def all_presets(paths: Paths | None = None) -> dict[str, tuple[dict[str, Any], str]]:
    out = {name: (values, "built-in") for name, values in BUILTIN_PRESETS.items()}
    out.update({name: (values, "user") for name, values in user_presets(paths).items()})
    return out


def load_preset(name: str, paths: Paths | None = None) -> dict[str, Any]:
    presets = all_presets(paths)
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        tip = f"did you mean {close[0]!r}? " if close else ""
        raise SamplingError(f"unknown preset {name!r}", f"{tip}known presets: {', '.join(sorted(presets))}")
    values, _ = presets[name]
    normalize_layer(values, source=f"preset {name}")
    return dict(values)
