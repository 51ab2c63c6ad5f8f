"""Finding and checking a Hugging Face checkpoint before torch ever sees it.

A model is a folder holding ``config.json`` and safetensors weights, or a model id
(``org/name``) already in the local Hugging Face cache — looked up offline, never
downloaded. Pickle checkpoints (``.bin``/``.pt``/``.pth``) are refused: unpickling
a downloaded file can run code. Nothing here imports torch or transformers. (PEFT adapter
folders are read by the core reader both backends use, :mod:`chat.parts.peft`.)
"""

from __future__ import annotations

from pathlib import Path

from chat.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def looks_like_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")) and not model.endswith(".gguf")


def cached_snapshot(model_id: str) -> Path | None:
    """The local snapshot folder of ``model_id`` in the Hugging Face cache, or None (offline: no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # malformed ids raise validation errors
        return None
    if isinstance(found, str):
        return Path(found).parent
    return None


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(model: str) -> Path:
    """The checkpoint folder for ``model`` (a folder or a cached id); ModelError saying how to fix it otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{path}: not a model folder",
                "the transformers backend loads a folder with config.json and *.safetensors; "
                "use a .gguf file with the llama.cpp backend",
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path}: no config.json in this folder",
                "point -m at the Hugging Face model folder (the one holding config.json)",
            )
        return path.resolve()
    if looks_like_id(model):
        snap = cached_snapshot(model)
        if snap is not None:
            return snap
        raise ModelError(
            f"{model}: not in the local Hugging Face cache",
            f"download it first (e.g. `huggingface-cli download {model}`), or pass the model folder's path",
        )
    raise ModelError(
        f"{path}: no such model folder", "check the path; the transformers backend loads a folder with config.json"
    )


def check_weights(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``; a pickle-only checkpoint is refused with the fix."""
    safe = sorted(folder.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        names = ", ".join(p.name for p in pickles[:3]) + (" …" if len(pickles) > 3 else "")
        raise ModelError(
            f"{folder}: only pickle weights ({names}); "
            "chat loads safetensors only, because unpickling a file can run code",
            "convert it to safetensors once, in an environment you trust (e.g. load it with transformers and call "
            "model.save_pretrained(folder, safe_serialization=True)), or download the repo's *.safetensors files",
        )
    raise ModelError(
        f"{folder}: no weights (*.safetensors) in this folder", "download the model's *.safetensors files into it"
    )
