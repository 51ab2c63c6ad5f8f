"""CHARX: a zip holding ``card.json`` (Character Card V3) and the card's assets.

A zip from a stranger is checked before anything is extracted: at most :data:`MAX_ENTRIES`
entries, each at most :data:`MAX_ENTRY_BYTES` and the whole at most :data:`MAX_TOTAL_BYTES`
uncompressed, no entry expanding more than :data:`MAX_RATIO` times (a zip bomb), and no name
that is absolute, climbs out with ``..``, holds a backslash, a drive letter or a NUL, or is a
symbolic link. Reads are bounded too, so a header that lies about sizes cannot get past.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from chat.importers import MAX_CARD_JSON_BYTES, CardFileError

MAX_ENTRIES = 2000
MAX_ENTRY_BYTES = 64 << 20
MAX_TOTAL_BYTES = 256 << 20
MAX_RATIO = 200  # uncompressed / compressed, for entries over 1 MiB
CARD_NAME = "card.json"


def is_zip(data: bytes) -> bool:
    return data.startswith(b"PK\x03\x04")


def safe_name(name: str) -> str | None:
    """The entry's path if it stays inside the card folder; None when it does not."""
    if not name or "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name).parts
    if any(p in ("..", "") for p in parts) or len(name.encode("utf-8", "surrogatepass")) > 1000:
        return None
    return "/".join(parts)


def read(data: bytes, where: Path) -> tuple[bytes, dict[str, bytes]]:
    """(card.json bytes, {asset path: bytes}) from a CHARX zip; raises CardFileError on anything unsafe."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError) as exc:
        # NotImplementedError: a central directory naming a zip version Python cannot read (fuzzing found it)
        raise CardFileError(f"{where}: not a readable zip ({exc})", "a CHARX file is a zip holding card.json") from None
    if len(infos) > MAX_ENTRIES:
        raise CardFileError(f"{where}: {len(infos):,} entries in the zip", f"a CHARX may hold at most {MAX_ENTRIES}")
    total = 0
    files: dict[str, bytes] = {}
    card: bytes | None = None
    for info in infos:
        if info.is_dir():
            continue
        name = safe_name(info.filename)
        if name is None:
            raise CardFileError(
                f"{where}: zip entry {info.filename[:80]!r} points outside the card",
                "this CHARX is unsafe; it was not imported",
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise CardFileError(f"{where}: zip entry {name[:80]!r} is a symbolic link", "this CHARX was not imported")
        if name in files or (name == CARD_NAME and card is not None):
            raise CardFileError(f"{where}: zip entry {name[:80]!r} appears twice", "this CHARX is damaged")
        limit = MAX_CARD_JSON_BYTES if name == CARD_NAME else MAX_ENTRY_BYTES
        _check_sizes(info, limit, total, where, name)
        body = _read_entry(archive, info, limit, where, name)
        total += len(body)
        if total > MAX_TOTAL_BYTES:
            raise CardFileError(f"{where}: over {MAX_TOTAL_BYTES >> 20} MiB uncompressed", "this CHARX is too large")
        if name == CARD_NAME:
            card = body
        else:
            files[name] = body
    if card is None:
        raise CardFileError(f"{where}: no card.json in the zip", "a CHARX file holds card.json at its top")
    return card, files


def _check_sizes(info: zipfile.ZipInfo, limit: int, total: int, where: Path, name: str) -> None:
    if info.file_size > limit:
        raise CardFileError(f"{where}: zip entry {name[:80]!r} is {info.file_size:,} bytes", f"at most {limit:,}")
    if info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise CardFileError(
            f"{where}: zip entry {name[:80]!r} expands {info.file_size // max(info.compress_size, 1)}"
            " times (a zip bomb?)",
            "this CHARX was not imported",
        )
    if total + info.file_size > MAX_TOTAL_BYTES:
        raise CardFileError(f"{where}: over {MAX_TOTAL_BYTES >> 20} MiB uncompressed", "this CHARX is too large")


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: Path, name: str) -> bytes:
    try:
        with archive.open(info) as f:
            body = f.read(limit + 1)
    except (
        zlib.error,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        ValueError,
        OSError,
        EOFError,
        RuntimeError,
    ) as exc:  # RuntimeError: an encrypted entry
        raise CardFileError(
            f"{where}: cannot read zip entry {name[:80]!r} ({str(exc)[:80]})", "this CHARX is damaged"
        ) from None
    if len(body) > limit:
        raise CardFileError(f"{where}: zip entry {name[:80]!r} is larger than it says", "this CHARX is damaged")
    return body


def write(card: bytes, files: dict[str, bytes]) -> bytes:
    """A CHARX zip: card.json and the assets, at their paths."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CARD_NAME, card)
        for name, body in sorted(files.items()):
            if safe_name(name) and name != CARD_NAME:
                archive.writestr(name, body)
    return out.getvalue()
