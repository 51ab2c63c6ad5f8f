"""Adapters in the format a backend wants, converted once and kept.

A card may ship its LoRA as a PEFT folder while the user runs llama.cpp (or as a GGUF
while they run transformers). ``ensure_format`` hands back the adapter in the wanted
format: the original when it already is, else a converted copy under
``<data dir>/cache/adapters/``. The copy is keyed by a hash of the adapter's bytes and
of everything the conversion reads from the base model (architecture, head counts,
tensor shapes) — so an edited adapter or a different base converts again, and the
same base as GGUF or as a Hugging Face folder shares one entry. Entries appear by an
atomic rename, so a crash never leaves a half-written one behind; a data dir that cannot
be written is one error line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from chat.convert.adapter import gguf_adapter_to_peft, is_gguf_file, peft_to_gguf
from chat.errors import AdapterError, UsageError
from chat.parts.files import open_regular
from chat.parts.shape import BaseShape, read_base

#: Bump when a converter's output changes, so old cache entries are not reused.
CONVERTER_VERSION = 1

Format = Literal["gguf", "peft"]


def adapter_format(path: str | os.PathLike[str]) -> Format:
    """``"peft"`` for a PEFT folder, ``"gguf"`` for a GGUF file, else an AdapterError."""
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").exists():  # not a regular file: the reader says so
        return "peft"
    if is_gguf_file(p):
        return "gguf"
    if not p.exists():
        raise AdapterError(f"{p}: adapter not found")
    raise AdapterError(f"{p}: neither a GGUF adapter file nor a PEFT adapter folder (adapter_config.json)")


def default_cache_dir() -> Path:
    from chat.config import Paths

    return Paths().data_dir / "cache" / "adapters"


def _source_files(path: Path, fmt: Format) -> list[Path]:
    if fmt == "gguf":
        return [path]
    return [f for f in (path / "adapter_config.json", path / "adapter_model.safetensors") if f.is_file()]


def cache_key(path: str | os.PathLike[str], want: Format, base: BaseShape) -> str:
    """Hex digest over the adapter's content, the wanted format and the base's identity."""
    p = Path(path)
    fmt = adapter_format(p)
    h = hashlib.sha256()
    h.update(
        json.dumps({"v": CONVERTER_VERSION, "from": fmt, "to": want, "base": base.identity()}, sort_keys=True).encode()
    )
    for f in _source_files(p, fmt):
        h.update(f.name.encode() + b"\0")
        with open_regular(f, "adapter") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def ensure_format(
    path: str | os.PathLike[str],
    want: Format,
    base: str | os.PathLike[str] | dict[str, Any] | BaseShape,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, bool]:
    """The adapter at ``path`` in format ``want``, and whether it was converted by this call.

    ``base`` is the base model (GGUF file, Hugging Face folder or config, or a BaseShape):
    conversion needs its architecture and head counts and checks the adapter against it.
    Already in the wanted format: returned as is, unchecked (the backend loads it).
    """
    if want not in ("gguf", "peft"):
        raise UsageError(f"unknown adapter format {want!r}", hint="gguf or peft")
    src = Path(path)
    fmt = adapter_format(src)
    if fmt == want:
        return src, False
    base_model = read_base(base)
    key = cache_key(src, want, base_model)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = (src.stem if fmt == "gguf" else src.name) or "adapter"
    entry = root / f"{stem[:40]}-{key[:20]}"
    leaf = "adapter.gguf" if want == "gguf" else "peft"
    if (entry / leaf).exists():
        return entry / leaf, False

    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    except OSError as exc:
        raise _unwritable(root, exc) from None
    try:
        if want == "gguf":
            peft_to_gguf(src, base_model, tmp / leaf)
        else:
            gguf_adapter_to_peft(src, base_model, tmp / leaf)
        (tmp / "source.json").write_text(
            json.dumps(
                {"source": str(src.resolve()), "from": fmt, "to": want, "key": key, "base": base_model.source}, indent=2
            )
        )
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / leaf).exists():  # not a lost race with another process: a real failure
                raise
    except OSError as exc:  # the converters report unreadable inputs themselves: this is the cache failing
        raise _unwritable(root, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / leaf, True


def _unwritable(root: Path, exc: OSError) -> AdapterError:
    """A read-only or full data dir: one line naming the cache folder, not a traceback."""
    return AdapterError(
        f"{root}: cannot write the converted adapter there ({exc.strerror or exc})",
        "make the data dir writable (or set CHAT_DATA_DIR to a writable folder), or convert the adapter "
        "yourself with `chat convert adapter` and point the card at the result",
    )
