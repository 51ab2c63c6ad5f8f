"""PNG/APNG containers: the card in a ``tEXt`` chunk (``ccv3`` preferred over ``chara``), base64 JSON.

Read and written with :mod:`struct` and :mod:`zlib` (CRC) only: the chunk layout is all that is
needed, and Pillow would decode the image for nothing. Reading walks the chunks without
trusting their lengths, and refuses a card chunk over :data:`MAX_CARD_CHUNK` before decoding it.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from pathlib import Path

from chat.importers import MAX_CARD_JSON_BYTES, CardFileError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # in order of preference (the V3 spec: use ccv3 when both are there)
MAX_CARD_CHUNK = (MAX_CARD_JSON_BYTES * 4) // 3 + 4


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def card_texts(data: bytes, where: Path) -> dict[str, bytes]:
    """The decoded card chunks of a PNG (``{"ccv3": json_bytes, "chara": json_bytes}``, whichever are there)."""
    if not is_png(data):
        raise CardFileError(f"{where}: not a PNG file", "a card image starts with the PNG signature")
    found: dict[str, bytes] = {}
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body_start, body_end = pos + 8, pos + 8 + length
        if body_end + 4 > len(data):
            raise CardFileError(f"{where}: PNG chunk {kind!r} at byte {pos} runs past the end", "the file is cut short")
        if kind == b"tEXt":
            keyword, sep, text = data[body_start : min(body_end, body_start + 80)].partition(b"\0")
            name = keyword.decode("latin-1").lower()
            if sep and name in CARD_KEYWORDS and name not in found:
                if length > MAX_CARD_CHUNK:
                    raise CardFileError(
                        f"{where}: the {name!r} chunk is {length:,} bytes",
                        f"a card's data may have at most {MAX_CARD_JSON_BYTES >> 20} MiB",
                    )
                found[name] = _decode(data[body_start + len(keyword) + 1 : body_end], name, where)
        if kind == b"IEND":
            break
        pos = body_end + 4
    return found


def _decode(text: bytes, name: str, where: Path) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise CardFileError(f"{where}: the {name!r} chunk is not base64", "the card data is damaged") from None


def card_json(data: bytes, where: Path) -> bytes:
    """The card's JSON bytes: the ``ccv3`` chunk, else ``chara``."""
    texts = card_texts(data, where)
    for name in CARD_KEYWORDS:
        if name in texts:
            return texts[name]
    raise CardFileError(f"{where}: this PNG holds no character card", "a card PNG has a 'chara' or 'ccv3' text chunk")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def blank_png() -> bytes:
    """A 1×1 transparent PNG: the image of a card that has no avatar."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def with_card(image: bytes, cards: dict[str, bytes]) -> bytes:
    """``image`` with its old card chunks removed and ``cards`` (keyword → JSON bytes) added before IEND."""
    if not is_png(image):
        image = blank_png()
    out = [SIGNATURE]
    pos = len(SIGNATURE)
    added = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\0" + base64.b64encode(v)) for k, v in cards.items())
    while pos + 8 <= len(image):
        (length,) = struct.unpack(">I", image[pos : pos + 4])
        kind = image[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(image):
            break
        keyword = image[pos + 8 : pos + 8 + min(length, 80)].partition(b"\0")[0].decode("latin-1").lower()
        if kind == b"IEND":
            out.append(added)
            out.append(image[pos:end])
            return b"".join(out)
        if not (kind == b"tEXt" and keyword in CARD_KEYWORDS):
            out.append(image[pos:end])
        pos = end
    return blank_png()[:-12] + added + _chunk(b"IEND", b"")  # a damaged avatar: a blank image carries the card
