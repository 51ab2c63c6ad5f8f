"""The sampler layers under and over a persona card, read once per request.

A session's settings are ``defaults < config < preset < card < /set < flags``. The
config, preset and flags layers are fixed for the whole session: they are read
here once (the preset file from the user's own presets folder) and kept as one
immutable value. The card and ``/set`` layers change during a session, so
:meth:`SamplerLayers.resolve` takes them as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from chat.sampling import SamplerSettings, resolve_sampling


def _frozen(values: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class SamplerLayers:
    """The fixed layers: ``config.toml [sampling]``, a named preset and the command-line flags."""

    config: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None
    preset_values: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("config", "preset_values", "flags"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @classmethod
    def read(
        cls,
        *,
        config: Mapping[str, Any] | None = None,
        preset: str | None = None,
        paths: Any,
        flags: Mapping[str, Any] | None = None,
    ) -> SamplerLayers:
        """Read the preset (built-in, or ``presets/NAME.toml`` under ``paths``); an unknown one is a SamplingError."""
        values: Mapping[str, Any] = {}
        if preset:
            from chat.presets import load_preset

            values = load_preset(preset, paths)
        return cls(config=config or {}, preset=preset, preset_values=values, flags=flags or {})

    def resolve(
        self, card_label: str, card_sampling: Mapping[str, Any], repl: Mapping[str, Any] | None = None
    ) -> tuple[SamplerSettings, dict[str, str]]:
        """Settings for a card (and the REPL's ``/set`` values), with the layer each value came from."""
        return resolve_sampling(
            [
                ("defaults", {}),
                ("config", self.config),
                (f"preset {self.preset}", self.preset_values),
                (f"card {card_label}", card_sampling),
                ("/set", repl or {}),
                ("flags", self.flags),
            ]
        )
