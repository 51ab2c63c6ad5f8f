"""Bringing personas from other formats, and taking them back out.

Character Card V1/V2/V3 (JSON, PNG/APNG with the card in a ``tEXt`` chunk, CHARX zip) and ollama
Modelfiles become a card folder: ``persona.toml`` with what chat uses, and ``imported.json`` with
the file as it was read, so that an export writes back every field, ``extensions`` included, and
only the fields the user changed in ``persona.toml`` differ. One module per format reads and
writes the container; :mod:`chat.importers.mapping` maps card data to our card and back;
:mod:`chat.importers.cardio` ties them to a card folder. Files from strangers are bounded in size
and shape before they are parsed, and every problem is one :class:`CardFileError` line.
"""

from __future__ import annotations

from chat.errors import PersonaError


class CardFileError(PersonaError):
    """A card file to import is malformed, too large, or not a card."""


MAX_CARD_JSON_BYTES = 8 << 20  # a card's JSON; real ones are a few hundred KB with big lorebooks
MAX_INPUT_BYTES = 64 << 20  # a PNG or CHARX file as a whole
