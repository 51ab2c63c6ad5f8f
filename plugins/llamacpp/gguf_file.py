"""Reading and checking a GGUF file's header before llama.cpp sees it.

llama.cpp aborts the whole process on some malformed files, and on others it
fails with a message only its log shows. Reading the header here first turns the
common problems (missing file, not a GGUF, truncated download, an architecture
this llama.cpp cannot run, an adapter passed as a model) into one ModelError.
The reader (chat.gguf_parts, shared with adapter and vector checks) skips the big
arrays (the tokenizer's vocabulary) without building Python objects for them,
so a model with a 150k-token vocabulary is checked in milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from chat.errors import ModelError
from chat.gguf_parts import MAGIC as GGUF_MAGIC
from chat.gguf_parts import Header as GGUFHeader
from chat.gguf_parts import TruncatedHeader, parse_header

# Architectures in gguf's list that are not text models llama.cpp can chat with.
_NOT_CHAT_MODELS = {"clip"}


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of ``path``; raise ModelError naming the problem."""
    p = Path(path).expanduser()
    where = str(p)
    if not p.exists():
        raise ModelError(f"{where}: no such file", "check the path, or pass a model id your backends know")
    if p.is_dir():
        raise ModelError(f"{where}: is a folder, not a GGUF file", "pass the .gguf file inside it")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            if size < 4 or fh.read(4) != GGUF_MAGIC:
                raise ModelError(
                    f"{where}: not a GGUF file (it does not start with the GGUF magic bytes)",
                    "llama.cpp loads .gguf files; convert the model with llama.cpp's convert_hf_to_gguf.py",
                )
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelError(f"{where}: cannot read the file ({exc.strerror or exc})", "check its permissions") from None
    try:
        return parse_header(p, buf, size)
    except TruncatedHeader:
        raise ModelError(
            f"{where}: truncated: the file ends inside its header ({size} bytes)",
            "the download is incomplete; download the file again",
        ) from None
    except (ValueError, UnicodeDecodeError, struct.error, OverflowError) as exc:
        raise ModelError(f"{where}: corrupt GGUF header ({exc})", "download or convert the file again") from None
    finally:
        buf.close()


def check_model_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read the header and check that llama.cpp can load it as a chat model; raise ModelError if not."""
    header = read_header(path)
    where = str(header.path)
    arch = header.architecture
    kind = str(header.metadata.get("general.type", "model"))
    if kind == "adapter":
        raise ModelError(
            f"{where}: is a {header.metadata.get('adapter.type', 'LoRA')} adapter, not a model",
            "load a base model with -m and attach the adapter through a persona card's [[adapters]]",
        )
    if arch == "controlvector" or "controlvector.layer_count" in header.metadata:
        raise ModelError(f"{where}: is a control vector, not a model", "attach it through a persona card's [[steering]]")
    if not arch:
        raise ModelError(f"{where}: the file has no general.architecture key", "convert the model again with a current llama.cpp")
    if arch not in supported_architectures():
        raise ModelError(
            f"{where}: unsupported architecture {arch!r}",
            "this llama.cpp (llama-cpp-python 0.3.36) cannot run it; try a newer llama-cpp-python or another backend",
        )
    if "tokenizer.ggml.model" not in header.metadata or "tokenizer.ggml.tokens" not in header.array_lengths:
        raise ModelError(f"{where}: the file has no tokenizer", "convert the model again including its tokenizer")
    end = header.data_end
    if end > header.file_size:
        missing = end - header.file_size
        raise ModelError(
            f"{where}: truncated: the tensors need {end} bytes but the file has {header.file_size} ({missing} missing)",
            "the download is incomplete; download the file again",
        )
    if not header.tensors:
        raise ModelError(f"{where}: the file holds no tensors (vocabulary-only GGUF?)", "pass a model file with weights")
    return header


def supported_architectures() -> frozenset[str]:
    """The architectures gguf (the writer llama.cpp ships with) knows, less the non-chat ones."""
    from gguf.constants import MODEL_ARCH_NAMES

    return frozenset(MODEL_ARCH_NAMES.values()) - _NOT_CHAT_MODELS
