"""The transformers backend: Hugging Face model folders (safetensors) through transformers and peft.

Importing this package is cheap: torch, transformers and peft load only when a
model is loaded (``chat --help`` imports every built-in plugin).
"""

from chat.hookspecs import hookimpl

from .backend import BackendStats, StreamStats, TransformersBackend

__all__ = ["TransformersBackend", "BackendStats", "StreamStats", "register_backends"]


@hookimpl
def register_backends(register):
    register(TransformersBackend)
